#include "daemon/flags.h"

#include <cstdlib>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

ABSL_FLAG(std::string, pg, "", "Postgres connection: libpq URL or key=value string (required)");
ABSL_FLAG(std::string, brokers, "", "Kafka bootstrap servers, host:port[,host:port] (required)");
ABSL_FLAG(std::string, topic, "usage-events", "Kafka topic carrying the usage CloudEvents");
ABSL_FLAG(std::string, group, "meterd", "Kafka consumer group; also keys shared.ingest_offsets");
ABSL_FLAG(int, shards, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())),
          "Consumer shard threads (default: number of cores)");
ABSL_FLAG(absl::Duration, flush_interval, absl::Seconds(1),
          "How often counters are written to Postgres");
ABSL_FLAG(int64_t, max_unflushed_keys, 2'000'000,
          "Unflushed counter keys (all shards) that force an early flush and pause consumption");
ABSL_FLAG(absl::Duration, late_window, absl::Hours(24 * 62),
          "Events older than this are rejected as time_too_old");
ABSL_FLAG(absl::Duration, max_future_skew, absl::Minutes(5),
          "Events further ahead of this host's clock are rejected as time_in_future");
ABSL_FLAG(absl::Duration, stats_interval, absl::Seconds(10), "How often a stats line is logged");
ABSL_FLAG(std::string, kafka_property, "",
          "Extra librdkafka property key=value; repeat the flag for several");
ABSL_FLAG(int, partitions, 16, "Partitions of the topic the embedded broker creates");
ABSL_FLAG(int64_t, events, 100'000, "Events to produce");
ABSL_FLAG(int, orgs, 1000, "Distinct organizations the events are spread over");
ABSL_FLAG(double, malformed_share, 0.0, "Share (0..1) of malformed events mixed in");
ABSL_FLAG(absl::Duration, pg_connect_timeout, absl::Seconds(10),
          "Give up connecting to Postgres after this long (then retry with backoff)");
ABSL_FLAG(absl::Duration, pg_statement_timeout, absl::Seconds(60),
          "A flush (or offset load) not finished within this is abandoned and retried: set on "
          "the server as statement_timeout and enforced on the client, so a Postgres that "
          "stopped answering cannot stall ingestion");
ABSL_FLAG(absl::Duration, pg_lock_timeout, absl::Seconds(10),
          "Postgres lock_timeout of the flush (0: none): a flush blocked on a row lock fails "
          "and is retried instead of waiting behind it");
ABSL_FLAG(double, duplicate_share, 0.0,
          "Share (0..1) of valid events produced again later with the same source and id "
          "(a retrying producer); not in the expected totals");
ABSL_FLAG(absl::Duration, dedup_window, absl::Hours(24),
          "An event whose (source, id) its partition counted from a message sent at most this "
          "long before (Kafka message timestamps) is a duplicate and not counted");
ABSL_FLAG(int64_t, dedup_max_ids, 100'000,
          "Ids remembered per partition for dedup (about 40 bytes each; 0 turns dedup off); "
          "also how many messages are re-read on assignment to rebuild the window");
ABSL_FLAG(std::string, expected_out, "",
          "Write the expected per-(org, meter, industry, day) totals to this CSV file");
ABSL_FLAG(int, days, 3, "Spread event times over the last N days");
ABSL_FLAG(int64_t, rate, 0, "Events per second to produce at; 0 = as fast as possible");
ABSL_FLAG(absl::Duration, startup_timeout, absl::Seconds(15),
          "How long to wait for Kafka metadata at start before failing");
ABSL_FLAG(std::string, reason, "",
          "replay-rejected: the shared.rejected_events.reason code to replay (required)");
ABSL_FLAG(std::string, since, "",
          "replay-rejected: only rows rejected at or after this RFC 3339 time (default: all)");
ABSL_FLAG(bool, billing, true,
          "Run the overage worker: keep shared.usage_charges and quota alerts current");
ABSL_FLAG(std::string, http_listen, "",
          "Serve /metrics, /metrics.json, /healthz, /readyz on host:port (e.g. 0.0.0.0:9464); "
          "empty: off");
ABSL_FLAG(std::string, summary_json, "",
          "When the run ends, write every metric (the same registry as /metrics) as one JSON "
          "object to this file; empty: off");
ABSL_FLAG(std::string, as_of, "", "Close periods that ended by this RFC 3339 time (default: now)");
ABSL_FLAG(bool, allow_future, false,
          "close-period: accept an --as-of in the future (invoices periods not yet ended)");
ABSL_FLAG(uint64_t, seed, 1, "Seed for organization ids and event mix (same seed, same events)");

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

absl::StatusOr<CommandLine> ParseCommandLine(const Subcommand& command, int argc, char** argv) {
  CommandLine line;
  if (absl::Status env = ApplyEnvironment(command, line); !env.ok()) return env;
  // --kafka-property is repeatable, so it is taken out here; the rest goes to Abseil as
  // --name=value, and a flag another command uses is refused by name.
  std::vector<std::string> args = {std::string("meterd ") + command.name};
  for (int i = 2; i < argc; ++i) {
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
