#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <tuple>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/event/usage_event.h"
#include "lib/kafka/client.h"

namespace meterd::devtools {

struct LoadgenOptions {
  std::string brokers;
  std::string topic;
  int64_t events = 100'000;
  int orgs = 1000;
  double malformed_share = 0;
  // Share (0..1) of valid events produced a second time, byte for byte (same source and id),
  // as a producer retrying after a timeout does; each re-send goes out a random number of
  // events later (up to a fifth of the run), so some cross a restart or a rebalance. They do
  // not add to the expected totals.
  double duplicate_share = 0;
  int days = 3;  // Event times spread over the last `days` days.
  uint64_t seed = 1;
  int64_t rate = 0;  // Events per second; 0 = as fast as possible.
  kafka::Properties kafka_properties;
  std::function<void(int64_t produced, int64_t total)> progress;  // Called about once a second.
};

// (org, meter, industry, ISO day) → quantity: what Postgres must hold after ingestion.
using ExpectedTotals =
    std::map<std::tuple<std::string, std::string, std::string, std::string>, int64_t>;

struct LoadgenResult {
  int64_t produced = 0;
  int64_t valid = 0;
  int64_t malformed = 0;
  int64_t duplicates = 0;  // Re-sends of valid events (not in the totals).
  std::map<std::string, int64_t> quantity_by_meter;
  std::map<std::string, int64_t> malformed_by_reason;
  ExpectedTotals totals;
  double seconds = 0;
  bool interrupted = false;  // SIGTERM/SIGINT: stopped early; totals cover what was produced.
};

// Deterministic organization id for index `i` under `seed` (a version-4 shaped UUID).
event::OrgId LoadgenOrgId(uint64_t seed, int i);
event::Industry LoadgenIndustry(int i);

// Produces the events and waits for every delivery; fails if any delivery failed.
absl::StatusOr<LoadgenResult> RunLoadgen(const LoadgenOptions& options);

// The summary JSON loadgen prints; the expected totals as CSV (org,meter,industry,day,quantity).
std::string SummaryJson(const LoadgenResult& result);
absl::Status WriteExpectedCsv(const LoadgenResult& result, const std::string& path);
absl::StatusOr<ExpectedTotals> ReadExpectedCsv(const std::string& path);

}  // namespace meterd::devtools
