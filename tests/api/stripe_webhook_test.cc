// Stripe webhooks: the signature check (VerifyStripeSignature), and shared.apply_stripe_event
// on a real Postgres: events delivered in any order and more than once end in the state of
// one delivery in order.
#include "lib/api/stripe_webhook.h"

#include <algorithm>
#include <random>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "tests/support/harness.h"

namespace meterd::api {
namespace {

constexpr char kSecret[] = "whsec_test_5b2f0c7d9a1e4f3b8c6d";
constexpr char kBody[] = R"({"id":"evt_1","type":"customer.created","created":1,"data":{}})";

TEST(StripeSignatureTest, AcceptsOnlyAValidFreshSignatureOverTheExactBody) {
  const absl::Time now = absl::FromUnixSeconds(1'790'000'000);
  const int64_t t = absl::ToUnixSeconds(now);
  const std::string good = StripeSignatureHeader(kBody, kSecret, t);
  EXPECT_TRUE(VerifyStripeSignature(good, kBody, {kSecret}, now).ok());
  // Tampered body, wrong secret, missing header, no timestamp, no v1.
  EXPECT_FALSE(VerifyStripeSignature(good, std::string(kBody) + " ", {kSecret}, now).ok());
  EXPECT_FALSE(VerifyStripeSignature(good, kBody, {"whsec_some_other_secret_000000"}, now).ok());
  EXPECT_FALSE(VerifyStripeSignature("", kBody, {kSecret}, now).ok());
  EXPECT_FALSE(VerifyStripeSignature(good.substr(good.find(',') + 1), kBody, {kSecret}, now).ok());
  EXPECT_FALSE(VerifyStripeSignature(absl::StrCat("t=", t), kBody, {kSecret}, now).ok());
  // 300 s of tolerance, either way; 301 s is too old.
  EXPECT_TRUE(
      VerifyStripeSignature(StripeSignatureHeader(kBody, kSecret, t - 300), kBody, {kSecret}, now)
          .ok());
  const absl::Status stale =
      VerifyStripeSignature(StripeSignatureHeader(kBody, kSecret, t - 301), kBody, {kSecret}, now);
  EXPECT_FALSE(stale.ok());
  EXPECT_NE(stale.message().find("300 s"), absl::string_view::npos) << stale;
  EXPECT_FALSE(
      VerifyStripeSignature(StripeSignatureHeader(kBody, kSecret, t + 301), kBody, {kSecret}, now)
          .ok());
  // Rotation: two v1 in the header, one valid; or two secrets configured, one used.
  const std::string old_sig = StripeSignatureHeader(kBody, "whsec_old_secret_0000000000", t);
  const std::string both = absl::StrCat(good, ",v1=", old_sig.substr(old_sig.find("v1=") + 3));
  EXPECT_TRUE(VerifyStripeSignature(both, kBody, {kSecret}, now).ok());
  EXPECT_TRUE(
      VerifyStripeSignature(old_sig, kBody, {kSecret, "whsec_old_secret_0000000000"}, now).ok());
  // A signature of the right length but wrong: refused (and never a crash on odd lengths).
  std::string flipped = good;
  flipped.back() = flipped.back() == '0' ? '1' : '0';
  EXPECT_FALSE(VerifyStripeSignature(flipped, kBody, {kSecret}, now).ok());
  EXPECT_FALSE(VerifyStripeSignature(absl::StrCat("t=", t, ",v1=ab"), kBody, {kSecret}, now).ok());
}

constexpr char kOrg[] = "00000000-0000-4000-8000-00000000057e";

// A Stripe event as a webhook delivers it, around a Stripe-shaped object.
std::string Event(const std::string& id, const std::string& type, int64_t created,
                  const std::string& object) {
  return absl::StrCat(R"({"id":")", id, R"(","object":"event","api_version":"2024-06-20",)",
                      R"("created":)", created, R"(,"livemode":false,"pending_webhooks":1,)",
                      R"("type":")", type, R"(","data":{"object":)", object, "}}");
}

class StripeEventsTest : public ::testing::Test {
 protected:
  // A fresh database with the org, a live Basic subscription and invoice 1 (55 USD, open).
  std::string Database(const std::string& name) {
    const std::string url = testing::SharedPostgres().CreateMigratedDatabase(name);
    pqxx::connection conn(url);
    pqxx::work tx(conn);
    tx.exec0(absl::StrCat(
        "INSERT INTO shared.organizations VALUES ('", kOrg, "', 'Org', 'hs');",
        "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
        "current_period_end) VALUES ('",
        kOrg,
        "', 'basic', date_trunc('day', now()) - interval '3 days', "
        "date_trunc('day', now()) + interval '27 days');"
        "INSERT INTO shared.invoices (invoice_id, org_id, subscription_id, plan_id, period_start, "
        "period_end, total_micros) SELECT 1, org_id, subscription_id, 'basic', "
        "current_period_start - interval '1 month', current_period_start, 55000000 FROM "
        "shared.subscriptions"));
    tx.commit();
    return url;
  }

  static std::string Apply(pqxx::connection& conn, const std::string& event) {
    pqxx::work tx(conn);
    const std::string result =
        tx.exec_params1("SELECT shared.apply_stripe_event($1::jsonb)", event)[0].as<std::string>();
    tx.commit();
    return result;
  }

  // Everything the events touch, as one text.
  static std::string State(const std::string& url) {
    pqxx::connection conn(url);
    pqxx::nontransaction tx(conn);
    const char* kQueries[] = {
        "SELECT string_agg(org_id || ' ' || stripe_customer_id || ' ' || coalesce(email, '-'), "
        "';') FROM shared.stripe_customers",
        "SELECT string_agg(status || ' ' || coalesce(stripe_subscription_id, '-') || ' ' || "
        "coalesce(canceled_at::text, '-'), ';') FROM shared.subscriptions",
        "SELECT string_agg(invoice_id || ' ' || status, ';') FROM shared.invoices",
        "SELECT string_agg(stripe_payment_intent_id || ' ' || status || ' ' || amount_micros || "
        "' ' || coalesce(invoice_id::text, '-'), ';') FROM shared.payments",
        "SELECT string_agg(stripe_payment_method_id || ' ' || brand || ' ' || last4 || ' ' || "
        "exp_month || '/' || exp_year, ';') FROM shared.payment_methods",
        "SELECT count(*) || ' events, ' || count(processed_at) || ' processed' FROM "
        "shared.stripe_webhook_events"};
    std::string state;
    for (const char* sql : kQueries) {
      const pqxx::row row = tx.exec1(sql);
      absl::StrAppend(&state, row[0].is_null() ? "(none)" : row[0].as<std::string>(), "\n");
    }
    return state;
  }
};

TEST_F(StripeEventsTest, AnyOrderDeliveredTwiceEndsAsInOrderOnce) {
  const int64_t t = absl::ToUnixSeconds(absl::Now()) - 3600;
  const std::string customer = R"({"id":"cus_QXg1o8vcGmoR32","object":"customer",)";
  const std::string org_meta = absl::StrCat(R"("metadata":{"org_id":")", kOrg, R"("})");
  const std::string invoice_meta = absl::StrCat(R"("metadata":{"meterd_invoice_id":"1"})");
  auto subscription = [&](const std::string& status, const std::string& extra) {
    return absl::StrCat(R"({"id":"sub_1Pgc6rB7WZ01zgkWNy0Cn5nw","object":"subscription",)",
                        R"("customer":"cus_QXg1o8vcGmoR32","status":")", status, R"(",)", extra,
                        R"("metadata":{"meterd_subscription_id":"1"}})");
  };
  auto intent = [&](const std::string& status) {
    return absl::StrCat(R"({"id":"pi_1PgafyB7WZ01zgkWSjxsAJo3","object":"payment_intent",)",
                        R"("amount":5500,"currency":"usd","customer":"cus_QXg1o8vcGmoR32",)",
                        R"("status":")", status, R"(",)", invoice_meta, "}");
  };
  auto card = [&](int exp_year) {
    return absl::StrCat(R"({"id":"pm_1Pgc75B7WZ01zgkWlHVgdEGJ","object":"payment_method",)",
                        R"("customer":"cus_QXg1o8vcGmoR32","type":"card","card":{"brand":)",
                        R"("visa","last4":"4242","exp_month":8,"exp_year":)", exp_year,
                        R"(},"metadata":{}})");
  };
  const std::vector<std::string> events = {
      Event("evt_01", "customer.created", t + 100,
            absl::StrCat(customer, R"("email":"first@example.org",)", org_meta, "}")),
      Event("evt_02", "customer.updated", t + 110,
            absl::StrCat(customer, R"("email":"second@example.org",)", org_meta, "}")),
      Event("evt_03", "customer.subscription.created", t + 120, subscription("active", "")),
      Event("evt_04", "customer.subscription.updated", t + 130, subscription("past_due", "")),
      Event("evt_05", "customer.subscription.updated", t + 140, subscription("active", "")),
      Event("evt_06", "customer.subscription.deleted", t + 150,
            subscription("canceled", absl::StrCat(R"("canceled_at":)", t + 150, ","))),
      Event("evt_07", "invoice.payment_failed", t + 160,
            absl::StrCat(R"({"id":"in_1Pgc6tB7WZ01zgkWu9fdqL6I","object":"invoice",)",
                         R"("customer":"cus_QXg1o8vcGmoR32","status":"open",)", invoice_meta, "}")),
      Event("evt_08", "invoice.paid", t + 170,
            absl::StrCat(R"({"id":"in_1Pgc6tB7WZ01zgkWu9fdqL6I","object":"invoice",)",
                         R"("customer":"cus_QXg1o8vcGmoR32","status":"paid",)", invoice_meta, "}")),
      Event("evt_09", "payment_intent.payment_failed", t + 165, intent("requires_payment_method")),
      Event("evt_10", "payment_intent.succeeded", t + 175, intent("succeeded")),
      Event("evt_11", "charge.refunded", t + 180,
            absl::StrCat(R"({"id":"ch_1PgafuB7WZ01zgkWXYmPNZs8","object":"charge",)",
                         R"("amount":5500,"amount_refunded":5500,"currency":"usd",)",
                         R"("customer":"cus_QXg1o8vcGmoR32","refunded":true,)",
                         R"("payment_intent":"pi_1PgafyB7WZ01zgkWSjxsAJo3",)", invoice_meta, "}")),
      Event("evt_12", "payment_method.attached", t + 125, card(2030)),
      Event("evt_13", "payment_method.updated", t + 135, card(2031)),
      Event("evt_14", "plan.created", t + 190, R"({"id":"plan_1","object":"plan"})"),
  };

  const std::string in_order = Database("stripe_in_order");
  {
    pqxx::connection conn(in_order);
    std::vector<std::string> sorted = events;
    std::sort(sorted.begin(), sorted.end(), [](const std::string& a, const std::string& b) {
      return a.substr(a.find("\"created\":")) < b.substr(b.find("\"created\":"));
    });
    for (const std::string& e : sorted) EXPECT_NE(Apply(conn, e), "duplicate");
  }
  const std::string expected = State(in_order);
  // The state one would expect from these events, spelled out once.
  EXPECT_NE(expected.find("cus_QXg1o8vcGmoR32 second@example.org"), std::string::npos) << expected;
  EXPECT_NE(expected.find("canceled sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"), std::string::npos) << expected;
  EXPECT_NE(expected.find("1 paid"), std::string::npos) << expected;
  EXPECT_NE(expected.find("pi_1PgafyB7WZ01zgkWSjxsAJo3 refunded 55000000 1"), std::string::npos)
      << expected;
  EXPECT_NE(expected.find("pm_1Pgc75B7WZ01zgkWlHVgdEGJ visa 4242 8/2031"), std::string::npos)
      << expected;
  EXPECT_NE(expected.find("14 events, 14 processed"), std::string::npos) << expected;

  for (int seed = 1; seed <= 4; ++seed) {
    SCOPED_TRACE(seed);
    const std::string url = Database(absl::StrCat("stripe_shuffled_", seed));
    std::vector<std::string> deliveries = events;
    deliveries.insert(deliveries.end(), events.begin(), events.end());
    std::mt19937 random(seed);
    std::shuffle(deliveries.begin(), deliveries.end(), random);
    pqxx::connection conn(url);
    int duplicates = 0;
    for (const std::string& e : deliveries) duplicates += Apply(conn, e) == "duplicate" ? 1 : 0;
    EXPECT_EQ(duplicates, static_cast<int>(events.size()));
    EXPECT_EQ(State(url), expected);
  }
  // Applied events are audited, each once.
  pqxx::connection conn(in_order);
  pqxx::nontransaction tx(conn);
  EXPECT_EQ(
      tx.exec1("SELECT count(*) FROM shared.audit_log WHERE action LIKE 'stripe.%'")[0].as<int>(),
      13);
}

TEST_F(StripeEventsTest, AmountsFollowTheCurrencysDecimals) {
  const std::string url = testing::SharedPostgres().CreateMigratedDatabase("stripe_amounts");
  pqxx::connection conn(url);
  pqxx::nontransaction tx(conn);
  EXPECT_EQ(tx.exec1("SELECT shared.stripe_amount_micros(1099, 'usd')")[0].as<int64_t>(),
            10'990'000);  // $10.99
  EXPECT_EQ(tx.exec1("SELECT shared.stripe_amount_micros(500, 'JPY')")[0].as<int64_t>(),
            500'000'000);  // ¥500
  EXPECT_EQ(tx.exec1("SELECT shared.stripe_amount_micros(1000, 'kwd')")[0].as<int64_t>(),
            1'000'000);  // 1.000 KWD
}

// Found by review: an unrelated Stripe subscription (a failed checkout) must not cancel the
// org's subscription, an invoice event must not touch another org's invoice, and a paid
// invoice does not go back to open, nor a voided one to paid.
TEST_F(StripeEventsTest, EventsChangeOnlyWhatIsTheirs) {
  const std::string url = Database("stripe_theirs");
  constexpr char kOther[] = "00000000-0000-4000-8000-00000000057f";
  pqxx::connection conn(url);
  {
    pqxx::work tx(conn);
    tx.exec0(absl::StrCat("INSERT INTO shared.organizations VALUES ('", kOther, "', 'B', 'hs')"));
    tx.commit();
  }
  const int64_t t = absl::ToUnixSeconds(absl::Now()) - 3600;
  auto customer = [&](const std::string& id, const std::string& org) {
    return absl::StrCat(R"({"id":")", id, R"(","object":"customer","created":)", t,
                        R"(,"email":null,"metadata":{"org_id":")", org, R"("}})");
  };
  EXPECT_EQ(Apply(conn, Event("evt_a1", "customer.created", t, customer("cus_A", kOrg))),
            "applied");
  EXPECT_EQ(Apply(conn, Event("evt_b1", "customer.created", t, customer("cus_B", kOther))),
            "applied");
  // A checkout that failed: its subscription expires. Not linked to meterd's: stored only.
  EXPECT_EQ(Apply(conn, Event("evt_a2", "customer.subscription.updated", t + 10,
                              R"({"id":"sub_try1","object":"subscription","customer":"cus_A",)"
                              R"("status":"incomplete_expired","metadata":{}})")),
            "stored");
  // B's customer paying "invoice 1" (A's): not applied.
  const std::string paid_by_b =
      R"({"id":"in_b","object":"invoice","customer":"cus_B","metadata":{"meterd_invoice_id":"1"}})";
  EXPECT_EQ(Apply(conn, Event("evt_b2", "invoice.paid", t + 20, paid_by_b)), "stored");
  // A's own: voided, then a later "paid" for it changes nothing (void is final).
  const std::string a_invoice =
      R"({"id":"in_a","object":"invoice","customer":"cus_A","metadata":{"meterd_invoice_id":"1"}})";
  EXPECT_EQ(Apply(conn, Event("evt_a3", "invoice.voided", t + 30, a_invoice)), "applied");
  EXPECT_EQ(Apply(conn, Event("evt_a4", "invoice.paid", t + 40, a_invoice)), "stored");
  pqxx::nontransaction tx(conn);
  EXPECT_EQ(tx.exec1("SELECT status || ' ' || coalesce(stripe_subscription_id, '-') FROM "
                     "shared.subscriptions")[0]
                .as<std::string>(),
            "active -");
  EXPECT_EQ(
      tx.exec1("SELECT status FROM shared.invoices WHERE invoice_id = 1")[0].as<std::string>(),
      "void");
}

// A payment intent naming only its Stripe invoice (no meterd metadata) is recorded against the
// meterd invoice that Stripe invoice was linked to by an invoice event, in either order; a
// payment of another org naming it is not.
TEST_F(StripeEventsTest, PaymentsFindTheirInvoiceByStripeInvoiceIdInEitherOrder) {
  const int64_t t = absl::ToUnixSeconds(absl::Now()) - 3600;
  const std::string customer = Event("evt_c", "customer.created", t,
                                     absl::StrCat(R"({"id":"cus_L","object":"customer","created":)",
                                                  t, R"(,"metadata":{"org_id":")", kOrg, R"("}})"));
  const std::string invoice_paid = Event("evt_i", "invoice.paid", t + 20,
                                         R"({"id":"in_L1","object":"invoice","customer":"cus_L",)"
                                         R"("metadata":{"meterd_invoice_id":"1"}})");
  const std::string intent =
      Event("evt_p", "payment_intent.succeeded", t + 10,
            R"({"id":"pi_L1","object":"payment_intent","customer":"cus_L","amount":5500,)"
            R"("currency":"usd","invoice":"in_L1","metadata":{}})");
  for (const bool invoice_first : {true, false}) {
    const std::string url = Database(invoice_first ? "stripe_link_a" : "stripe_link_b");
    pqxx::connection conn(url);
    EXPECT_EQ(Apply(conn, customer), "applied");
    EXPECT_EQ(Apply(conn, invoice_first ? invoice_paid : intent), "applied");
    EXPECT_EQ(Apply(conn, invoice_first ? intent : invoice_paid), "applied");
    EXPECT_EQ(testing::QueryInt(url,
                                "SELECT coalesce(invoice_id, -1) FROM shared.payments "
                                "WHERE stripe_payment_intent_id = 'pi_L1'"),
              1)
        << (invoice_first ? "invoice first" : "payment first");
    EXPECT_EQ(testing::QueryInt(url,
                                "SELECT count(*) FROM shared.invoices WHERE invoice_id = 1 "
                                "AND stripe_invoice_id = 'in_L1' AND status = 'paid'"),
              1);
  }
  // Another org's payment naming in_L1 stays unlinked.
  const std::string url = Database("stripe_link_other");
  constexpr char kOther[] = "00000000-0000-4000-8000-00000000057f";
  pqxx::connection conn(url);
  {
    pqxx::work tx(conn);
    tx.exec0(absl::StrCat("INSERT INTO shared.organizations VALUES ('", kOther, "', 'B', 'hs')"));
    tx.commit();
  }
  EXPECT_EQ(Apply(conn, customer), "applied");
  EXPECT_EQ(Apply(conn, invoice_paid), "applied");
  EXPECT_EQ(Apply(conn, Event("evt_o", "customer.created", t,
                              absl::StrCat(R"({"id":"cus_O","object":"customer","created":)", t,
                                           R"(,"metadata":{"org_id":")", kOther, R"("}})"))),
            "applied");
  EXPECT_EQ(Apply(conn, Event("evt_po", "payment_intent.succeeded", t + 30,
                              R"({"id":"pi_O1","object":"payment_intent","customer":"cus_O",)"
                              R"("amount":100,"currency":"usd","invoice":"in_L1"})")),
            "applied");
  EXPECT_EQ(testing::QueryInt(url,
                              "SELECT coalesce(invoice_id, -1) FROM shared.payments WHERE "
                              "stripe_payment_intent_id = 'pi_O1'"),
            -1);
}

}  // namespace
}  // namespace meterd::api
