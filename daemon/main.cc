// meterd: usage metering daemon. Dispatches to a subcommand; see `meterd --help`.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "daemon/flags.h"
#include "lib/common/logging.h"

namespace {

using meterd::daemon::Subcommand;

std::string Dashed(const char* flag) { return absl::StrReplaceAll(flag, {{"_", "-"}}); }

void PrintUsage() {
  std::printf(
      "meterd: exactly-once usage metering, Kafka -> Postgres\n\nUsage: meterd COMMAND "
      "[flags]\n\nCommands:\n");
  for (const Subcommand& c : meterd::daemon::Subcommands()) {
    std::printf("  %-16s %s\n", c.name, c.summary);
  }
  std::printf(
      "\n`meterd COMMAND --help` lists a command's flags. Every flag can also be set in the\n"
      "environment as METERD_<FLAG> (e.g. METERD_PG); a flag on the command line wins.\n");
}

void PrintCommandHelp(const Subcommand& c) {
  std::printf("meterd %s: %s\n\nFlags:\n", c.name, c.summary);
  for (const char* name : c.flags) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string def = flag->DefaultValue();
    if (def.empty()) def = "\"\"";
    std::printf("  --%-20s %s (default: %s; env METERD_%s)\n", Dashed(name).c_str(),
                flag->Help().c_str(), def.c_str(), absl::AsciiStrToUpper(name).c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  meterd::InitLogging();
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
      std::strcmp(argv[1], "help") == 0) {
    PrintUsage();
    return argc < 2 ? 2 : 0;
  }
  const Subcommand* command = nullptr;
  std::string family;  // Second words of the two-word commands starting with argv[1].
  for (const Subcommand& c : meterd::daemon::Subcommands()) {
    const std::string name = c.name;
    if (meterd::daemon::NameWords(c) == 1) {
      if (name == argv[1]) command = &c;
      continue;
    }
    const std::string first = name.substr(0, name.find(' '));
    if (first != argv[1]) continue;
    family += absl::StrCat(family.empty() ? "" : ", ", name.substr(first.size() + 1));
    if (argc > 2 && name == absl::StrCat(argv[1], " ", argv[2])) command = &c;
  }
  if (command == nullptr && !family.empty()) {
    std::fprintf(stderr, "meterd %s: needs one of: %s\n", argv[1], family.c_str());
    return 2;
  }
  if (command == nullptr) {
    std::fprintf(stderr, "meterd: unknown command '%s'; `meterd --help` lists them\n", argv[1]);
    return 2;
  }

  absl::StatusOr<meterd::daemon::CommandLine> line =
      meterd::daemon::ParseCommandLine(*command, argc, argv);
  if (!line.ok()) {
    std::fprintf(stderr, "meterd %s: %s\n", command->name,
                 std::string(line.status().message()).c_str());
    return 2;
  }
  if (line->help) {
    PrintCommandHelp(*command);
    return 0;
  }
  const absl::Status status = command->run(line->kafka_properties);
  if (status.ok()) return 0;
  std::fprintf(stderr, "meterd %s: %s\n", command->name, std::string(status.message()).c_str());
  return 1;
}
