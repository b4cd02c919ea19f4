// Billing against a real Postgres: invoice amounts to the micro-dollar, late usage, the close's
// idempotency, the documented rules, alerts under concurrency, and row-level security.
#include <thread>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/time/civil_time.h"
#include "absl/time/time.h"
#include "lib/billing/close_period.h"
#include "lib/billing/overage_worker.h"
#include "tests/support/harness.h"

namespace meterd::billing {
namespace {

std::string Org(int n) { return absl::StrFormat("00000000-0000-4000-8000-%012d", n); }

// The anchor day in `month`, or the month's last day when the month is shorter.
absl::CivilDay AnchorDayIn(absl::CivilMonth month, int anchor_day) {
  const int month_days = static_cast<int>(absl::CivilDay(month + 1) - absl::CivilDay(month));
  return absl::CivilDay(month.year(), month.month(), std::min(anchor_day, month_days));
}

absl::Time At(const std::string& rfc3339) {
  absl::Time t;
  std::string error;
  EXPECT_TRUE(absl::ParseTime(absl::RFC3339_full, rfc3339, &t, &error)) << error;
  return t;
}

class BillingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("bill_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    conn_ = std::make_unique<pqxx::connection>(url_);
  }

  void Exec(const std::string& sql) {
    pqxx::work tx(*conn_);
    tx.exec(sql);
    tx.commit();
  }
  int64_t Int(const std::string& sql) { return testing::QueryInt(url_, sql); }

  void AddOrg(const std::string& org, const std::string& industry = "hs") {
    Exec(absl::StrCat("INSERT INTO shared.organizations VALUES ('", org, "', 'Org ", org, "', '",
                      industry, "')"));
  }
  void Subscribe(const std::string& org, const std::string& plan, const std::string& start,
                 const std::string& end) {
    Exec(
        absl::StrCat("INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
                     "current_period_end) VALUES ('",
                     org, "', '", plan, "', '", start, "', '", end, "')"));
  }
  // Basic, for the current UTC calendar month (what the overage worker and alerts price).
  void SubscribeThisMonth(const std::string& org) {
    Exec(
        "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
        "current_period_end) VALUES ('" +
        org +
        "', 'basic', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', "
        "(date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE "
        "'UTC')");
  }
  // What the Kafka path writes: a daily bucket.
  void Usage(const std::string& org, const std::string& meter, int64_t quantity,
             const std::string& day, const std::string& industry = "hs") {
    Exec(absl::StrCat(
        "INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, quantity) "
        "VALUES ('",
        org, "', '", meter, "', '", industry, "', '", day, "', ", quantity,
        ") ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE "
        "SET quantity = m.quantity + EXCLUDED.quantity"));
  }
  CloseSummary Close(const std::string& as_of) {
    auto summary = ClosePeriods(url_, At(as_of));
    EXPECT_TRUE(summary.ok()) << summary.status();
    return summary.ok() ? *summary : CloseSummary{};
  }
  // `period_start` is a UTC date: the test's session runs in the server's zone, which the
  // time-zone variants of this suite set to something other than UTC.
  int64_t InvoiceTotal(const std::string& org, const std::string& period_start) {
    return Int(absl::StrCat("SELECT total_micros FROM shared.invoices WHERE org_id = '", org,
                            "' AND period_start = '", period_start, "T00:00:00Z'"));
  }

