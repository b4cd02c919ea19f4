// The export to Stripe against a real Postgres and the fake Stripe (lib/devtools): the outbox
// is written by the close's own transaction, every row reaches Stripe exactly once with a
// stable identifier through 5xx, 429 and timeouts, also across a kill -9 of the sender in the
// middle of a batch; refusals and a wrong key are visible and lose nothing; a voided invoice
// cancels its meter events.
#include <csignal>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "lib/billing/close_period.h"
#include "lib/common/files.h"
#include "lib/devtools/fake_stripe.h"
#include "lib/store/data_protection.h"
#include "lib/stripe/stripe_exporter.h"
#include "tests/support/harness.h"

namespace meterd::stripe {
namespace {

constexpr int kOrgs = 30;  // With a Stripe customer; two more without one.
constexpr char kKey[] = "sk_test_meterd_fake";

std::string Org(int n) { return absl::StrFormat("00000000-0000-4000-8000-%012d", n); }

class StripeExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("sx_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    auto fake = devtools::FakeStripe::Start();
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = std::move(*fake);
    // Orgs 1..kOrgs have a customer, kOrgs+1 and +2 do not. Last month's period (ended
    // yesterday), usage on every meter for most orgs, none on ai_requests for odd ones.
    std::string sql;
    for (int n = 1; n <= kOrgs + 2; ++n) {
      absl::StrAppend(
          &sql, "INSERT INTO shared.organizations VALUES ('", Org(n), "', 'Org ", n, "', 'hs');",
          "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
          "current_period_end) VALUES ('",
          Org(n),
          "', 'basic', date_trunc('day', now() - interval '31 days'), "
          "date_trunc('day', now() - interval '1 day'));",
          "INSERT INTO shared.api_usage_meters (org_id, meter, industry, usage_date, quantity) "
          "VALUES ('",
          Org(n), "', 'api_calls', 'hs', (now() - interval '5 days')::date, ", 1000 + n, "), ('",
          Org(n), "', 'data_exports', 'hs', (now() - interval '6 days')::date, ", n, ");");
      if (n % 2 == 0) {
        absl::StrAppend(&sql,
                        "INSERT INTO shared.api_usage_meters (org_id, meter, industry, "
                        "usage_date, quantity) VALUES ('",
                        Org(n), "', 'ai_requests', 'hs', (now() - interval '7 days')::date, ",
                        3 * n, ");");
      }
      if (n <= kOrgs) {
        absl::StrAppend(&sql,
                        "INSERT INTO shared.stripe_customers (org_id, stripe_customer_id) "
                        "VALUES ('",
                        Org(n), "', 'cus_test", n, "');");
      }
    }
    Exec(sql);
  }

  void Exec(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec(sql);
    tx.commit();
  }
  int64_t Int(const std::string& sql) { return testing::QueryInt(url_, sql); }

  void Close() {
    auto closed = billing::ClosePeriods(url_, absl::Now());
    ASSERT_TRUE(closed.ok()) << closed.status();
    ASSERT_EQ(closed->invoices_created, kOrgs + 2);
  }

  // identifier -> (customer, value): what the outbox says Stripe must end up with.
  std::map<std::string, std::pair<std::string, std::string>> ExpectedEvents() {
    std::map<std::string, std::pair<std::string, std::string>> expected;
    pqxx::connection conn(url_);
    pqxx::nontransaction tx(conn);
    for (const auto& r : tx.exec("SELECT identifier, stripe_customer_id, value::text "
                                 "FROM shared.stripe_outbox WHERE kind = 'meter_event'")) {
      expected[r[0].as<std::string>()] = {r[1].as<std::string>(), r[2].as<std::string>()};
    }
    return expected;
  }

