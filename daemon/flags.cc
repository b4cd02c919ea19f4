#include "daemon/flags.h"

#include <cstdlib>
#include <string_view>

#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace meterd::daemon {
namespace {

std::string Dashed(const std::string& flag) { return absl::StrReplaceAll(flag, {{"_", "-"}}); }

bool Uses(const Subcommand& c, const std::string& name) {
  for (const char* f : c.flags) {
    if (name == f) return true;
  }
  return false;
}

// Environment first, so the command line overrides it.
absl::Status ApplyEnvironment(const Subcommand& command, CommandLine& line) {
  for (const char* name : command.flags) {
    const std::string env = absl::StrCat("METERD_", absl::AsciiStrToUpper(name));
    const char* value = std::getenv(env.c_str());
    if (value == nullptr) continue;
    if (std::string(name) == "kafka_property") {
      line.kafka_properties.push_back(value);
      continue;
    }
    std::string error;
    if (!absl::FindCommandLineFlag(name)->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(absl::StrCat(env, "=", value, ": ", error));
    }
  }
  return absl::OkStatus();
}

}  // namespace

int NameWords(const Subcommand& command) {
  return std::string_view(command.name).find(' ') == std::string_view::npos ? 1 : 2;
}

absl::StatusOr<CommandLine> ParseCommandLine(const Subcommand& command, int argc, char** argv) {
  CommandLine line;
  if (absl::Status env = ApplyEnvironment(command, line); !env.ok()) return env;
  // --kafka-property is repeatable, so it is taken out here; the rest goes to Abseil as
  // --name=value, and a flag another command uses is refused by name.
  std::vector<std::string> args = {std::string("meterd ") + command.name};
  for (int i = 1 + NameWords(command); i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h" || arg == "--helpfull") {
      line.help = true;
      return line;
    }
    if (arg.rfind("--", 0) != 0 || arg == "--") {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
    }
    const size_t eq = arg.find('=');
    const std::string name = absl::StrReplaceAll(
        arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2), {{"-", "_"}});
    if (!Uses(command, name)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", Dashed(name), "; `meterd ",
                                                     command.name, " --help` lists the flags"));
    }
    std::string value;
    const bool is_bool = absl::FindCommandLineFlag(name)->IsOfType<bool>();
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (is_bool && (i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0)) {
      value = "true";  // A bare boolean flag: --billing.
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("--", Dashed(name), " needs a value"));
    }
    if (name == "kafka_property") {
      line.kafka_properties.push_back(value);
      continue;
    }
    args.push_back(absl::StrCat("--", name, "=", value));
  }
  std::vector<char*> absl_argv;
  for (std::string& a : args) absl_argv.push_back(a.data());
  // Abseil exits with its own message on a malformed value, naming the flag.
  absl::ParseCommandLine(static_cast<int>(absl_argv.size()), absl_argv.data());
  return line;
}

}  // namespace meterd::daemon