  std::string url_;
  std::unique_ptr<pqxx::connection> conn_;
};

TEST_F(BillingTest, BasicPlanInvoicesToTheMicroDollar) {
  const std::vector<std::pair<int64_t, int64_t>> calls_and_total = {{0, 50'000'000},
                                                                    {999, 50'000'000},
                                                                    {1'000, 50'000'000},
                                                                    {1'001, 50'010'000},
                                                                    {1'500, 55'000'000}};
  for (size_t i = 0; i < calls_and_total.size(); ++i) {
    AddOrg(Org(i));
    Subscribe(Org(i), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
    if (calls_and_total[i].first > 0) {
      // Split over two days and two industries: the bill sums them all.
      Usage(Org(i), "api_calls", calls_and_total[i].first / 2, "2026-10-03");
      Usage(Org(i), "api_calls", calls_and_total[i].first - calls_and_total[i].first / 2,
            "2026-10-31", "rest");
    }
  }
  Usage(Org(0), "api_calls", 5'000, "2026-11-01");  // Outside the period: not on this invoice.
  const CloseSummary summary = Close("2026-11-01T00:00:00Z");
  EXPECT_EQ(summary.invoices_created, 5);
  for (size_t i = 0; i < calls_and_total.size(); ++i) {
    EXPECT_EQ(InvoiceTotal(Org(i), "2026-10-01"), calls_and_total[i].second)
        << calls_and_total[i].first << " calls";
  }
  EXPECT_EQ(summary.by_plan.at("basic").total_micros, 5 * 50'000'000 + 10'000 + 5'000'000);
  EXPECT_EQ(FormatDollars(summary.by_plan.at("basic").total_micros), "$255.01");
}

TEST_F(BillingTest, ProWithExportsAndAiRequests) {
  AddOrg(Org(1), "payroll");
  Subscribe(Org(1), "pro", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(1), "api_calls", 5'000, "2026-10-10", "payroll");
  Usage(Org(1), "data_exports", 10, "2026-10-11", "payroll");
  Usage(Org(1), "ai_requests", 3, "2026-10-12", "payroll");
  Close("2026-11-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(1), "2026-10-01"), 150'000'000 + 1'000'000 + 150'000);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoice_lines WHERE kind = 'usage'"), 3);
  EXPECT_EQ(Int("SELECT amount_micros FROM shared.invoice_lines WHERE meter = 'data_exports'"),
            1'000'000);
}

TEST_F(BillingTest, EnterpriseOverQuota) {
  AddOrg(Org(2));
  Subscribe(Org(2), "enterprise", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(2), "api_calls", 25'000, "2026-10-20");
  Close("2026-11-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(2), "2026-10-01"), 500'000'000 + 5'000 * 10'000);
  EXPECT_EQ(Int("SELECT billable_quantity FROM shared.invoice_lines WHERE meter = 'api_calls'"),
            5'000);
}

TEST_F(BillingTest, LateUsageIsBilledOnTheNextInvoiceOnce) {
  AddOrg(Org(3));
  Subscribe(Org(3), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(3), "api_calls", 1'000, "2026-10-15");
  Close("2026-11-05T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(3), "2026-10-01"), 50'000'000);
  // Arrives after October was invoiced: 200 more calls for October, 7 AI requests too.
  Usage(Org(3), "api_calls", 200, "2026-10-31");
  Usage(Org(3), "ai_requests", 7, "2026-10-30");
  Usage(Org(3), "api_calls", 10, "2026-11-02");
  Close("2026-12-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(3), "2026-11-01"), 50'000'000 + 200 * 10'000 + 7 * 50'000);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoice_lines WHERE kind = 'adjustment'"), 2);
  EXPECT_EQ(Int("SELECT quantity FROM shared.invoice_lines WHERE kind = 'adjustment' "
                "AND meter = 'api_calls' AND usage_period_start = '2026-10-01'"),
            200);
  // Nothing new arrived: December's invoice repeats no adjustment.
  Close("2027-01-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(3), "2026-12-01"), 50'000'000);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoice_lines WHERE kind = 'adjustment'"), 2);
}

TEST_F(BillingTest, ClosingTwiceCreatesNothingNew) {
  AddOrg(Org(4));
  Subscribe(Org(4), "pro", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(4), "api_calls", 6'000, "2026-10-15");
  EXPECT_EQ(Close("2026-11-01T00:00:00Z").invoices_created, 1);
  const int64_t invoices = Int("SELECT count(*) FROM shared.invoices");
  const int64_t lines = Int("SELECT count(*) FROM shared.invoice_lines");
  const CloseSummary again = Close("2026-11-01T00:00:00Z");
  EXPECT_EQ(again.invoices_created, 0);
  EXPECT_TRUE(again.by_plan.empty());
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices"), invoices);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoice_lines"), lines);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.subscriptions WHERE current_period_start = "
                "'2026-11-01T00:00:00Z' AND current_period_end = '2026-12-01T00:00:00Z'"),
            1);
}

TEST_F(BillingTest, MissedMonthsAreCaughtUpInOneRun) {
  AddOrg(Org(5));
  Subscribe(Org(5), "basic", "2026-08-01T00:00:00Z", "2026-09-01T00:00:00Z");
  Usage(Org(5), "api_calls", 1'100, "2026-09-09");
  EXPECT_EQ(Close("2026-11-01T00:00:00Z").invoices_created, 3);
  EXPECT_EQ(InvoiceTotal(Org(5), "2026-08-01"), 50'000'000);
  EXPECT_EQ(InvoiceTotal(Org(5), "2026-09-01"), 51'000'000);
  EXPECT_EQ(InvoiceTotal(Org(5), "2026-10-01"), 50'000'000);
}

// Rule: the plan on the subscription when the period closes prices the whole period.
TEST_F(BillingTest, MidPeriodPlanChangeBillsTheWholePeriodAtTheNewPlan) {
  AddOrg(Org(6));
  Subscribe(Org(6), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(6), "api_calls", 4'000, "2026-10-05");
  Exec("UPDATE shared.subscriptions SET plan_id = 'pro' WHERE org_id = '" + Org(6) + "'");
  Close("2026-11-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(6), "2026-10-01"), 150'000'000);
}

// Rule: canceled mid-period: full base fee, usage up to and including the cancel day, then the
// subscription ends and is never invoiced again.
TEST_F(BillingTest, CanceledMidPeriodBillsUsageUntilCancelThenEnds) {
  AddOrg(Org(7));
  Subscribe(Org(7), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(7), "api_calls", 1'050, "2026-10-15");
  Usage(Org(7), "api_calls", 500, "2026-10-20");
  Exec(
      "UPDATE shared.subscriptions SET status = 'canceled', canceled_at = "
      "'2026-10-15T12:00:00Z' WHERE org_id = '" +
      Org(7) + "'");
  EXPECT_EQ(Close("2026-11-01T00:00:00Z").invoices_created, 1);
  EXPECT_EQ(InvoiceTotal(Org(7), "2026-10-01"), 50'000'000 + 50 * 10'000);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.subscriptions WHERE status = 'ended'"), 1);
  EXPECT_EQ(Close("2027-02-01T00:00:00Z").invoices_created, 0);
}

// Rule: no subscription: usage is recorded and visible, priced at basic for information, and
// never invoiced.
TEST_F(BillingTest, OrgWithoutSubscriptionIsRecordedNotInvoiced) {
  AddOrg(Org(8));
  {
    pqxx::work tx(*conn_);
    EXPECT_EQ(tx.exec1("SELECT shared.increment_api_usage('" + Org(8) + "', 'api_calls', 1200)")[0]
                  .as<int64_t>(),
              1200);
    tx.commit();
  }
  EXPECT_EQ(Close("2030-01-01T00:00:00Z").invoices_created, 0);
  pqxx::work tx(*conn_);
  auto status = tx.exec1(
      "SELECT s->>'subscribed', s->>'plan', s->>'usage_charges_micros' FROM "
      "shared.get_billing_status('" +
      Org(8) + "') s");
  EXPECT_EQ(status[0].as<std::string>(), "false");
  EXPECT_EQ(status[1].as<std::string>(), "basic");
  EXPECT_EQ(status[2].as<int64_t>(), 200 * 10'000);
  EXPECT_EQ(tx.exec1("SELECT count(*) FROM shared.usage_charges")[0].as<int>(), 0);
}

// Rule: zero usage: the base fee, and one zero line per meter.
TEST_F(BillingTest, ZeroUsageIsTheBaseFee) {
  AddOrg(Org(9));
  Subscribe(Org(9), "enterprise", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Close("2026-11-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(9), "2026-10-01"), 500'000'000);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoice_lines WHERE kind = 'usage' "
                "AND amount_micros = 0 AND quantity = 0"),
            3);
}

TEST_F(BillingTest, CalculateApiOverageFindsThePeriod) {
  AddOrg(Org(10));
  Subscribe(Org(10), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(10), "api_calls", 1'234, "2026-10-15");
  const std::string q = "SELECT amount_micros FROM shared.calculate_api_overage('" + Org(10) +
                        "', '2026-10-20') WHERE meter = 'api_calls'";
  EXPECT_EQ(Int(q), 234 * 10'000);
  Close("2026-11-01T00:00:00Z");
  EXPECT_EQ(Int(q), 234 * 10'000);  // Now found through the invoice.
}

TEST_F(BillingTest, AlertsFireOncePerThresholdUnderConcurrentFlushes) {
  const std::string org = Org(11);
  AddOrg(org);
  Exec(
      "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
      "current_period_end) VALUES ('" +
      org +
      "', 'basic', date_trunc('month', now()), "
      "date_trunc('month', now()) + interval '1 month')");
  pqxx::connection listener(url_);
  int notifications = 0;
  struct Counter : pqxx::notification_receiver {
    Counter(pqxx::connection_base& c, int* n)
        : pqxx::notification_receiver(c, "meterd_usage_alerts"), n_(n) {}
    void operator()(const std::string&, int) override { ++*n_; }
    int* n_;
  } counter(listener, &notifications);

  // Eight writers, each committing 50 flushes of 10 calls and refreshing charges, as
  // concurrent meterd instances' flushes and overage workers do.
  std::vector<std::thread> writers;
  for (int w = 0; w < 8; ++w) {
    writers.emplace_back([&] {
      pqxx::connection conn(url_);
      for (int i = 0; i < 50; ++i) {
        pqxx::work tx(conn);
        tx.exec0(
            "INSERT INTO shared.api_usage_meters AS m (org_id, meter, industry, usage_date, "
            "quantity) VALUES ('" +
            org +
            "', 'api_calls', 'hs', (now() AT TIME ZONE "
            "'UTC')::date, 10) ON CONFLICT (org_id, meter, industry, usage_date) DO UPDATE "
            "SET quantity = m.quantity + 10");
        tx.commit();
        pqxx::work refresh(conn);
        refresh.exec1("SELECT shared.refresh_usage_charges(ARRAY['" + org + "'::uuid])");
        refresh.commit();
      }
    });
  }
  for (auto& t : writers) t.join();
  EXPECT_EQ(Int("SELECT count(*) FROM shared.usage_alerts"), 2);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.usage_alerts WHERE threshold_percent = 100 AND "
                "quantity >= 1000"),
            1);
  EXPECT_EQ(Int("SELECT quantity FROM shared.usage_charges WHERE meter = 'api_calls'"), 4'000);
  for (int i = 0; i < 20 && notifications < 3; ++i) listener.await_notification(0, 100'000);
  EXPECT_EQ(notifications, 2);
}

TEST_F(BillingTest, RowLevelSecurityIsolatesOrganizations) {
  const std::string a = Org(21), b = Org(22);
  for (const std::string& org : {a, b}) {
    AddOrg(org);
    Subscribe(org, "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
    Usage(org, "api_calls", 1'500, "2026-10-10");
    Exec("INSERT INTO shared.stripe_customers VALUES ('" + org + "', 'cus_" + org + "')");
    Exec("INSERT INTO shared.payment_methods (org_id, stripe_payment_method_id) VALUES ('" + org +
         "', 'pm_" + org + "')");
    Exec("SELECT shared.track_api_request('" + org + "', '/v1/jobs', 'GET', 200, 12)");
    Exec("SELECT shared.refresh_usage_charges(ARRAY['" + org + "'::uuid])");
  }
  Close("2026-11-01T00:00:00Z");
  Exec(
      "INSERT INTO shared.payments (org_id, invoice_id, amount_micros, status) "
      "SELECT org_id, invoice_id, total_micros, 'succeeded' FROM shared.invoices");
  Exec("SELECT shared.track_api_request('" + b +
       "', '/v1/jobs', 'GET', 200, 12, 'api_calls', 900)");
  Exec("INSERT INTO shared.stripe_webhook_events VALUES ('evt_1', 'invoice.paid', '{}')");
  Exec("INSERT INTO shared.billing_metrics VALUES ('2026-10-01', 'mrr_micros', 100000000)");

  const std::vector<std::string> org_scoped = {"shared.organizations",
                                               "shared.stripe_customers",
                                               "shared.subscriptions",
                                               "shared.api_usage_meters",
                                               "shared.api_usage_logs",
                                               "shared.payment_methods",
                                               "shared.invoices",
                                               "shared.invoice_lines",
                                               "shared.payments",
                                               "shared.usage_charges",
                                               "shared.usage_alerts",
                                               "shared.organization_billing_summary",
                                               "shared.api_usage_analytics",
                                               "hs.billing_analytics"};
  {
    pqxx::work tx(*conn_);
    tx.exec0("SET LOCAL ROLE meterd_org");
    tx.exec0("SET LOCAL app.org_id = '" + a + "'");
    for (const std::string& relation : org_scoped) {
      auto counts = tx.exec1("SELECT count(*) FILTER (WHERE org_id = '" + a +
                             "'), count(*) FILTER (WHERE org_id <> '" + a + "') FROM " + relation);
      EXPECT_GE(counts[0].as<int>(), 1) << relation;
      EXPECT_EQ(counts[1].as<int>(), 0) << relation;
    }
    // Revenue summary aggregates only what the org can see: its own invoice.
    EXPECT_EQ(tx.exec1("SELECT sum(invoices) FROM shared.monthly_revenue_summary")[0].as<int>(), 1);
    // get_billing_status of another org sees none of its usage.
    EXPECT_EQ(tx.exec1("SELECT (shared.get_billing_status('" + b +
                       "')->>'usage_charges_micros')::bigint")[0]
                  .as<int64_t>(),
              0);
  }
  for (const char* secret : {"shared.stripe_webhook_events", "shared.billing_metrics"}) {
    pqxx::work tx(*conn_);
    tx.exec0("SET LOCAL ROLE meterd_org");
    tx.exec0("SET LOCAL app.org_id = '" + a + "'");
    EXPECT_THROW(tx.exec(std::string("SELECT * FROM ") + secret), pqxx::insufficient_privilege)
        << secret;
  }
  {
    pqxx::work tx(*conn_);
    tx.exec0("SET LOCAL ROLE meterd_org");  // No app.org_id at all: nothing.
    EXPECT_EQ(tx.exec1("SELECT count(*) FROM shared.api_usage_meters")[0].as<int>(), 0);
  }
  {
    pqxx::work tx(*conn_);
    tx.exec0("SET LOCAL ROLE meterd_admin");
    EXPECT_EQ(tx.exec1("SELECT count(DISTINCT org_id) FROM shared.api_usage_meters")[0].as<int>(),
              2);
    EXPECT_EQ(tx.exec1("SELECT count(*) FROM shared.stripe_webhook_events")[0].as<int>(), 1);
    EXPECT_EQ(tx.exec1("SELECT count(*) FROM shared.billing_metrics")[0].as<int>(), 1);
  }
  {
    // The daemon's own role can do its work.
    pqxx::work tx(*conn_);
    tx.exec0("SET LOCAL ROLE meterd");
    tx.exec0("INSERT INTO shared.ingest_offsets VALUES ('g', 't', 0, 10)");
    tx.exec0(
        "INSERT INTO shared.rejected_events (topic, partition, kafka_offset, reason, raw) "
        "VALUES ('t', 0, 1, 'not_json', '\\x00')");
    EXPECT_EQ(
        tx.exec1("SELECT shared.refresh_usage_charges(ARRAY['" + a + "'::uuid])")[0].as<int>(), 0);
    EXPECT_EQ(tx.exec1("SELECT count(DISTINCT org_id) FROM shared.api_usage_meters")[0].as<int>(),
              2);
  }
}

// Periods are UTC and keep their anchor day whatever the server's zone (this suite also runs
// with the server in America/New_York and Pacific/Chatham): 24+ monthly closes for anchors on
// the 1st, 15th, 29th, 30th and 31st; each invoice ends on the anchor day (or the month's last
// day when shorter), periods are contiguous, and every UTC day is billed exactly once.
TEST_F(BillingTest, PeriodsKeepTheirAnchorDayAndBillEveryUtcDayOnce) {
  const std::vector<int> anchor_days = {1, 15, 29, 30, 31};
  const absl::CivilDay first_day(2027, 1, 1), last_day(2029, 3, 31);
  for (size_t i = 0; i < anchor_days.size(); ++i) {
    const std::string org = Org(100 + i);
    AddOrg(org);
    const absl::CivilDay anchor(2027, 1, anchor_days[i]);
    const absl::CivilDay next_end = AnchorDayIn(absl::CivilMonth(2027, 2), anchor_days[i]);
    Subscribe(org, "basic", absl::StrFormat("%sT00:00:00Z", absl::FormatCivilTime(anchor)),
              absl::StrFormat("%sT00:00:00Z", absl::FormatCivilTime(next_end)));
    // One call on every UTC day of the range.
    Exec(absl::StrCat(
        "INSERT INTO shared.api_usage_meters (org_id, meter, industry, usage_date, quantity) "
        "SELECT '",
        org, "', 'api_calls', 'hs', d::date, 1 FROM generate_series('",
        absl::FormatCivilTime(first_day), "'::date, '", absl::FormatCivilTime(last_day),
        "'::date, '1 day') d"));
  }
  // The cron: a close on the first of every month, at midnight UTC, for 25 months.
  for (absl::CivilMonth m(2027, 2); m <= absl::CivilMonth(2029, 2); ++m) {
    Close(absl::StrFormat("%04d-%02d-01T00:00:00Z", m.year(), m.month()));
  }
  for (size_t i = 0; i < anchor_days.size(); ++i) {
    const std::string org = Org(100 + i);
    pqxx::work tx(*conn_);
    const auto rows = tx.exec(absl::StrCat(
        "SELECT to_char(i.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), "
        "to_char(i.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), l.quantity, "
        "(i.period_end AT TIME ZONE 'UTC')::date - (i.period_start AT TIME ZONE 'UTC')::date "
        "FROM shared.invoices i JOIN shared.invoice_lines l ON l.invoice_id = i.invoice_id "
        "AND l.kind = 'usage' AND l.meter = 'api_calls' WHERE i.org_id = '",
        org, "' ORDER BY i.period_start"));
    // Expected boundaries: the anchor day of each month, clamped to the month's length.
    std::vector<std::string> boundaries;
    absl::CivilDay last_boundary;
    for (absl::CivilMonth m(2027, 1); m <= absl::CivilMonth(2029, 2); ++m) {
      const absl::CivilDay day = AnchorDayIn(m, anchor_days[i]);
      if (day > absl::CivilDay(2029, 2, 1)) break;
      boundaries.push_back(absl::StrCat(absl::FormatCivilTime(day), " 00:00:00"));
      last_boundary = day;
    }
    ASSERT_EQ(rows.size(), boundaries.size() - 1) << "anchor day " << anchor_days[i];
    ASSERT_GE(rows.size(), 24u);
    int64_t days_billed = 0;
    for (size_t r = 0; r < rows.size(); ++r) {
      EXPECT_EQ(rows[r][0].as<std::string>(), boundaries[r]) << "anchor " << anchor_days[i];
      EXPECT_EQ(rows[r][1].as<std::string>(), boundaries[r + 1]) << "anchor " << anchor_days[i];
      // One call a day: the usage line counts exactly the period's days.
      EXPECT_EQ(rows[r][2].as<int64_t>(), rows[r][3].as<int64_t>()) << boundaries[r];
      days_billed += rows[r][2].as<int64_t>();
    }
    EXPECT_EQ(days_billed, last_boundary - absl::CivilDay(2027, 1, anchor_days[i]))
        << "anchor " << anchor_days[i];
    // No adjustment lines: nothing was billed twice or late.
    EXPECT_EQ(tx.exec1(absl::StrCat("SELECT count(*) FROM shared.invoice_lines WHERE org_id = '",
                                    org, "' AND kind = 'adjustment'"))[0]
                  .as<int>(),
              0);
  }
}

// A period closed by a server in any zone ends at the next anchor at midnight UTC, also
// across a DST change (New York's 2026-11-01).
TEST_F(BillingTest, NextPeriodEndsAtMidnightUtcAcrossDst) {
  AddOrg(Org(120));
  Subscribe(Org(120), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  AddOrg(Org(121));
  Subscribe(Org(121), "basic", "2027-02-01T00:00:00Z", "2027-03-01T00:00:00Z");
  Close("2026-11-01T00:00:00Z");
  Close("2027-03-01T00:00:00Z");
  EXPECT_EQ(Int("SELECT count(*) FROM shared.subscriptions WHERE (org_id = '" + Org(120) +
                "' AND current_period_end = '2027-04-01T00:00:00Z') OR (org_id = '" + Org(121) +
                "' AND current_period_end = '2027-04-01T00:00:00Z')"),
            2);
  // Every period that ended by the first of the month is closed on the first.
  EXPECT_EQ(Close("2027-04-01T00:00:00Z").invoices_created, 2);
}

// A tenant with its own SQL login, member of meterd_org: reads only its org whatever it sets,
// writes nothing directly, and records usage only for itself through the functions.
TEST_F(BillingTest, TenantLoginReadsItsOwnOrgAndWritesNothing) {
  const std::string a = Org(31), b = Org(32);
  for (const std::string& org : {a, b}) {
    AddOrg(org);
    Subscribe(org, "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
    Usage(org, "api_calls", 1'500, "2026-10-10");
    Exec("SELECT shared.refresh_usage_charges(ARRAY['" + org + "'::uuid])");
  }
  Close("2026-11-01T00:00:00Z");
  Exec(
      "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenant_a') THEN "
      "CREATE ROLE tenant_a LOGIN; END IF; "
      "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenant_stray') THEN "
      "CREATE ROLE tenant_stray LOGIN; END IF; END $$");
  Exec("GRANT meterd_org TO tenant_a, tenant_stray");
  Exec("INSERT INTO shared.org_logins (login, org_id) VALUES ('tenant_a', '" + a + "')");
  const std::string tenant_url = absl::StrReplaceAll(url_, {{"postgres@", "tenant_a@"}});
  const std::string stray_url = absl::StrReplaceAll(url_, {{"postgres@", "tenant_stray@"}});

  const std::vector<std::string> tables = {
      "shared.organizations",   "shared.subscriptions",   "shared.api_usage_meters",
      "shared.api_usage_logs",  "shared.invoices",        "shared.invoice_lines",
      "shared.usage_charges",   "shared.usage_alerts",    "shared.payments",
      "shared.payment_methods", "shared.stripe_customers"};
  pqxx::connection tenant(tenant_url);
  for (const std::string& setting : {std::string("app.org_id"), std::string("app.org")}) {
    pqxx::work tx(tenant);
    tx.exec0("SET LOCAL " + setting + " = '" + b + "'");
    for (const std::string& t : tables) {
      EXPECT_EQ(tx.exec1("SELECT count(*) FROM " + t + " WHERE org_id = '" + b + "'")[0].as<int>(),
                0)
          << t << " after setting " << setting;
    }
    EXPECT_GE(tx.exec1("SELECT count(*) FROM shared.api_usage_meters WHERE org_id = '" + a + "'")[0]
                  .as<int>(),
              1);
  }
  // Direct writes: refused on every billing and usage table, for its own org too.
  const std::vector<std::string> writes = {
      "UPDATE shared.api_usage_meters SET quantity = 0", "DELETE FROM shared.api_usage_meters",
      "INSERT INTO shared.api_usage_meters (org_id, meter, industry, usage_date, quantity) "
      "VALUES ('" +
          a + "', 'api_calls', 'hs', '2026-10-11', 1)",
      "UPDATE shared.usage_charges SET amount_micros = 0",
      "INSERT INTO shared.usage_alerts (org_id, period_start, meter, threshold_percent, quantity, "
      "included_quantity) VALUES ('" +
          a + "', now(), 'api_calls', 80, 1, 1)",
      "UPDATE shared.invoices SET total_micros = 0", "DELETE FROM shared.invoice_lines",
      "UPDATE shared.subscriptions SET plan_id = 'enterprise'",
      "INSERT INTO shared.payments (org_id, amount_micros, status) VALUES ('" + a +
          "', 1, 'succeeded')",
      "SELECT shared.refresh_usage_charges(ARRAY['" + a + "'::uuid])",
      "SELECT shared.reset_monthly_usage('2030-01-01T00:00:00Z')",
      "SELECT shared.increment_api_usage('" + b + "', 'api_calls', 5)",
      // Subscriptions: tenants read theirs (get_subscription), they never change one.
      "SELECT shared.change_subscription_plan('" + a + "', 'enterprise')",
      "SELECT shared.cancel_subscription('" + a + "', false)",
      "SELECT shared.create_subscription('" + a + "', 'pro')",
      "INSERT INTO shared.org_logins (login, org_id) VALUES ('tenant_a2', '" + b + "')"};
  for (const std::string& sql : writes) {
    pqxx::work tx(tenant);
    EXPECT_ANY_THROW(tx.exec(sql)) << sql;
  }
  // Through the function, for its own org: counted.
  {
    pqxx::work tx(tenant);
    EXPECT_EQ(
        tx.exec1("SELECT shared.increment_api_usage('" + a + "', 'api_calls', 5)")[0].as<int64_t>(),
        5);
    tx.commit();
  }
  EXPECT_EQ(Int("SELECT sum(quantity) FROM shared.api_usage_meters WHERE org_id = '" + a + "'"),
            1'505);
  EXPECT_EQ(Int("SELECT sum(quantity) FROM shared.api_usage_meters WHERE org_id = '" + b + "'"),
            1'500);
  EXPECT_EQ(InvoiceTotal(a, "2026-10-01"), 55'000'000);
  {
    pqxx::work tx(tenant);
    EXPECT_TRUE(tx.exec1("SELECT shared.get_subscription('" + a + "')")[0].as<std::string>().find(
                    "\"plan\": \"basic\"") != std::string::npos);
  }
  // A tenant login not mapped to an org sees nothing, whatever it sets.
  pqxx::connection stray(stray_url);
  pqxx::work tx(stray);
  tx.exec0("SET LOCAL app.org_id = '" + a + "'");
  for (const std::string& t : tables) {
    EXPECT_EQ(tx.exec1("SELECT count(*) FROM " + t)[0].as<int>(), 0) << t;
  }
}

// One org's usage cannot be priced (1e14 exports overflow int64 micros): every other org is
// invoiced, the failure is recorded with its reason, and the close says so.
TEST_F(BillingTest, OneOrgThatCannotBeInvoicedDoesNotBlockTheOthers) {
  for (int i = 40; i < 45; ++i) {
    AddOrg(Org(i));
    Subscribe(Org(i), "pro", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
    Usage(Org(i), "api_calls", 6'000, "2026-10-05");
  }
  Usage(Org(42), "data_exports", 100'000'000'000'000, "2026-10-06");
  auto summary = ClosePeriods(url_, At("2026-12-01T00:00:00Z"));
  ASSERT_TRUE(summary.ok()) << summary.status();
  // Four orgs, two months each; the outlier none.
  EXPECT_EQ(summary->invoices_created, 8);
  ASSERT_EQ(summary->failures.size(), 1u);
  EXPECT_EQ(summary->failures[0].org_id, Org(42));
  EXPECT_NE(summary->failures[0].reason.find("data_exports"), std::string::npos)
      << summary->failures[0].reason;
  for (int i : {40, 41, 43, 44}) {
    EXPECT_EQ(InvoiceTotal(Org(i), "2026-10-01"), 150'000'000 + 1'000 * 10'000) << i;
    EXPECT_EQ(InvoiceTotal(Org(i), "2026-11-01"), 150'000'000) << i;
  }
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices WHERE org_id = '" + Org(42) + "'"), 0);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_close_failures WHERE org_id = '" + Org(42) +
                "' AND resolved_at IS NULL AND period_start = '2026-10-01T00:00:00Z'"),
            1);
  {
    // The daemon's gauge of unresolved close failures (read by the overage worker at start).
    auto worker = OverageWorker::Create(url_, {});
    ASSERT_TRUE(worker.ok()) << worker.status();
    (*worker)->Start();
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while ((*worker)->metrics().open_close_failures->value() != 1 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(20));
    }
    EXPECT_EQ((*worker)->metrics().open_close_failures->value(), 1);
    (*worker)->Stop();
  }
  // Still failing on the next run: recorded once, attempts counted.
  auto again = ClosePeriods(url_, At("2026-12-01T00:00:00Z"));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->invoices_created, 0);
  EXPECT_EQ(again->failures.size(), 1u);
  EXPECT_EQ(Int("SELECT attempts FROM shared.billing_close_failures"), 2);
  // Fixed (the usage corrected by an operator): the next close invoices it and resolves it.
  Exec("UPDATE shared.api_usage_meters SET quantity = 3 WHERE meter = 'data_exports'");
  auto fixed = ClosePeriods(url_, At("2026-12-01T00:00:00Z"));
  ASSERT_TRUE(fixed.ok());
  EXPECT_EQ(fixed->invoices_created, 2);
  EXPECT_TRUE(fixed->failures.empty());
  EXPECT_EQ(InvoiceTotal(Org(42), "2026-10-01"), 150'000'000 + 1'000 * 10'000 + 300'000);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_close_failures WHERE resolved_at IS NULL"), 0);
}

// The close-period command: one line naming the org on stderr, non-zero exit, others invoiced.
TEST_F(BillingTest, ClosePeriodCommandExitsNonZeroNamingTheFailedOrg) {
  for (int i = 46; i < 48; ++i) {
    AddOrg(Org(i));
    Subscribe(Org(i), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  }
  Usage(Org(47), "ai_requests", 900'000'000'000'000'000, "2026-10-06");
  const std::string dir = testing::TempDir("meterd-close");
  testing::ChildProcess close(
      {testing::MeterdBinary(), "close-period", "--pg", url_, "--as-of", "2026-11-01T00:00:00Z"},
      dir + "/close.log");
  const std::string out = close.ReadAll();
  EXPECT_EQ(close.Wait(absl::Seconds(60)), 1);
  const std::string log = testing::ReadFile(dir + "/close.log");
  EXPECT_NE(log.find(Org(47)), std::string::npos) << log;
  EXPECT_NE(out.find("\"invoices_created\":1"), std::string::npos) << out;
  EXPECT_EQ(InvoiceTotal(Org(46), "2026-10-01"), 50'000'000);
}

// A close "as of" a time that has not come yet would invoice periods that have not ended.
TEST_F(BillingTest, FutureAsOfIsRefusedUnlessAllowed) {
  AddOrg(Org(45));
  Subscribe(Org(45), "basic", "2099-01-01T00:00:00Z", "2099-02-01T00:00:00Z");
  const std::string dir = testing::TempDir("meterd-future");
  {
    testing::ChildProcess close(
        {testing::MeterdBinary(), "close-period", "--pg", url_, "--as-of", "2099-03-01T00:00:00Z"},
        dir + "/refused.log");
    close.ReadAll();
    EXPECT_EQ(close.Wait(absl::Seconds(60)), 1);
    EXPECT_NE(testing::ReadFile(dir + "/refused.log").find("--allow-future"), std::string::npos);
    EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices"), 0);
  }
  testing::ChildProcess close({testing::MeterdBinary(), "close-period", "--pg", url_, "--as-of",
                               "2099-03-01T00:00:00Z", "--allow-future"},
                              dir + "/allowed.log");
  close.ReadAll();
  EXPECT_EQ(close.Wait(absl::Seconds(60)), 0);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices"), 2);  // January and February 2099.
}

// An invoice already exists for a subscription's current period (created by hand, or the
// period was moved back): the close reports it instead of skipping it silently forever.
TEST_F(BillingTest, StuckSubscriptionIsReported) {
  AddOrg(Org(48));
  AddOrg(Org(49));
  Subscribe(Org(48), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Subscribe(Org(49), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Exec(
      "INSERT INTO shared.invoices (org_id, subscription_id, plan_id, period_start, period_end) "
      "SELECT org_id, subscription_id, plan_id, current_period_start, current_period_end "
      "FROM shared.subscriptions WHERE org_id = '" +
      Org(48) + "'");
  auto summary = ClosePeriods(url_, At("2026-11-01T00:00:00Z"));
  ASSERT_TRUE(summary.ok());
  EXPECT_EQ(summary->invoices_created, 1);
  ASSERT_EQ(summary->failures.size(), 1u);
  EXPECT_EQ(summary->failures[0].org_id, Org(48));
  EXPECT_NE(summary->failures[0].reason.find("already"), std::string::npos)
      << summary->failures[0].reason;
}

// The overage worker: one org whose charges cannot be computed does not hold back the others
// and is not retried forever.
TEST_F(BillingTest, OverageWorkerIsolatesAnOrgItCannotPrice) {
  std::vector<event::OrgId> orgs;
  for (int i = 50; i < 54; ++i) {
    AddOrg(Org(i));
    SubscribeThisMonth(Org(i));
    Exec("SELECT shared.increment_api_usage('" + Org(i) + "', 'api_calls', 1200)");
    Exec("DELETE FROM shared.usage_charges");
    orgs.push_back(*event::ParseOrgId(Org(i)));
  }
  // Stored directly (increment_api_usage would refuse it: its own refresh cannot price it).
  Exec(
      "INSERT INTO shared.api_usage_meters (org_id, meter, industry, usage_date, quantity) "
      "VALUES ('" +
      Org(51) +
      "', 'data_exports', 'hs', (now() AT TIME ZONE 'UTC')::date, "
      "500000000000000)");
  Exec("DELETE FROM shared.usage_charges");
  auto worker = OverageWorker::Create(url_, {.batch_orgs = 10, .max_backoff = absl::Seconds(1)});
  ASSERT_TRUE(worker.ok()) << worker.status();
  (*worker)->Start();
  (*worker)->OrgsTouched(orgs);
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (Int("SELECT count(DISTINCT org_id) FROM shared.usage_charges") < 3 &&
         absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  absl::SleepFor(absl::Seconds(2));
  EXPECT_EQ(Int("SELECT count(DISTINCT org_id) FROM shared.usage_charges"), 3);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.usage_charges WHERE org_id = '" + Org(51) + "'"), 0);
  EXPECT_EQ((*worker)->metrics().failed_orgs->value(), 1);
  EXPECT_EQ((*worker)->metrics().pending_orgs->value(), 0);
  const int64_t failures = (*worker)->metrics().failures->value();
  absl::SleepFor(absl::Seconds(2));
  EXPECT_EQ((*worker)->metrics().failures->value(), failures) << "still retrying the outlier";
  (*worker)->Stop();
}

// Late usage for a subscription that has ended, with no live one to carry it: a final
// adjustment invoice, once.
TEST_F(BillingTest, LateUsageAfterTheLastPeriodGetsAFinalAdjustmentInvoice) {
  AddOrg(Org(60));
  Subscribe(Org(60), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(60), "api_calls", 1'000, "2026-10-15");
  Exec("UPDATE shared.subscriptions SET status = 'canceled', canceled_at = '2026-10-20T00:00:00Z'");
  EXPECT_EQ(Close("2026-11-01T00:00:00Z").invoices_created, 1);
  Usage(Org(60), "api_calls", 300, "2026-10-18");
  Close("2026-11-02T00:00:00Z");
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices WHERE kind = 'adjustment'"), 1);
  EXPECT_EQ(Int("SELECT total_micros FROM shared.invoices WHERE kind = 'adjustment'"),
            300 * 10'000);
  Close("2026-11-03T00:00:00Z");
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices"), 2);
}

// The late-usage look-back follows the ingest late window (shared.billing_settings, which
// `meterd run` raises to its --late-window), not a fixed 92 days.
TEST_F(BillingTest, LateUsageLookBackFollowsTheLateWindow) {
  AddOrg(Org(61));
  Subscribe(Org(61), "basic", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z");
  Usage(Org(61), "api_calls", 1'000, "2026-01-15");
  Close("2026-06-01T00:00:00Z");
  Exec("UPDATE shared.billing_settings SET late_window = interval '200 days'");
  Usage(Org(61), "api_calls", 40, "2026-01-20");  // 4 months late, inside a 200-day window.
  Close("2026-07-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(61), "2026-06-01"), 50'000'000 + 40 * 10'000);
}

// After a plan upgrade mid-period, alerts fire again at 80 % and 100 % of the new quota.
TEST_F(BillingTest, AlertsFollowTheQuotaInForce) {
  const std::string org = Org(62);
  AddOrg(org);
  SubscribeThisMonth(org);
  Exec("SELECT shared.increment_api_usage('" + org + "', 'api_calls', 1000)");
  EXPECT_EQ(Int("SELECT count(*) FROM shared.usage_alerts"), 2);
  Exec("UPDATE shared.subscriptions SET plan_id = 'pro'");
  Exec("SELECT shared.increment_api_usage('" + org + "', 'api_calls', 3100)");
  EXPECT_EQ(Int("SELECT count(*) FROM shared.usage_alerts WHERE included_quantity = 5000"), 1);
  Exec("SELECT shared.increment_api_usage('" + org + "', 'api_calls', 900)");
  EXPECT_EQ(Int("SELECT count(*) FROM shared.usage_alerts WHERE included_quantity = 5000"), 2);
}

// A notification carries the alert's id: a listener checks it against shared.usage_alerts
// (which only the owner roles write), so a forged pg_notify matches no row.
TEST_F(BillingTest, AlertNotificationNamesItsRow) {
  const std::string org = Org(63);
  AddOrg(org);
  SubscribeThisMonth(org);
  pqxx::connection listener(url_);
  std::vector<std::string> payloads;
  struct Receiver : pqxx::notification_receiver {
    Receiver(pqxx::connection_base& c, std::vector<std::string>* p)
        : pqxx::notification_receiver(c, "meterd_usage_alerts"), p_(p) {}
    void operator()(const std::string& payload, int) override { p_->push_back(payload); }
    std::vector<std::string>* p_;
  } receiver(listener, &payloads);
  Exec("SELECT shared.increment_api_usage('" + org + "', 'api_calls', 850)");
  for (int i = 0; i < 20 && payloads.empty(); ++i) listener.await_notification(0, 100'000);
  ASSERT_EQ(payloads.size(), 1u);
  const int64_t id = Int("SELECT alert_id FROM shared.usage_alerts");
  // Nothing else: LISTEN needs no privilege, so a tenant may hear it too; the row is read
  // with the listener's own rights.
  EXPECT_EQ(payloads[0], absl::StrCat("{\"alert_id\" : ", id, "}"));
}

// The close's summary sums many invoices: each fits int64 micros, their sum need not, and
// reporting it must not roll the close back.
TEST_F(BillingTest, SummaryOfInvoicesBeyondInt64IsReportedNotFatal) {
  for (int i = 70; i < 72; ++i) {
    AddOrg(Org(i));
    Subscribe(Org(i), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
    Usage(Org(i), "ai_requests", 184'467'440'736'095, "2026-10-03");
  }
  auto summary = ClosePeriods(url_, At("2026-11-01T00:00:00Z"));
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->invoices_created, 2);
  EXPECT_TRUE(summary->failures.empty());
  const absl::int128 each = absl::int128(184'467'440'736'095) * 50'000 + 50'000'000;
  EXPECT_EQ(summary->by_plan.at("basic").total_micros, 2 * each);
  EXPECT_NE(CloseSummaryJson(*summary).find("18446744073709500000"), std::string::npos)
      << CloseSummaryJson(*summary);
}

// A cancellation ends the subscription in the period it falls in: a catch-up close bills the
// months before it in full.
TEST_F(BillingTest, CatchUpCloseBillsTheMonthsBeforeACancellation) {
  AddOrg(Org(72));
  Subscribe(Org(72), "pro", "2026-07-01T00:00:00Z", "2026-08-01T00:00:00Z");
  Usage(Org(72), "api_calls", 6'000, "2026-07-10");
  Usage(Org(72), "api_calls", 7'000, "2026-08-10");
  Usage(Org(72), "api_calls", 5'500, "2026-09-10");
  Usage(Org(72), "api_calls", 9'000, "2026-09-20");  // After the cancel day: not billed.
  Exec(
      "UPDATE shared.subscriptions SET status = 'canceled', canceled_at = "
      "'2026-09-15T10:00:00Z'");
  EXPECT_EQ(Close("2026-10-01T00:00:00Z").invoices_created, 3);
  EXPECT_EQ(InvoiceTotal(Org(72), "2026-07-01"), 150'000'000 + 1'000 * 10'000);
  EXPECT_EQ(InvoiceTotal(Org(72), "2026-08-01"), 150'000'000 + 2'000 * 10'000);
  EXPECT_EQ(InvoiceTotal(Org(72), "2026-09-01"), 150'000'000 + 500 * 10'000);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.subscriptions WHERE status = 'ended'"), 1);
}

// canceled_at on a subscription that is not canceled (a cancellation undone, or one mirrored
// for the period end) cuts no usage.
TEST_F(BillingTest, CanceledAtWithoutCanceledStatusCutsNothing) {
  AddOrg(Org(73));
  Subscribe(Org(73), "basic", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z");
  Exec("UPDATE shared.subscriptions SET canceled_at = '2026-01-05T00:00:00Z'");
  Usage(Org(73), "api_calls", 1'100, "2026-02-10");
  EXPECT_EQ(Close("2026-03-01T00:00:00Z").invoices_created, 2);
  EXPECT_EQ(InvoiceTotal(Org(73), "2026-02-01"), 50'000'000 + 100 * 10'000);
}

// A first period shorter than the interval (calendar billing from mid-month) anchors the
// subscription on its end: the next periods are whole months.
TEST_F(BillingTest, StubFirstPeriodAnchorsOnItsEnd) {
  AddOrg(Org(74));
  Subscribe(Org(74), "basic", "2026-01-10T00:00:00Z", "2026-02-01T00:00:00Z");
  Close("2026-03-01T00:00:00Z");
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices WHERE org_id = '" + Org(74) +
                "' AND period_start = '2026-02-01T00:00:00Z' AND period_end = "
                "'2026-03-01T00:00:00Z'"),
            1);
}

// Lines of a voided invoice do not count as billed: the usage is billed again, as late usage.
TEST_F(BillingTest, VoidInvoiceLinesAreNotCountedAsBilled) {
  AddOrg(Org(75));
  Subscribe(Org(75), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Usage(Org(75), "api_calls", 1'200, "2026-10-05");
  Close("2026-11-01T00:00:00Z");
  Exec("UPDATE shared.invoices SET status = 'void'");
  Close("2026-12-01T00:00:00Z");
  EXPECT_EQ(InvoiceTotal(Org(75), "2026-11-01"), 50'000'000 + 200 * 10'000);
}

// A failure the operator resolves another way (moving the period) is marked resolved, so the
// alarm clears.
TEST_F(BillingTest, FailureResolvedByMovingThePeriodIsMarkedResolved) {
  AddOrg(Org(76));
  Subscribe(Org(76), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  Exec(
      "INSERT INTO shared.invoices (org_id, subscription_id, plan_id, period_start, period_end) "
      "SELECT org_id, subscription_id, plan_id, current_period_start, current_period_end "
      "FROM shared.subscriptions");
  EXPECT_EQ(ClosePeriods(url_, At("2026-11-01T00:00:00Z"))->failures.size(), 1u);
  Exec(
      "UPDATE shared.subscriptions SET current_period_start = '2026-11-01T00:00:00Z', "
      "current_period_end = '2026-12-01T00:00:00Z'");
  auto next = ClosePeriods(url_, At("2026-12-01T00:00:00Z"));
  ASSERT_TRUE(next.ok());
  EXPECT_TRUE(next->failures.empty());
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_close_failures WHERE resolved_at IS NULL"), 0);
}

// Final adjustment invoices are isolated like periods: one ended org that cannot be priced is
// recorded, the others are invoiced.
TEST_F(BillingTest, FinalAdjustmentOfOneEndedOrgDoesNotBlockTheOthers) {
  for (int i = 77; i < 80; ++i) {
    AddOrg(Org(i));
    Subscribe(Org(i), "basic", "2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z");
  }
  Exec(
      "UPDATE shared.subscriptions SET status = 'canceled', canceled_at = "
      "'2026-09-20T00:00:00Z'");
  Close("2026-10-01T00:00:00Z");
  for (int i = 77; i < 80; ++i) Usage(Org(i), "api_calls", 1'500, "2026-09-10");
  Usage(Org(79), "ai_requests", 900'000'000'000'000'000, "2026-09-11");
  auto summary = ClosePeriods(url_, At("2026-10-02T00:00:00Z"));
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->invoices_created, 2);
  ASSERT_EQ(summary->failures.size(), 1u);
  EXPECT_EQ(summary->failures[0].org_id, Org(79));
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices WHERE kind = 'adjustment' AND "
                "total_micros = 500 * 10000"),
            2);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_close_failures WHERE stage = "
                "'final_adjustment' AND resolved_at IS NULL"),
            1);
}

// A lock or statement timeout is not a subscription's fault: the close fails as a whole
// (the cron retries) and records no billing failure.
TEST_F(BillingTest, TransientErrorsFailTheCloseInsteadOfBeingRecorded) {
  AddOrg(Org(80));
  Subscribe(Org(80), "basic", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z");
  const std::string db = url_.substr(url_.rfind('/') + 1);
  Exec("ALTER DATABASE " + db + " SET lock_timeout = '300ms'");
  pqxx::connection holder(url_);
  pqxx::work hold(holder);
  hold.exec("SELECT 1 FROM shared.subscriptions FOR UPDATE");
  auto summary = ClosePeriods(url_, At("2026-11-01T00:00:00Z"));
  EXPECT_FALSE(summary.ok());
  hold.abort();
  EXPECT_EQ(Int("SELECT count(*) FROM shared.billing_close_failures"), 0);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.invoices"), 0);
  EXPECT_EQ(Close("2026-11-01T00:00:00Z").invoices_created, 1);
}

// The direct path refuses what the Kafka parser refuses: a quantity above the meter's limit.
TEST_F(BillingTest, DirectUsagePathEnforcesTheMeterMaximum) {
  AddOrg(Org(81));
  Exec("UPDATE shared.meters SET max_event_quantity = 1000 WHERE name = 'data_exports'");
  pqxx::work tx(*conn_);
  EXPECT_THROW(
      tx.exec("SELECT shared.increment_api_usage('" + Org(81) + "', 'data_exports', 1001)"),
      pqxx::data_exception);
}

}  // namespace
}  // namespace meterd::billing