  // Every meter event at the fake exactly once, with the outbox's customer and value.
  void ExpectDeliveredExactlyOnce() {
    const auto expected = ExpectedEvents();
    std::map<std::string, int> seen;
    for (const devtools::FakeMeterEvent& e : fake_->meter_events()) {
      ++seen[e.identifier];
      auto it = expected.find(e.identifier);
      ASSERT_NE(it, expected.end()) << "Stripe got an event meterd never owed: " << e.identifier;
      EXPECT_EQ(e.stripe_customer_id, it->second.first) << e.identifier;
      EXPECT_EQ(e.value, it->second.second) << e.identifier;
    }
    EXPECT_EQ(seen.size(), expected.size());
    for (const auto& [identifier, count] : seen) EXPECT_EQ(count, 1) << identifier;
    EXPECT_EQ(fake_->duplicate_identifiers(), 0);
    EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox WHERE state <> 'sent'"), 0);
  }

  ExporterOptions Options(int senders = 3) {
    ExporterOptions o;
    o.api_base = fake_->base_url();
    o.secret_key = kKey;
    o.senders = senders;
    o.batch = 7;
    o.request_timeout = absl::Seconds(1);
    o.retry_initial = absl::Milliseconds(50);
    o.max_backoff = absl::Seconds(2);
    o.idle_poll = absl::Milliseconds(100);
    return o;
  }

  std::string url_;
  std::unique_ptr<devtools::FakeStripe> fake_;
};

TEST_F(StripeExportTest, CloseWritesTheOutboxInItsTransaction) {
  {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec("SELECT shared.reset_monthly_usage(now())");
    EXPECT_GT(tx.exec1("SELECT count(*) FROM shared.stripe_outbox")[0].as<int64_t>(), 0);
    // Rolled back: neither the invoices nor their export exist.
  }
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox"), 0);
  Close();
  // One meter event per usage line with a quantity, for orgs with a Stripe customer only:
  // api_calls and data_exports for all 30, ai_requests for the 15 even ones.
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox WHERE kind = 'meter_event'"),
            kOrgs * 2 + kOrgs / 2);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox o JOIN shared.invoice_lines l "
                "USING (line_id) WHERE o.value <> l.quantity OR o.org_id <> l.org_id"),
            0);
  EXPECT_EQ(Int(absl::StrCat("SELECT count(*) FROM shared.stripe_outbox WHERE org_id IN ('",
                             Org(kOrgs + 1), "', '", Org(kOrgs + 2), "')")),
            0);
  // The identifier names org, meter, period (start-end) and invoice, and fits Stripe's 100
  // characters.
  EXPECT_EQ(Int(absl::StrCat(
                "SELECT count(*) FROM shared.stripe_outbox o JOIN shared.invoice_lines l "
                "USING (line_id) WHERE o.identifier = 'mtr:' || o.org_id || ':' || l.meter || "
                "':' || to_char(l.usage_period_start, 'YYYYMMDD') || '-' || "
                "to_char(l.usage_period_end, 'YYYYMMDD') || ':' || o.invoice_id")),
            kOrgs * 2 + kOrgs / 2);
  // A second close creates nothing, so it owes Stripe nothing more.
  auto again = billing::ClosePeriods(url_, absl::Now());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox"), kOrgs * 2 + kOrgs / 2);
}

TEST_F(StripeExportTest, EveryRowDeliveredOnceThrough5xx429AndTimeouts) {
  Close();
  fake_->FailNext(3, 503);
  fake_->FailNext(2, 429, absl::Seconds(1));
  fake_->FailNext(1, 500);
  // Processed by the fake, answered after the client gave up: the resend must not count twice.
  fake_->StallNext(2, absl::Milliseconds(1500));
  auto exporter = StripeExporter::Create(url_, Options());
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  const DrainSummary summary = (*exporter)->Drain(absl::Seconds(60));
  EXPECT_EQ(summary.sent, kOrgs * 2 + kOrgs / 2);
  EXPECT_EQ(summary.still_pending, 0);
  EXPECT_EQ(summary.failed_rows, 0);
  ExpectDeliveredExactlyOnce();
  const ExporterMetrics& m = (*exporter)->metrics();
  EXPECT_GE(m.retried_5xx->value(), 4);
  EXPECT_GE(m.retried_429->value(), 1);
  EXPECT_GE(m.retried_network->value(), 1);
  EXPECT_GE(fake_->idempotent_replays(), 1);  // A timed-out request, sent again.
  EXPECT_GT(Int("SELECT count(*) FROM shared.stripe_outbox WHERE attempts > 1"), 0);

  // Sent rows are never sent again.
  const int64_t requests = fake_->requests();
  auto second = StripeExporter::Create(url_, Options());
  ASSERT_TRUE(second.ok());
  EXPECT_EQ((*second)->Drain(absl::Seconds(10)).sent, 0);
  EXPECT_EQ(fake_->requests(), requests);
}

