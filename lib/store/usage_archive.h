#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::store {

// One month moved out of the hot shared.api_usage_meters into shared.api_usage_meters_YYYY_MM
// (migration 0027).
struct ArchivedMonth {
  std::string month;  // First day, YYYY-MM-DD.
  int64_t rows = 0;   // Rows moved by this run.
};

// Archives every month whose last day is older than the late window and which still has rows
// in the hot table, oldest first, in committed batches of `batch_rows` (each batch atomic: a
// reader sees a row in the hot table or in its month's table, never both or neither). Totals
// are unchanged. `now` is the reference for the late window (the tests pass a fixed time).
// Connects on its own; safe while `meterd run` is running.
absl::StatusOr<std::vector<ArchivedMonth>> ArchiveUsage(const std::string& conninfo, absl::Time now,
                                                        int batch_rows);

// One line of JSON: {"months":[{"month":"2026-08-01","rows":N},...],"rows":TOTAL}.
std::string ArchiveSummaryJson(const std::vector<ArchivedMonth>& months);

}  // namespace meterd::store
