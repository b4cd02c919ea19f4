#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/event/event_parser.h"

namespace meterd::store {

struct ReplayOptions {
  // Rows with this shared.rejected_events.reason code are replayed; any other code is refused.
  std::string reason;
  // Only rows rejected at or after this time.
  absl::Time since = absl::InfinitePast();
  // The window events must fall in, as `meterd run` applies it (a wider late window lets
  // time_too_old rows count).
  event::ParseLimits limits;
  // Rows per transaction: bounds memory and lock time.
  int chunk_rows = 5'000;
};

struct ReplaySummary {
  int64_t rows_examined = 0;
  int64_t rows_replayed = 0;  // Counted now, and marked replayed_at.
  int64_t events_counted = 0;
  int64_t quantity_counted = 0;
  // Events whose (source, id) this replay had already counted from another row: not counted.
  int64_t duplicates = 0;
  // Rows that still fail, by the reason they fail with now; they stay unreplayed.
  std::map<std::string, int64_t> still_rejected;
  // raw_truncated rows: their bytes are incomplete, so they can never be counted.
  int64_t truncated = 0;
};

// Counts, exactly once, the events of unreplayed shared.rejected_events rows of one reason
// that parse now, with the meters shared.meters holds now: what makes a meter inserted after
// its first events, or a raised max_event_quantity, bill what was refused.
//
// Each chunk is ONE transaction: the rows are locked (FOR UPDATE, re-checking replayed_at IS
// NULL, so concurrent replays and re-runs never count a row twice), their events are added to
// shared.api_usage_meters (one upsert row per distinct key, in the fold's key order: directly,
// not through the usage delta log), and exactly the counted rows get replayed_at = now(). A row's
// raw bytes are parsed as they were when refused: a whole message for not_json / empty_batch (the
// only reasons a whole batch is refused with), one event otherwise (a single message or one batch
// element); a row counts only if every event in it parses. `now` is the clock the time window is
// measured against. An unknown reason is refused before connecting, a database missing a
// migration before reading. Connects on its own; safe to run while `meterd run` is running.
absl::StatusOr<ReplaySummary> ReplayRejected(const std::string& conninfo,
                                             const ReplayOptions& options, absl::Time now);

// One line of JSON, keys in a fixed order.
// Deletes the rows of shared.rejected_events rejected more than `older_than` ago
// (shared.purge_rejected_events; InvalidArgument when that is within the late window plus 7
// days). Returns how many.
absl::StatusOr<int64_t> PurgeRejected(const std::string& conninfo, absl::Duration older_than);

std::string ReplaySummaryJson(const ReplaySummary& summary);

}  // namespace meterd::store