TEST_F(StripeExportTest, KillNineMidBatchThenRestartDeliversEachOnce) {
  Close();
  const int64_t rows = kOrgs * 2 + kOrgs / 2;
  // Slow answers, so the kill lands inside a batch: sent at Stripe, not yet marked in Postgres.
  fake_->StallNext(30, absl::Milliseconds(150));
  const std::string dir = testing::TempDir("stripe_export");
  const std::vector<std::string> argv = {
      testing::MeterdBinary(), "stripe-export",           "--pg", url_, "--stripe-api-base",
      fake_->base_url(),       "--stripe-export-senders", "2"};
  // The key through the environment, as the README recommends.
  setenv("METERD_STRIPE_SECRET_KEY", kKey, 1);
  {
    testing::ChildProcess first(argv, dir + "/first.log");
    ASSERT_TRUE(
        testing::Eventually([&] { return fake_->meter_events().size() >= 8; }, absl::Seconds(30)));
    first.Signal(SIGKILL);
    EXPECT_EQ(first.Wait(absl::Seconds(10)), 128 + SIGKILL);
  }
  const int64_t marked = Int("SELECT count(*) FROM shared.stripe_outbox WHERE state = 'sent'");
  const int64_t at_stripe = static_cast<int64_t>(fake_->meter_events().size());
  EXPECT_LT(marked, at_stripe) << "the kill should land between Stripe's answer and the commit";
  EXPECT_LT(at_stripe, rows);

  testing::ChildProcess second(argv, dir + "/second.log");
  EXPECT_EQ(second.Wait(absl::Seconds(60)), 0) << testing::ReadFile(dir + "/second.log");
  unsetenv("METERD_STRIPE_SECRET_KEY");
  ExpectDeliveredExactlyOnce();
  EXPECT_GE(fake_->idempotent_replays(), at_stripe - marked);
  // The key never reaches a log.
  EXPECT_EQ(testing::ReadFile(dir + "/first.log").find(kKey), std::string::npos);
  EXPECT_EQ(testing::ReadFile(dir + "/second.log").find(kKey), std::string::npos);
}

TEST_F(StripeExportTest, RefusalsAndAWrongKeyAreVisibleAndLoseNothing) {
  Close();
  const int64_t rows = kOrgs * 2 + kOrgs / 2;
  // A wrong key: nothing is marked, every row stays pending for a corrected key.
  ExporterOptions wrong = Options(1);
  wrong.secret_key = "sk_test_not_the_right_one";
  auto refused = StripeExporter::Create(url_, wrong);
  ASSERT_TRUE(refused.ok());
  const DrainSummary denied = (*refused)->Drain(absl::Seconds(2));
  EXPECT_EQ(denied.sent, 0);
  EXPECT_EQ(denied.still_pending, rows);
  EXPECT_GE((*refused)->metrics().auth_failures->value(), 1);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox WHERE state = 'pending'"), rows);

  // One row Stripe refuses (400): failed with Stripe's message, the others sent.
  fake_->FailNext(1, 400);
  auto exporter = StripeExporter::Create(url_, Options(1));
  ASSERT_TRUE(exporter.ok());
  const DrainSummary summary = (*exporter)->Drain(absl::Seconds(30));
  EXPECT_EQ(summary.sent, rows - 1);
  EXPECT_EQ(summary.refused, 1);
  EXPECT_EQ(summary.failed_rows, 1);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox WHERE state = 'failed' "
                "AND last_error LIKE 'HTTP 400%'"),
            1);
  // Requeued after the fix: sent, and then everything is at Stripe once.
  {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    EXPECT_EQ(tx.exec1("SELECT shared.retry_stripe_exports()")[0].as<int>(), 1);
    tx.commit();
  }
  EXPECT_EQ((*exporter)->Drain(absl::Seconds(30)).sent, 1);
  ExpectDeliveredExactlyOnce();
}

