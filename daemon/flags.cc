#include "daemon/flags.h"

#include <thread>

#include "absl/flags/flag.h"

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
ABSL_FLAG(std::string, expected_out, "",
          "Write the expected per-(org, meter, industry, day) totals to this CSV file");
ABSL_FLAG(int, days, 3, "Spread event times over the last N days");
ABSL_FLAG(int64_t, rate, 0, "Events per second to produce at; 0 = as fast as possible");
ABSL_FLAG(absl::Duration, startup_timeout, absl::Seconds(15),
          "How long to wait for Kafka metadata at start before failing");
ABSL_FLAG(bool, billing, true,
          "Run the overage worker: keep shared.usage_charges and quota alerts current");
ABSL_FLAG(std::string, http_listen, "",
          "Serve /metrics, /healthz, /readyz on host:port (e.g. 0.0.0.0:9464); empty: off");
ABSL_FLAG(std::string, as_of, "", "Close periods that ended by this RFC 3339 time (default: now)");
ABSL_FLAG(bool, allow_future, false,
          "close-period: accept an --as-of in the future (invoices periods not yet ended)");
ABSL_FLAG(uint64_t, seed, 1, "Seed for organization ids and event mix (same seed, same events)");
