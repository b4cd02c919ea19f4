#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/numeric/int128.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::billing {

// Sums over many invoices: 128-bit, since each invoice may be up to int64 micros.
struct PlanInvoices {
  int64_t invoices = 0;
  absl::int128 total_micros = 0;
  absl::int128 base_micros = 0;
  absl::int128 usage_micros = 0;
  absl::int128 adjustment_micros = 0;
};

// A subscription period this run could not invoice (shared.billing_close_failures).
struct CloseFailure {
  std::string org_id;
  int64_t subscription_id = 0;
  std::string period_start;  // RFC 3339, UTC.
  std::string reason;
};

struct CloseSummary {
  int64_t invoices_created = 0;
  std::map<std::string, PlanInvoices> by_plan;  // Of the invoices this run created.
  std::vector<CloseFailure> failures;           // Every other subscription was still closed.
};

// Closes every subscription period that ended by `as_of` (shared.reset_monthly_usage) and
// summarises the invoices it created. Idempotent: a second run creates nothing. A
// subscription that cannot be invoiced does not fail the call: it is in `failures` (and in
// shared.billing_close_failures) and every other one is invoiced.
absl::StatusOr<CloseSummary> ClosePeriods(const std::string& conninfo, absl::Time as_of);

// Raises shared.billing_settings.late_window to at least `late_window` (never lowers it), so
// the close looks back as far as events are accepted.
absl::Status RecordLateWindow(const std::string& conninfo, absl::Duration late_window);

std::string CloseSummaryJson(const CloseSummary& summary);
// OK when every due period was invoiced; otherwise one line naming the failed orgs.
absl::Status FailuresStatus(const CloseSummary& summary);
// Money as "$1,234.56" from micros (rounded half away from zero to cents).
std::string FormatDollars(absl::int128 micros);

}  // namespace meterd::billing
