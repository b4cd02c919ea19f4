#include "lib/billing/billing_metrics.h"

#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::billing {

absl::StatusOr<int64_t> ComputeBillingMetrics(const std::string& conninfo, absl::CivilDay through) {
  ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo));
  int64_t computed = 0;
  RETURN_IF_ERROR(store::CatchPq([&]() -> absl::Status {
    pqxx::work tx(*conn);
    computed = tx.exec_params1("SELECT shared.compute_billing_metrics($1::date)",
                               absl::FormatCivilTime(through))[0]
                   .as<int64_t>();
    tx.commit();
    return absl::OkStatus();
  }));
  return computed;
}

}  // namespace meterd::billing
