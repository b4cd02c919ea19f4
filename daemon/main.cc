// meterd: usage metering daemon. Dispatches to a subcommand; see `meterd --help`.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
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
    std::printf("  %-12s %s\n", c.name, c.summary);
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

bool Uses(const Subcommand& c, const std::string& name) {
  for (const char* f : c.flags) {
    if (name == f) return true;
  }
  return false;
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
  for (const Subcommand& c : meterd::daemon::Subcommands()) {
    if (argv[1] == std::string(c.name)) command = &c;
  }
  if (command == nullptr) {
    std::fprintf(stderr, "meterd: unknown command '%s'; `meterd --help` lists them\n", argv[1]);
    return 2;
  }

  // Environment first, so the command line overrides it.
  std::vector<std::string> kafka_properties;
  for (const char* name : command->flags) {
    const std::string env = absl::StrCat("METERD_", absl::AsciiStrToUpper(name));
    const char* value = std::getenv(env.c_str());
    if (value == nullptr) continue;
    if (std::string(name) == "kafka_property") {
      kafka_properties.push_back(value);
      continue;
    }
    std::string error;
    if (!absl::FindCommandLineFlag(name)->ParseFrom(value, &error)) {
      std::fprintf(stderr, "meterd %s: %s=%s: %s\n", command->name, env.c_str(), value,
                   error.c_str());
      return 2;
    }
  }

  // Accept --flag-name as well as --flag_name; --kafka-property is repeatable, so it is taken
  // out here; flags another command uses are refused by name.
  std::vector<std::string> args = {std::string("meterd ") + command->name};
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h" || arg == "--helpfull") {
      PrintCommandHelp(*command);
      return 0;
    }
    if (arg.rfind("--", 0) != 0 || arg == "--") {
      std::fprintf(stderr, "meterd %s: unexpected argument '%s'\n", command->name, arg.c_str());
      return 2;
    }
    const size_t eq = arg.find('=');
    std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    name = absl::StrReplaceAll(name, {{"-", "_"}});
    if (!Uses(*command, name)) {
      std::fprintf(stderr, "meterd %s: unknown flag --%s; `meterd %s --help` lists the flags\n",
                   command->name, Dashed(name.c_str()).c_str(), command->name);
      return 2;
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
      std::fprintf(stderr, "meterd %s: --%s needs a value\n", command->name,
                   Dashed(name.c_str()).c_str());
      return 2;
    }
    if (name == "kafka_property") {
      kafka_properties.push_back(value);
      continue;
    }
    args.push_back(absl::StrCat("--", name, "=", value));
  }

  std::vector<char*> absl_argv;
  for (std::string& a : args) absl_argv.push_back(a.data());
  std::vector<char*> positional;
  // absl exits with its own message on a malformed value, naming the flag.
  absl::ParseCommandLine(static_cast<int>(absl_argv.size()), absl_argv.data());
  return command->run(kafka_properties);
}