TEST_F(StripeExportTest, VoidedInvoiceCancelsItsMeterEvents) {
  Close();
  const int64_t rows = kOrgs * 2 + kOrgs / 2;
  auto invoice_of = [&](int n) {
    return absl::StrCat(
        Int(absl::StrCat("SELECT invoice_id FROM shared.invoices WHERE org_id = '", Org(n), "'")));
  };
  const std::string before_export = invoice_of(4);
  const std::string after_export = invoice_of(2);
  // Voided before any export: its rows may still be at Stripe (an answer lost), so they are
  // sent as owed and then canceled, each cancellation only after its meter event.
  Exec("UPDATE shared.invoices SET status = 'void' WHERE invoice_id = " + before_export);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox WHERE kind = 'meter_event_cancel' "
                "AND state = 'pending' AND invoice_id = " +
                before_export),
            3);
  auto exporter = StripeExporter::Create(url_, Options());
  ASSERT_TRUE(exporter.ok());
  const DrainSummary first = (*exporter)->Drain(absl::Seconds(30));
  EXPECT_EQ(first.sent, rows + 3);
  EXPECT_EQ(first.failed_rows, 0);  // The fake refuses a cancellation it cannot match.
  // Voided after export: one cancellation per meter event it had, sent once.
  Exec("UPDATE shared.invoices SET status = 'void' WHERE invoice_id = " + after_export);
  EXPECT_EQ((*exporter)->Drain(absl::Seconds(30)).sent, 3);
  std::multiset<std::string> canceled;
  for (const devtools::FakeAdjustment& a : fake_->adjustments()) {
    EXPECT_EQ(a.type, "cancel");
    canceled.insert(a.cancel_identifier);
  }
  std::multiset<std::string> expected;
  pqxx::connection conn(url_);
  pqxx::nontransaction tx(conn);
  for (const auto& r : tx.exec("SELECT identifier FROM shared.stripe_outbox WHERE kind = "
                               "'meter_event' AND invoice_id IN (" +
                               before_export + ", " + after_export + ")")) {
    expected.insert(r[0].as<std::string>());
  }
  EXPECT_EQ(canceled, expected);
  EXPECT_EQ(expected.size(), 6u);
}

// Erasing an org whose voided invoice still owes Stripe its cancellations: they are still
// sent (naming the meter events Stripe holds), and the rows move to the pseudonymous org and
// forget the Stripe customer.
TEST_F(StripeExportTest, EraseKeepsPendingCancellationsSendable) {
  Close();
  auto exporter = StripeExporter::Create(url_, Options());
  ASSERT_TRUE(exporter.ok());
  EXPECT_EQ((*exporter)->Drain(absl::Seconds(30)).sent, kOrgs * 2 + kOrgs / 2);
  Exec(absl::StrCat("UPDATE shared.invoices SET status = 'void' WHERE org_id = '", Org(2), "';",
                    "UPDATE shared.subscriptions SET status = 'ended' WHERE org_id = '", Org(2),
                    "'"));
  auto erased = store::EraseOrg(url_, Org(2));
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ((*exporter)->Drain(absl::Seconds(30)).sent, 3);
  EXPECT_EQ(fake_->adjustments().size(), 3u);
  EXPECT_EQ(Int(absl::StrCat("SELECT count(*) FROM shared.stripe_outbox WHERE org_id = '", Org(2),
                             "' OR stripe_customer_id = 'cus_test2'")),
            0);
}

