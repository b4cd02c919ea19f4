#pragma once

#include <map>
#include <string>

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

struct CloseSummary {
  int64_t invoices_created = 0;
  std::map<std::string, PlanInvoices> by_plan;  // Of the invoices this run created.
};

// Closes every subscription period that ended by `as_of` (shared.reset_monthly_usage) and
// summarises the invoices it created. Idempotent: a second run creates nothing.
absl::StatusOr<CloseSummary> ClosePeriods(const std::string& conninfo, absl::Time as_of);

std::string CloseSummaryJson(const CloseSummary& summary);
// Money as "$1,234.56" from micros (rounded half away from zero to cents).
std::string FormatDollars(int64_t micros);

}  // namespace meterd::billing
