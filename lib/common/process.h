#pragma once

#include <csignal>

namespace meterd {

// Set by SIGTERM/SIGINT once InstallStopSignals() ran; polled by long-running loops.
extern volatile std::sig_atomic_t g_stop_requested;

void InstallStopSignals();
inline bool StopRequested() { return g_stop_requested != 0; }

// Peak resident set size of this process in KiB (from /proc/self/status VmHWM).
long PeakRssKib();

}  // namespace meterd
