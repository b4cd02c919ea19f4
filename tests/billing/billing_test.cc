// Billing against a real Postgres: invoice amounts to the micro-dollar, late usage, the close's
// idempotency, the documented rules, alerts under concurrency, and row-level security.
#include <thread>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "lib/billing/close_period.h"
#include "tests/support/harness.h"

namespace meterd::billing {
namespace {

std::string Org(int n) { return absl::StrFormat("00000000-0000-4000-8000-%012d", n); }

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
  int64_t InvoiceTotal(const std::string& org, const std::string& period_start) {
    return Int(absl::StrCat("SELECT total_micros FROM shared.invoices WHERE org_id = '", org,
                            "' AND period_start = '", period_start, "'"));
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
                "'2026-11-01' AND current_period_end = '2026-12-01'"),
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

}  // namespace
}  // namespace meterd::billing
