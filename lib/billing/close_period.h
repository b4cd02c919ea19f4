#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::billing {

struct PlanInvoices {
  int64_t invoices = 0;
  int64_t total_micros = 0;
  int64_t base_micros = 0;
  int64_t usage_micros = 0;
  int64_t adjustment_micros = 0;
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

std::string CloseSummaryJson(const CloseSummary& summary);
// OK when every due period was invoiced; otherwise one line naming the failed orgs.
absl::Status FailuresStatus(const CloseSummary& summary);
// Money as "$1,234.56" from micros (rounded half away from zero to cents).
std::string FormatDollars(int64_t micros);

}  // namespace meterd::billing
