#include "lib/billing/close_period.h"

#include <cstdlib>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "lib/common/logging.h"
#include "lib/common/status_macros.h"
#include "lib/store/pg_connection.h"

namespace meterd::billing {
namespace {

std::string Int128Text(absl::int128 value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

std::string JsonEscape(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", static_cast<unsigned char>(c));
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

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
                 "coalesce(sum(l.amount_micros), 0)::text, "
                 "coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'base_fee'), 0)::text, "
                 "coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'usage'), 0)::text, "
                 "coalesce(sum(l.amount_micros) FILTER (WHERE l.kind = 'adjustment'), 0)::text "
                 "FROM shared.invoices i JOIN shared.invoice_lines l USING (invoice_id) "
                 "WHERE i.created_at = now() GROUP BY i.plan_id ORDER BY i.plan_id")) {
      PlanInvoices& p = summary.by_plan[row[0].as<std::string>()];
      p.invoices = row[1].as<int64_t>();
      // Each invoice fits int64 micros (checked in SQL); a sum over many may not. Reporting
      // must never be what rolls the close back.
      for (auto [column, target] : {std::pair{2, &p.total_micros},
                                    {3, &p.base_micros},
                                    {4, &p.usage_micros},
                                    {5, &p.adjustment_micros}}) {
        if (!absl::SimpleAtoi(row[column].c_str(), target)) *target = 0;
      }
    }
    for (const auto& row : tx.exec(
             "SELECT org_id::text, subscription_id, "
             "to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), reason "
             "FROM shared.billing_close_failures "
             "WHERE last_failed_at = now() AND resolved_at IS NULL "
             "ORDER BY org_id, subscription_id")) {
      summary.failures.push_back({row[0].as<std::string>(), row[1].as<int64_t>(),
                                  row[2].as<std::string>(), row[3].as<std::string>()});
      const CloseFailure& f = summary.failures.back();
      LOG_ERROR("close-period: org {} subscription {} period from {} not invoiced: {}", f.org_id,
                f.subscription_id, f.period_start, f.reason);
    }
    tx.commit();
    return absl::OkStatus();
  }));
  return summary;
}

absl::Status RecordLateWindow(const std::string& conninfo, absl::Duration late_window) {
  ASSIGN_OR_RETURN(auto conn, store::Connect(conninfo));
  return store::CatchPq([&]() -> absl::Status {
    pqxx::work tx(*conn);
    tx.exec_params1("SELECT shared.note_late_window(make_interval(secs => $1))",
                    absl::ToInt64Seconds(late_window));
    tx.commit();
    return absl::OkStatus();
  });
}

std::string CloseSummaryJson(const CloseSummary& summary) {
  std::string plans;
  for (const auto& [plan, p] : summary.by_plan) {
    absl::StrAppend(
        &plans, plans.empty() ? "" : ",",
        absl::StrFormat(R"("%s":{"invoices":%d,"total_micros":%s,"base_micros":%s,)"
                        R"("usage_micros":%s,"adjustment_micros":%s})",
                        plan, p.invoices, Int128Text(p.total_micros), Int128Text(p.base_micros),
                        Int128Text(p.usage_micros), Int128Text(p.adjustment_micros)));
  }
  std::string failures;
  for (const CloseFailure& f : summary.failures) {
    absl::StrAppend(
        &failures, failures.empty() ? "" : ",",
        absl::StrFormat(R"({"org_id":"%s","subscription_id":%d,"period_start":"%s",)"
                        R"("reason":"%s"})",
                        f.org_id, f.subscription_id, f.period_start, JsonEscape(f.reason)));
  }
  return absl::StrFormat(R"({"invoices_created":%d,"by_plan":{%s},"failures":[%s]})",
                         summary.invoices_created, plans, failures);
}

absl::Status FailuresStatus(const CloseSummary& summary) {
  if (summary.failures.empty()) return absl::OkStatus();
  std::string detail;
  constexpr size_t kNamed = 5;  // One line stays readable; the table has them all.
  for (size_t i = 0; i < summary.failures.size() && i < kNamed; ++i) {
    const CloseFailure& f = summary.failures[i];
    absl::StrAppend(&detail, i == 0 ? "" : "; ", "org ", f.org_id, " (subscription ",
                    f.subscription_id, ", period from ", f.period_start,
                    "): ", absl::StrReplaceAll(f.reason, {{"\n", " "}}));
  }
  if (summary.failures.size() > kNamed) {
    absl::StrAppend(&detail, "; and ", summary.failures.size() - kNamed, " more");
  }
  return absl::DataLossError(
      absl::StrCat(summary.failures.size(),
                   " subscription period(s) not invoiced (every other one was; see "
                   "shared.billing_close_failures): ",
                   detail));
}

std::string FormatDollars(absl::int128 micros) {
  const bool negative = micros < 0;
  const absl::int128 cents = ((negative ? -micros : micros) + 5'000) / 10'000;
  const std::string digits = Int128Text(cents / 100);
  std::string whole;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) whole += ',';
    whole += digits[i];
  }
  return absl::StrFormat("%s$%s.%02d", negative ? "-" : "", whole, static_cast<int>(cents % 100));
}

}  // namespace meterd::billing
