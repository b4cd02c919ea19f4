// Monthly billing metrics (shared.compute_billing_metrics) against a real Postgres: a scripted
// six-month history closed by the real close, every metric checked against values worked out
// by hand, idempotence, recomputation after a correction, roles, and the migration of rows.
#include <map>
#include <optional>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "lib/billing/billing_metrics.h"
#include "lib/billing/close_period.h"
#include "lib/store/migrations.h"
#include "tests/support/harness.h"

namespace meterd::billing {
namespace {

using MetricValues = std::map<std::string, std::string>;  // metric -> value as Postgres prints it.

std::string Org(int n) { return absl::StrFormat("00000000-0000-4000-8000-%012d", n); }
std::string Micros(int64_t micros) { return absl::StrCat(micros); }

class BillingMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("metrics_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    conn_ = std::make_unique<pqxx::connection>(url_);
  }

  int64_t Exec(const std::string& sql) {
    pqxx::work tx(*conn_);
    const int64_t rows = tx.exec(sql).affected_rows();
    tx.commit();
    return rows;
  }
  int64_t Int(const std::string& sql) { return testing::QueryInt(url_, sql); }

  void AddOrg(const std::string& org, const std::string& industry) {
    Exec(absl::StrCat("INSERT INTO shared.organizations VALUES ('", org, "', 'Org ", org, "', '",
                      industry, "')"));
    industry_[org] = industry;
  }
  // A monthly subscription whose first period is the calendar month starting on `first_day`.
  void Subscribe(const std::string& org, const std::string& plan, const std::string& first_day) {
    Exec(
        absl::StrCat("INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
                     "current_period_end) VALUES ('",
                     org, "', '", plan, "', '", first_day, "T00:00:00Z', ('", first_day,
                     "'::date + interval '1 month')::timestamp AT TIME ZONE 'UTC')"));
  }
  // What the Kafka path writes: a daily bucket.
  void Usage(const std::string& org, const std::string& meter, int64_t quantity,
             const std::string& day) {
    Exec(absl::StrCat(
        "INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity) "
        "VALUES ('",
        org, "', '", meter, "', '", industry_[org], "', '", day, "', ", quantity,
        ") ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE "
        "SET quantity = m.quantity + EXCLUDED.quantity"));
  }
  void Cancel(const std::string& org, const std::string& at) {
    Exec(absl::StrCat("UPDATE shared.subscriptions SET status = 'canceled', canceled_at = '", at,
                      "' WHERE org_id = '", org, "' AND status <> 'ended'"));
  }
  void Close(const std::string& as_of) {
    absl::Time t;
    std::string error;
    ASSERT_TRUE(absl::ParseTime(absl::RFC3339_full, as_of, &t, &error)) << error;
    auto summary = ClosePeriods(url_, t);
    ASSERT_TRUE(summary.ok()) << summary.status();
    EXPECT_TRUE(summary->failures.empty()) << CloseSummaryJson(*summary);
  }
  // A payment of the org's invoice for the period starting on `period_start`.
  void Pay(const std::string& org, const std::string& period_start, const std::string& status,
           const std::string& created_at) {
    EXPECT_EQ(
        Exec(absl::StrCat("INSERT INTO shared.payments (org_id, invoice_id, amount_micros, status, "
                          "created_at) SELECT org_id, invoice_id, total_micros, '",
                          status, "', '", created_at, "' FROM shared.invoices WHERE org_id = '",
                          org, "' AND period_start = '", period_start, "T00:00:00Z'")),
        1)
        << org << " " << period_start;
  }
  int64_t Compute(const std::string& through) {
    absl::CivilDay day;
    EXPECT_TRUE(absl::ParseCivilTime(through, &day)) << through;
    auto computed = ComputeBillingMetrics(url_, day);
    EXPECT_TRUE(computed.ok()) << computed.status();
    return computed.ok() ? *computed : -1;
  }
  MetricValues Read(const std::string& month, const std::string& segment) {
    pqxx::read_transaction tx(*conn_);
    MetricValues out;
    for (const auto& row : tx.exec_params("SELECT metric, value::text FROM shared.billing_metrics "
                                          "WHERE metric_date = $1::date AND segment = $2",
                                          month, segment)) {
      out[row[0].as<std::string>()] = row[1].as<std::string>();
    }
    return out;
  }
  // Exactly `expected`: a metric missing, extra or different fails, each on its own line.
  void ExpectMetrics(const std::string& month, const std::string& segment,
                     const MetricValues& expected) {
    const MetricValues actual = Read(month, segment);
    for (const auto& [metric, value] : expected) {
      auto it = actual.find(metric);
      EXPECT_EQ(it == actual.end() ? "(not written)" : it->second, value)
          << month << " " << segment << " " << metric;
    }
    for (const auto& [metric, value] : actual) {
      EXPECT_TRUE(expected.contains(metric))
          << month << " " << segment << " " << metric << " = " << value << " not expected";
    }
  }
  // Every row, computed_at included.
  std::vector<std::string> Rows() {
    pqxx::read_transaction tx(*conn_);
    std::vector<std::string> rows;
    for (const auto& row :
         tx.exec("SELECT concat_ws(' ', metric_date, segment, metric, value, computed_at) "
                 "FROM shared.billing_metrics ORDER BY metric_date, segment, metric")) {
      rows.push_back(row[0].as<std::string>());
    }
    return rows;
  }

