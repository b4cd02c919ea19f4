#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace meterd::daemon {

struct Subcommand {
  const char* name;  // One word ("run") or two ("org export"): argv[1], or argv[1] argv[2].
  const char* summary;
  std::vector<const char*> flags;  // Flag names this subcommand reads.
  // The command itself; main prints a failure as one line on stderr and exits 1.
  absl::Status (*run)(const std::vector<std::string>& kafka_properties);
};

const std::vector<Subcommand>& Subcommands();

// How many words of argv the command's name takes (1 or 2).
int NameWords(const Subcommand& command);

struct CommandLine {
  bool help = false;                          // --help / -h given: print the command's flags.
  std::vector<std::string> kafka_properties;  // Every --kafka-property, environment first.
};

// Sets `command`'s flags from the environment (METERD_<FLAG>), then from the arguments after
// its name (the command line wins). Accepts --flag-name and --flag_name, `--flag value` and
// `--flag=value`, a bare boolean flag; collects the repeatable --kafka-property. InvalidArgument,
// naming the flag or variable, for anything else (a flag another command uses, a missing value, a
// bad value).
absl::StatusOr<CommandLine> ParseCommandLine(const Subcommand& command, int argc, char** argv);

}  // namespace meterd::daemon
