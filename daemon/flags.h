#pragma once

#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

ABSL_DECLARE_FLAG(std::string, pg);
ABSL_DECLARE_FLAG(std::string, brokers);
ABSL_DECLARE_FLAG(std::string, topic);
ABSL_DECLARE_FLAG(std::string, group);
ABSL_DECLARE_FLAG(int, shards);
ABSL_DECLARE_FLAG(absl::Duration, flush_interval);
ABSL_DECLARE_FLAG(int64_t, max_unflushed_keys);
ABSL_DECLARE_FLAG(absl::Duration, late_window);
ABSL_DECLARE_FLAG(absl::Duration, max_future_skew);
ABSL_DECLARE_FLAG(absl::Duration, stats_interval);
ABSL_DECLARE_FLAG(std::string, kafka_property);
ABSL_DECLARE_FLAG(int, partitions);
ABSL_DECLARE_FLAG(int64_t, events);
ABSL_DECLARE_FLAG(int, orgs);
ABSL_DECLARE_FLAG(double, malformed_share);
ABSL_DECLARE_FLAG(double, duplicate_share);
ABSL_DECLARE_FLAG(absl::Duration, pg_connect_timeout);
ABSL_DECLARE_FLAG(absl::Duration, pg_statement_timeout);
ABSL_DECLARE_FLAG(absl::Duration, pg_lock_timeout);
ABSL_DECLARE_FLAG(absl::Duration, dedup_window);
ABSL_DECLARE_FLAG(int64_t, dedup_max_ids);
ABSL_DECLARE_FLAG(std::string, expected_out);
ABSL_DECLARE_FLAG(int, days);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(int64_t, rate);
ABSL_DECLARE_FLAG(bool, billing);
ABSL_DECLARE_FLAG(std::string, http_listen);
ABSL_DECLARE_FLAG(std::string, summary_json);
ABSL_DECLARE_FLAG(std::string, as_of);
ABSL_DECLARE_FLAG(bool, allow_future);
ABSL_DECLARE_FLAG(absl::Duration, startup_timeout);
ABSL_DECLARE_FLAG(std::string, reason);
ABSL_DECLARE_FLAG(std::string, since);

namespace meterd::daemon {

struct Subcommand {
  const char* name;
  const char* summary;
  std::vector<const char*> flags;  // Flag names this subcommand reads.
  int (*run)(const std::vector<std::string>& kafka_properties);
};

const std::vector<Subcommand>& Subcommands();

struct CommandLine {
  bool help = false;                          // --help / -h given: print the command's flags.
  std::vector<std::string> kafka_properties;  // Every --kafka-property, environment first.
};

// Sets `command`'s flags from the environment (METERD_<FLAG>), then from argv[2..] (the command
// line wins). Accepts --flag-name and --flag_name, `--flag value` and `--flag=value`, a bare
// boolean flag; collects the repeatable --kafka-property. InvalidArgument, naming the flag or
// variable, for anything else (a flag another command uses, a missing value, a bad value).
absl::StatusOr<CommandLine> ParseCommandLine(const Subcommand& command, int argc, char** argv);

}  // namespace meterd::daemon
