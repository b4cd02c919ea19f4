#include "lib/billing/close_period.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::billing {

absl::StatusOr<CloseSummary> ClosePeriods(const std::string& conninfo, absl::Time as_of) {
  ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo));
  CloseSummary summary;
  RETURN_IF_ERROR(store::CatchPq([&]() -> absl::Status {
    pqxx::work tx(*conn);
    const std::string as_of_text =
        absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", as_of, absl::UTCTimeZone());
    summary.invoices_created =
        tx.exec_params1("SELECT shared.reset_monthly_usage($1::timestamptz)", as_of_text)[0]
            .as<int64_t>();
    // Invoices created by this transaction carry its start time.
    for (const auto& row :
         tx.exec("SELECT i.plan_id, count(DISTINCT i.invoice_id), "
                 "coalesce(sum(l.amount_micros), 0), "
                 "coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'base_fee'), 0), "
                 "coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'usage'), 0), "
                 "coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'adjustment'), 0) "
                 "FROM shared.invoices i JOIN shared.invoice_lines l USING (invoice_id) "
                 "WHERE i.created_at = now() GROUP BY i.plan_id ORDER BY i.plan_id")) {
      PlanInvoices& p = summary.by_plan[row[0].as<std::string>()];
      p.invoices = row[1].as<int64_t>();
      p.total_micros = row[2].as<int64_t>();
      p.base_micros = row[3].as<int64_t>();
      p.usage_micros = row[4].as<int64_t>();
      p.adjustment_micros = row[5].as<int64_t>();
    }
    tx.commit();
    return absl::OkStatus();
  }));
  return summary;
}

std::string CloseSummaryJson(const CloseSummary& summary) {
  std::string plans;
  for (const auto& [plan, p] : summary.by_plan) {
    absl::StrAppend(&plans, plans.empty() ? "" : ",",
                    absl::StrFormat(R"("%s":{"invoices":%d,"total_micros":%d,"base_micros":%d,)"
                                    R"("usage_micros":%d,"adjustment_micros":%d})",
                                    plan, p.invoices, p.total_micros, p.base_micros, p.usage_micros,
                                    p.adjustment_micros));
  }
  return absl::StrFormat(R"({"invoices_created":%d,"by_plan":{%s}})", summary.invoices_created,
                         plans);
}

std::string FormatDollars(int64_t micros) {
  const bool negative = micros < 0;
  const int64_t cents = (std::llabs(micros) + 5'000) / 10'000;
  const std::string digits = absl::StrCat(cents / 100);
  std::string whole;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) whole += ',';
    whole += digits[i];
  }
  return absl::StrFormat("%s$%s.%02d", negative ? "-" : "", whole, cents % 100);
}

}  // namespace meterd::billing
