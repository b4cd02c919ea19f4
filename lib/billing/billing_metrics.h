#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/civil_time.h"

namespace meterd::billing {

// Recomputes the monthly metrics in shared.billing_metrics (revenue, MRR, ARR, active
// customers, ARPA, logo churn and retention, NRR, LTV, payment success and failure rates,
// overage share; overall and per industry) for every month from the first invoiced one
// through the month containing `through` (UTC), with shared.compute_billing_metrics in one
// transaction. Definitions: lib/store/sql/0020_billing_metrics.sql. Idempotent: a second run
// with nothing changed in between leaves every row as it was. Returns the number of metric
// rows computed. Callable by the close-period role (meterd) and the back office.
absl::StatusOr<int64_t> ComputeBillingMetrics(const std::string& conninfo, absl::CivilDay through);

}  // namespace meterd::billing
