#include "lib/common/process.h"

#include <fstream>
#include <string>

namespace meterd {

volatile std::sig_atomic_t g_stop_requested = 0;

namespace {
void OnStopSignal(int) { g_stop_requested = 1; }
}  // namespace

void InstallStopSignals() {
  struct sigaction action {};
  action.sa_handler = OnStopSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

long PeakRssKib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

}  // namespace meterd