// A row first tried 23 hours ago is not sent again automatically: Stripe's idempotency
// window is closing, and a resend could count twice.
TEST_F(StripeExportTest, RowsNotDeliveredWithin23HoursStopAndSaySo) {
  Close();
  Exec(
      "UPDATE shared.stripe_outbox SET attempts = 3, first_attempt_at = now() - interval "
      "'24 hours', last_error = 'read timed out' WHERE outbox_id = (SELECT min(outbox_id) FROM "
      "shared.stripe_outbox)");
  fake_->FailNext(1, 503);
  ExporterOptions one = Options(1);
  auto exporter = StripeExporter::Create(url_, one);
  ASSERT_TRUE(exporter.ok());
  const DrainSummary summary = (*exporter)->Drain(absl::Seconds(30));
  EXPECT_EQ(summary.failed_rows, 1);
  EXPECT_EQ(summary.sent, kOrgs * 2 + kOrgs / 2 - 1);
  EXPECT_EQ(Int("SELECT count(*) FROM shared.stripe_outbox WHERE state = 'failed' AND "
                "last_error LIKE 'not delivered within 23 h%'"),
            1);
  // Failed before it was sent again: Stripe never saw it from this run.
  const std::string stale = [&] {
    pqxx::connection conn(url_);
    pqxx::nontransaction tx(conn);
    return tx.exec1("SELECT identifier FROM shared.stripe_outbox WHERE state = 'failed'")[0]
        .as<std::string>();
  }();
  for (const devtools::FakeMeterEvent& e : fake_->meter_events()) {
    EXPECT_NE(e.identifier, stale);
  }
}

// `meterd run --stripe-secret-key-file …` exports while it consumes, and says so in /metrics.
TEST_F(StripeExportTest, RunExportsWhileItConsumes) {
  Close();
  const int64_t rows = kOrgs * 2 + kOrgs / 2;
  fake_->FailNext(2, 502);
  const std::string dir = testing::TempDir("stripe_run");
  testing::DevBrokerProcess broker("usage-events", 4, dir);
  const std::string key_file = dir + "/stripe.key";
  ASSERT_TRUE(WriteFileAtomically(key_file, absl::StrCat(kKey, "\n"), 0600).ok());
  const int port = testing::FreeLocalPort();
  testing::ChildProcess meterd(
      {testing::MeterdBinary(), "run", "--pg", url_, "--brokers", broker.bootstrap(),
       "--http-listen", absl::StrCat("127.0.0.1:", port), "--stripe-secret-key-file", key_file,
       "--stripe-api-base", fake_->base_url(), "--kafka-property", "session.timeout.ms=6000"},
      dir + "/meterd.log");
  EXPECT_TRUE(testing::Eventually(
      [&] { return static_cast<int64_t>(fake_->meter_events().size()) == rows; },
      absl::Seconds(60)));
  // The backlog gauge refreshes every 10 s.
  EXPECT_TRUE(testing::Eventually(
      [&] {
        const auto [code, body] = testing::HttpGet(port, "/metrics");
        return code == 200 &&
               body.find(absl::StrCat("meterd_stripe_export_sent_total ", rows)) !=
                   std::string::npos &&
               body.find("meterd_stripe_outbox_pending 0") != std::string::npos &&
               body.find("meterd_stripe_export_retries_total{cause=\"5xx\"} 2") !=
                   std::string::npos;
      },
      absl::Seconds(30)));
  meterd.Signal(SIGTERM);
  EXPECT_EQ(meterd.Wait(absl::Seconds(30)), 0);
  ExpectDeliveredExactlyOnce();
  EXPECT_EQ(testing::ReadFile(dir + "/meterd.log").find(kKey), std::string::npos);
}

}  // namespace
}  // namespace meterd::stripe