  std::string url_;
  std::unique_ptr<pqxx::connection> conn_;
  std::map<std::string, std::string> industry_;
};

// January to June 2026, closed month by month (closes on the 1st, in arrears):
//   A hs basic, all six months; its February invoice is voided (excluded), so the March close
//     bills February's usage again as an adjustment line (+$5).
//   B hs basic, upgraded to pro during March (March is billed at pro).
//   C rest pro, canceled on March 10: March is its last invoice (churned in April).
//   D rest enterprise, all six months, over quota most months, 10 data exports in February.
//   E hs pro, canceled on April 20: April is its last invoice (churned in May).
//   F rest basic, joins in March.
//   G auto, a $1,200 yearly plan starting in June. Its invoice is inserted directly: the close
//     bills in arrears, so a yearly period starting in June is invoiced in June 2027.
// Invoice totals (usage over the included quantity at $0.01 a call):
//        A             B           C           D                E           F        G
//   Jan  50            50          150         500+50=550       150         -        -
//   Feb  55 (void)     50+3=53     150+20=170  500+1 export=501 150         -        -
//   Mar  50+5 adj=55   150 (pro)   150         500+100=600      150+10=160  50       -
//   Apr  50+2=52       150+10=160  -           500+20=520       150         50+1=51  -
//   May  50            150         -           500              -           50       -
//   Jun  50+10=60      150+5=155   -           500+10=510       -           50+20=70 1200
// Payments (by created_at, UTC): Feb 4 succeeded, 1 failed; Mar 2 succeeded, 1 refunded,
// 2 failed, 1 pending; Apr 6 succeeded (one at 00:30 UTC on April 1, still March in New York),
// 1 failed; May 1 pending.
TEST_F(BillingMetricsTest, SixMonthHistory) {
  const std::string a = Org(1), b = Org(2), c = Org(3), d = Org(4), e = Org(5), f = Org(6),
                    g = Org(7);
  AddOrg(a, "hs");
  AddOrg(b, "hs");
  AddOrg(c, "rest");
  AddOrg(d, "rest");
  AddOrg(e, "hs");
  AddOrg(f, "rest");
  AddOrg(g, "auto");
  Subscribe(a, "basic", "2026-01-01");
  Subscribe(b, "basic", "2026-01-01");
  Subscribe(c, "pro", "2026-01-01");
  Subscribe(d, "enterprise", "2026-01-01");
  Subscribe(e, "pro", "2026-01-01");
  const std::vector<std::pair<std::string, std::vector<int64_t>>> calls = {
      {a, {800, 1'500, 1'000, 1'200, 900, 2'000}},
      {b, {1'000, 1'300, 4'000, 6'000, 5'000, 5'500}},
      {c, {5'000, 7'000, 3'000}},
      {d, {25'000, 20'000, 30'000, 22'000, 18'000, 21'000}},
      {e, {4'000, 5'000, 6'000, 2'000}},
  };
  for (const auto& [org, per_month] : calls) {
    for (size_t m = 0; m < per_month.size(); ++m) {
      Usage(org, "api_calls", per_month[m], absl::StrFormat("2026-%02d-05", m + 1));
    }
  }
  Usage(d, "data_exports", 10, "2026-02-11");
  const std::vector<int64_t> f_calls = {500, 1'100, 1'000, 3'000};  // March to June.
  for (size_t m = 0; m < f_calls.size(); ++m) {
    Usage(f, "api_calls", f_calls[m], absl::StrFormat("2026-%02d-05", m + 3));
  }

  Close("2026-02-01T00:00:00Z");  // January.
  Pay(a, "2026-01-01", "succeeded", "2026-02-03T10:00:00Z");
  Pay(b, "2026-01-01", "succeeded", "2026-02-03T10:00:00Z");
  Pay(c, "2026-01-01", "failed", "2026-02-03T10:00:00Z");
  Pay(d, "2026-01-01", "succeeded", "2026-02-04T10:00:00Z");
  Pay(e, "2026-01-01", "succeeded", "2026-02-05T10:00:00Z");
  Close("2026-03-01T00:00:00Z");  // February.
  Exec("UPDATE shared.invoices SET status = 'void' WHERE org_id = '" + a +
       "' AND period_start = '2026-02-01T00:00:00Z'");
  Exec("UPDATE shared.subscriptions SET plan_id = 'pro' WHERE org_id = '" + b + "'");
  Cancel(c, "2026-03-10T00:00:00Z");
  Subscribe(f, "basic", "2026-03-01");
  Pay(b, "2026-02-01", "succeeded", "2026-03-02T10:00:00Z");
  Pay(e, "2026-02-01", "succeeded", "2026-03-02T10:00:00Z");
  Pay(d, "2026-02-01", "refunded", "2026-03-03T10:00:00Z");
  Pay(c, "2026-02-01", "failed", "2026-03-02T10:00:00Z");
  Pay(c, "2026-02-01", "failed", "2026-03-09T10:00:00Z");
  Pay(c, "2026-02-01", "pending", "2026-03-20T10:00:00Z");
  Close("2026-04-01T00:00:00Z");  // March.
  Cancel(e, "2026-04-20T00:00:00Z");
  Pay(c, "2026-02-01", "succeeded", "2026-04-01T00:30:00Z");
  Pay(a, "2026-03-01", "succeeded", "2026-04-02T10:00:00Z");
  Pay(b, "2026-03-01", "succeeded", "2026-04-02T10:00:00Z");
  Pay(c, "2026-03-01", "succeeded", "2026-04-02T10:00:00Z");
  Pay(d, "2026-03-01", "succeeded", "2026-04-02T10:00:00Z");
  Pay(f, "2026-03-01", "succeeded", "2026-04-02T10:00:00Z");
  Pay(e, "2026-03-01", "failed", "2026-04-02T10:00:00Z");
  Close("2026-05-01T00:00:00Z");  // April.
  Pay(e, "2026-04-01", "pending", "2026-05-02T10:00:00Z");
  Close("2026-06-01T00:00:00Z");  // May.
  Close("2026-07-01T00:00:00Z");  // June.
  Exec(
      "INSERT INTO shared.subscription_plans (plan_id, name, base_price_micros, "
      "billing_interval) VALUES ('annual', 'Annual', 1200000000, interval '1 year')");
  Subscribe(g, "annual", "2026-06-01");
  Exec(
      "UPDATE shared.subscriptions SET current_period_end = '2027-06-01T00:00:00Z' "
      "WHERE org_id = '" +
      g + "'");
  Exec(
      "WITH i AS (INSERT INTO shared.invoices (org_id, subscription_id, plan_id, period_start, "
      "period_end, total_micros) SELECT org_id, subscription_id, plan_id, current_period_start, "
      "current_period_end, 1200000000 FROM shared.subscriptions WHERE org_id = '" +
      g +
      "' RETURNING invoice_id, org_id) "
      "INSERT INTO shared.invoice_lines (invoice_id, org_id, kind, quantity, amount_micros, "
      "description) SELECT invoice_id, org_id, 'base_fee', 1, 1200000000, 'Annual plan' FROM i");

  // The history is what the table above says (the close priced it, not this test).
  const std::vector<std::pair<std::string, std::vector<int64_t>>> totals = {
      {a, {50, 55, 55, 52, 50, 60}},   {b, {50, 53, 150, 160, 150, 155}},
      {c, {150, 170, 150, 0, 0, 0}},   {d, {550, 501, 600, 520, 500, 510}},
      {e, {150, 150, 160, 150, 0, 0}}, {f, {0, 0, 50, 51, 50, 70}},
      {g, {0, 0, 0, 0, 0, 1'200}},
  };
  for (const auto& [org, dollars] : totals) {
    for (size_t m = 0; m < dollars.size(); ++m) {
      EXPECT_EQ(Int(absl::StrFormat("SELECT sum(total_micros) FROM shared.invoices WHERE org_id "
                                    "= '%s' AND period_start = '2026-%02d-01T00:00:00Z'",
                                    org, m + 1)),
                dollars[m] * 1'000'000)
          << org << " month " << m + 1;
    }
  }
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices WHERE status = 'void'"), 1);
  EXPECT_EQ(Int("SELECT amount_micros FROM shared.invoice_lines WHERE kind = 'adjustment'"),
            5'000'000);

  // 6 months x (all + 6 industries) x the 4 metrics always written, plus the ratios whose
  // denominators are not 0 (listed below): all 2+8+7+8+6+5, hs and rest 2+5+5+5+5+5 each, auto
  // 2 in June.
  const int64_t computed = Compute("2026-06-30");
  EXPECT_EQ(computed, 6 * 7 * 4 + 36 + 27 + 27 + 2);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_metrics"), computed);

  // January: the first month. No month before it, so no churn, retention, NRR or LTV, and no
  // payment was made in it.
  ExpectMetrics("2026-01-01", "all",
                {
                    {"revenue", Micros(950'000'000)},  // 50+50+150+550+150
                    {"mrr", Micros(900'000'000)},      // 50+50+150+500+150 base fees
                    {"arr", Micros(10'800'000'000)},   // 12 x 900
                    {"active_customers", "5"},         // A B C D E
                    {"arpa", Micros(190'000'000)},     // 950 / 5
                    {"overage_share", "0.052632"},     // D's 50 / 950
                });
  // February: A's invoice is void, so A is neither revenue nor active.
  ExpectMetrics("2026-02-01", "all",
                {
                    {"revenue", Micros(874'000'000)},      // 53+170+501+150
                    {"mrr", Micros(850'000'000)},          // 50+150+500+150
                    {"arr", Micros(10'200'000'000)},       // 12 x 850
                    {"active_customers", "4"},             // B C D E
                    {"arpa", Micros(218'500'000)},         // 874 / 4
                    {"logo_churn", "0.200000"},            // A of A B C D E
                    {"logo_retention", "0.800000"},        // 1 - 1/5
                    {"nrr", "0.920000"},                   // (0+53+170+501+150) / 950
                    {"ltv", Micros(1'092'500'000)},        // 218.5 / 0.2
                    {"payment_success_rate", "0.800000"},  // 4 / (4+1)
                    {"payment_failure_rate", "0.200000"},  // 1 / 5
                    {"overage_share", "0.027460"},         // (3+20+1) / 874
                });
  // March: A is back, with February's usage as an adjustment; F joins; B pays pro.
  ExpectMetrics("2026-03-01", "all",
                {
                    {"revenue", Micros(1'165'000'000)},    // 55+150+150+600+160+50
                    {"mrr", Micros(1'050'000'000)},        // 50+150+150+500+150+50
                    {"arr", Micros(12'600'000'000)},       // 12 x 1050
                    {"active_customers", "6"},             // A B C D E F
                    {"arpa", Micros(194'166'667)},         // 1165 / 6 = 194.1666..
                    {"logo_churn", "0.000000"},            // B C D E all still active
                    {"logo_retention", "1.000000"},        // 1 - 0
                    {"nrr", "1.212815"},                   // (150+150+600+160) / 874
                    {"payment_success_rate", "0.600000"},  // (2 + 1 refunded) / (3+2)
                    {"payment_failure_rate", "0.400000"},  // 2 / 5; pending left out
                    {"overage_share", "0.098712"},         // (5 adj+100+10) / 1165
                });
  // April: C churned (canceled in March).
  ExpectMetrics("2026-04-01", "all",
                {
                    {"revenue", Micros(933'000'000)},      // 52+160+520+150+51
                    {"mrr", Micros(900'000'000)},          // 50+150+500+150+50
                    {"arr", Micros(10'800'000'000)},       // 12 x 900
                    {"active_customers", "5"},             // A B D E F
                    {"arpa", Micros(186'600'000)},         // 933 / 5
                    {"logo_churn", "0.166667"},            // C of A B C D E F
                    {"logo_retention", "0.833333"},        // 5/6
                    {"nrr", "0.800858"},                   // (52+160+0+520+150+51) / 1165
                    {"ltv", Micros(1'119'600'000)},        // 186.6 / (1/6)
                    {"payment_success_rate", "0.857143"},  // 6 / (6+1)
                    {"payment_failure_rate", "0.142857"},  // 1 / 7
                    {"overage_share", "0.035370"},         // (2+10+20+1) / 933
                });
  // May: E churned; nobody over quota; only a pending payment (no rate).
  ExpectMetrics("2026-05-01", "all",
                {
                    {"revenue", Micros(750'000'000)},  // 50+150+500+50
                    {"mrr", Micros(750'000'000)},      // the same base fees
                    {"arr", Micros(9'000'000'000)},    // 12 x 750
                    {"active_customers", "4"},         // A B D F
                    {"arpa", Micros(187'500'000)},     // 750 / 4
                    {"logo_churn", "0.200000"},        // E of A B D E F
                    {"logo_retention", "0.800000"},    // 4/5
                    {"nrr", "0.803859"},               // 750 / 933
                    {"ltv", Micros(937'500'000)},      // 187.5 / 0.2
                    {"overage_share", "0.000000"},     // 0 / 750
                });
  // June: G's yearly fee is revenue in full, but a twelfth of it in MRR.
  ExpectMetrics("2026-06-01", "all",
                {
                    {"revenue", Micros(1'995'000'000)},  // 60+155+510+70+1200
                    {"mrr", Micros(850'000'000)},        // 50+150+500+50 + 1200/12
                    {"arr", Micros(10'200'000'000)},     // 12 x 850
                    {"active_customers", "5"},           // A B D F G
                    {"arpa", Micros(399'000'000)},       // 1995 / 5
                    {"logo_churn", "0.000000"},          // A B D F all still active
                    {"logo_retention", "1.000000"},      // 1 - 0
                    {"nrr", "1.060000"},                 // (60+155+510+70) / 750
                    {"overage_share", "0.022556"},       // (10+5+10+20) / 1995
                });

  // Per industry: hs is A B E, rest is C D F, auto is G. No LTV or payment rates there.
  ExpectMetrics("2026-02-01", "industry:hs",
                {
                    {"revenue", Micros(203'000'000)},  // B 53 + E 150 (A void)
                    {"mrr", Micros(200'000'000)},      // 50+150
                    {"arr", Micros(2'400'000'000)},    // 12 x 200
                    {"active_customers", "2"},         // B E
                    {"arpa", Micros(101'500'000)},     // 203 / 2
                    {"logo_churn", "0.333333"},        // A of A B E
                    {"logo_retention", "0.666667"},    // 2/3
                    {"nrr", "0.812000"},               // (0+53+150) / (50+50+150)
                    {"overage_share", "0.014778"},     // 3 / 203
                });
  ExpectMetrics("2026-03-01", "industry:hs",
                {
                    {"revenue", Micros(365'000'000)},  // 55+150+160
                    {"mrr", Micros(350'000'000)},      // 50+150+150
                    {"arr", Micros(4'200'000'000)},    // 12 x 350
                    {"active_customers", "3"},         // A B E
                    {"arpa", Micros(121'666'667)},     // 365 / 3 = 121.666..
                    {"logo_churn", "0.000000"},        // B E still active
                    {"logo_retention", "1.000000"},    // 1 - 0
                    {"nrr", "1.527094"},               // (150+160) / (53+150)
                    {"overage_share", "0.041096"},     // (5 adj+10) / 365
                });
  ExpectMetrics("2026-05-01", "industry:hs",
                {
                    {"revenue", Micros(200'000'000)},  // 50+150
                    {"mrr", Micros(200'000'000)},      // 50+150
                    {"arr", Micros(2'400'000'000)},    // 12 x 200
                    {"active_customers", "2"},         // A B
                    {"arpa", Micros(100'000'000)},     // 200 / 2
                    {"logo_churn", "0.333333"},        // E of A B E
                    {"logo_retention", "0.666667"},    // 2/3
                    {"nrr", "0.552486"},               // (50+150+0) / (52+160+150)
                    {"overage_share", "0.000000"},     // 0 / 200
                });
  ExpectMetrics("2026-04-01", "industry:rest",
                {
                    {"revenue", Micros(571'000'000)},  // D 520 + F 51
                    {"mrr", Micros(550'000'000)},      // 500+50
                    {"arr", Micros(6'600'000'000)},    // 12 x 550
                    {"active_customers", "2"},         // D F
                    {"arpa", Micros(285'500'000)},     // 571 / 2
                    {"logo_churn", "0.333333"},        // C of C D F
                    {"logo_retention", "0.666667"},    // 2/3
                    {"nrr", "0.713750"},               // (0+520+51) / (150+600+50)
                    {"overage_share", "0.036778"},     // (20+1) / 571
                });
  // auto's first month: no month before it in this segment, so no churn or NRR.
  ExpectMetrics("2026-06-01", "industry:auto",
                {
                    {"revenue", Micros(1'200'000'000)},  // G's yearly fee
                    {"mrr", Micros(100'000'000)},        // 1200 / 12
                    {"arr", Micros(1'200'000'000)},      // 12 x 100
                    {"active_customers", "1"},           // G
                    {"arpa", Micros(1'200'000'000)},     // 1200 / 1
                    {"overage_share", "0.000000"},       // 0 / 1200
                });
  ExpectMetrics("2026-05-01", "industry:auto",
                {{"revenue", "0"}, {"mrr", "0"}, {"arr", "0"}, {"active_customers", "0"}});
  ExpectMetrics("2026-03-01", "industry:edu",
                {{"revenue", "0"}, {"mrr", "0"}, {"arr", "0"}, {"active_customers", "0"}});
  // Nothing before the first non-void invoice's month, nor after the requested one.
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_metrics WHERE metric_date < '2026-01-01' "
                "OR metric_date > '2026-06-01'"),
            0);

  // Idempotent: a second run computes the same rows and rewrites none of them.
  const std::vector<std::string> first = Rows();
  EXPECT_EQ(Compute("2026-06-30"), computed);
  EXPECT_EQ(Rows(), first);

  // A correction is followed: with G's invoice voided, June changes, auto's June loses the
  // ratios whose denominators became 0, and only the changed rows are rewritten.
  const std::string before =
      pqxx::read_transaction(*conn_)
          .exec1("SELECT max(computed_at)::text FROM shared.billing_metrics")[0]
          .as<std::string>();
  Exec("UPDATE shared.invoices SET status = 'void' WHERE org_id = '" + g + "'");
  EXPECT_EQ(Compute("2026-06-30"), computed - 2);
  ExpectMetrics("2026-06-01", "all",
                {
                    {"revenue", Micros(795'000'000)},  // 60+155+510+70
                    {"mrr", Micros(750'000'000)},      // 50+150+500+50
                    {"arr", Micros(9'000'000'000)},    // 12 x 750
                    {"active_customers", "4"},         // A B D F
                    {"arpa", Micros(198'750'000)},     // 795 / 4
                    {"logo_churn", "0.000000"},        // unchanged
                    {"logo_retention", "1.000000"},    // unchanged
                    {"nrr", "1.060000"},               // unchanged: G was not in May
                    {"overage_share", "0.056604"},     // 45 / 795
                });
  ExpectMetrics("2026-06-01", "industry:auto",
                {{"revenue", "0"}, {"mrr", "0"}, {"arr", "0"}, {"active_customers", "0"}});
  // June all: revenue, mrr, arr, active_customers, arpa, overage_share; auto: the first four.
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_metrics WHERE computed_at > '" + before + "'"),
            10);
}

// A final invoice of late usage for an org whose subscription ended is revenue of its month,
// but does not make that org an active customer again: it churned in that month.
TEST_F(BillingMetricsTest, FinalAdjustmentInvoiceDoesNotReviveAChurnedOrg) {
  const std::string x = Org(11), y = Org(12);
  AddOrg(x, "hs");
  AddOrg(y, "hs");
  Subscribe(x, "basic", "2026-01-01");
  Subscribe(y, "basic", "2026-01-01");
  Usage(x, "api_calls", 800, "2026-01-10");
  Cancel(x, "2026-01-20T00:00:00Z");
  Close("2026-02-01T00:00:00Z");             // X and Y January, $50 each; X ends.
  Usage(x, "api_calls", 700, "2026-01-15");  // Late: 1,500 in January, 500 over quota.
  Close("2026-02-02T00:00:00Z");             // X's final invoice: $5, dated February 2.
  Close("2026-03-01T00:00:00Z");             // Y February.
  Close("2026-04-01T00:00:00Z");             // Y March.
  EXPECT_EQ(Int("SELECT total_micros FROM shared.invoices WHERE kind = 'adjustment' AND "
                "period_start = '2026-02-02T00:00:00Z'"),
            5'000'000);
  // 3 months x 7 segments x 4, plus the ratios of all (2+6+5) and hs (2+5+5: no LTV).
  EXPECT_EQ(Compute("2026-03-31"), 3 * 7 * 4 + (2 + 6 + 5) + (2 + 5 + 5));
  ExpectMetrics("2026-02-01", "all",
                {
                    {"revenue", Micros(55'000'000)},  // Y 50 + X's final 5
                    {"mrr", Micros(50'000'000)},      // Y's base fee
                    {"arr", Micros(600'000'000)},     // 12 x 50
                    {"active_customers", "1"},        // Y only, not X
                    {"arpa", Micros(55'000'000)},     // 55 / 1
                    {"logo_churn", "0.500000"},       // X of X Y
                    {"logo_retention", "0.500000"},   // 1 - 1/2
                    {"nrr", "0.550000"},              // (X 5 + Y 50) / (50+50)
                    {"ltv", Micros(110'000'000)},     // 55 / 0.5
                    {"overage_share", "0.090909"},    // 5 / 55
                });
  ExpectMetrics("2026-03-01", "all",
                {
                    {"revenue", Micros(50'000'000)},  // Y
                    {"mrr", Micros(50'000'000)},      // Y
                    {"arr", Micros(600'000'000)},     // 12 x 50
                    {"active_customers", "1"},        // Y
                    {"arpa", Micros(50'000'000)},     // 50 / 1
                    {"logo_churn", "0.000000"},       // Y of Y (X left in February)
                    {"logo_retention", "1.000000"},   // 1 - 0
                    {"nrr", "1.000000"},              // Y 50 / Y 50
                    {"overage_share", "0.000000"},    // 0 / 50
                });
}

// The months start at the first non-void invoice: a voided first invoice is no month of its
// own, and the month after it has no month before it (no churn, retention, NRR or LTV).
TEST_F(BillingMetricsTest, MonthsStartAtTheFirstNonVoidInvoice) {
  AddOrg(Org(31), "payroll");
  Subscribe(Org(31), "basic", "2025-12-01");
  Close("2026-01-01T00:00:00Z");
  Exec("UPDATE shared.invoices SET status = 'void'");
  Close("2026-02-01T00:00:00Z");
  EXPECT_EQ(Compute("2026-01-31"), 7 * 4 + 2 * 2);  // arpa and overage_share: all, payroll.
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_metrics WHERE metric_date <> '2026-01-01'"),
            0);
  ExpectMetrics("2026-01-01", "all",
                {{"revenue", Micros(50'000'000)},
                 {"mrr", Micros(50'000'000)},
                 {"arr", Micros(600'000'000)},
                 {"active_customers", "1"},
                 {"arpa", Micros(50'000'000)},
                 {"overage_share", "0.000000"}});
}

// Like the close: the cron role (meterd) and the back office compute; meterd still cannot
// read the admin-only table, and a tenant cannot compute at all.
TEST_F(BillingMetricsTest, OnlyTheCloseRoleAndTheBackOfficeCompute) {
  AddOrg(Org(21), "edu");
  Subscribe(Org(21), "basic", "2026-01-01");
  Close("2026-02-01T00:00:00Z");
  for (const char* role : {"meterd", "meterd_admin"}) {
    pqxx::work tx(*conn_);
    tx.exec0(std::string("SET LOCAL ROLE ") + role);
    EXPECT_EQ(tx.exec1("SELECT shared.compute_billing_metrics('2026-01-31')")[0].as<int>(),
              7 * 4 + 2 * 2)
        << role;  // 4 metrics x 7 segments, plus arpa and overage_share of all and edu.
    tx.commit();
  }
  {
    pqxx::work tx(*conn_);
    tx.exec0("SET LOCAL ROLE meterd");
    EXPECT_THROW(tx.exec("SELECT * FROM shared.billing_metrics"), pqxx::insufficient_privilege);
  }
  {
    pqxx::work tx(*conn_);
    tx.exec0("SET LOCAL ROLE meterd_org");
    EXPECT_THROW(tx.exec("SELECT shared.compute_billing_metrics('2026-01-31')"),
                 pqxx::insufficient_privilege);
  }
  ExpectMetrics("2026-01-01", "industry:edu",
                {{"revenue", Micros(50'000'000)},
                 {"mrr", Micros(50'000'000)},
                 {"arr", Micros(600'000'000)},
                 {"active_customers", "1"},
                 {"arpa", Micros(50'000'000)},
                 {"overage_share", "0.000000"}});
}

// Rows written before 0020 move to the 'all' segment; the key now includes the segment.
TEST(BillingMetricsMigrationTest, ExistingRowsMoveToTheAllSegment) {
  const std::string url = testing::SharedPostgres().CreateDatabase("metrics_migration");
  {
    pqxx::connection conn(url);
    pqxx::work tx(conn);
    // What ApplyMigrations would have done before 0020 existed.
    tx.exec0(
        "CREATE SCHEMA shared; CREATE TABLE shared.schema_migrations (version integer PRIMARY "
        "KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())");
    for (const store::Migration& m : store::EmbeddedMigrations()) {
      if (m.version >= 20) break;
      tx.exec0(m.sql);
      tx.exec_params0("INSERT INTO shared.schema_migrations (version, name) VALUES ($1, $2)",
                      m.version, std::string(m.name));
    }
    tx.exec0("INSERT INTO shared.billing_metrics VALUES ('2025-12-01', 'mrr', 900000000)");
    tx.commit();
  }
  auto applied = store::ApplyMigrations(url);
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_GE(*applied, 1);
  pqxx::connection conn(url);
  pqxx::work tx(conn);
  auto row = tx.exec1(
      "SELECT segment, value::text, computed_at IS NOT NULL FROM shared.billing_metrics "
      "WHERE metric_date = '2025-12-01' AND metric = 'mrr'");
  EXPECT_EQ(row[0].as<std::string>(), "all");
  EXPECT_EQ(row[1].as<std::string>(), "900000000");
  EXPECT_TRUE(row[2].as<bool>());
  EXPECT_EQ(tx.exec1("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = "
                     "'shared.billing_metrics'::regclass AND contype = 'p'")[0]
                .as<std::string>(),
            "PRIMARY KEY (metric_date, metric, segment)");
  tx.exec0(
      "INSERT INTO shared.billing_metrics (metric_date, metric, segment, value) "
      "VALUES ('2025-12-01', 'mrr', 'industry:hs', 500000000)");
}

}  // namespace
}  // namespace meterd::billing
