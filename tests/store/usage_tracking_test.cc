// Usage tracked by triggers on the apps' own tables (migration 0010: shared.track_usage),
// against a real Postgres: one aggregated write per org per statement, in the app's
// transaction, refused bad rows, the privileges, and concurrent app writes beside the flush
// writer (exact totals, no deadlock).
#include <algorithm>
#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "lib/store/pg_flush_writer.h"
#include "tests/support/harness.h"

namespace meterd::store {
namespace {

using aggregate::SealedPartition;

// Org i's id (i < 256): the last byte varies.
std::string Org(int i) { return absl::StrFormat("00000000-0000-4000-8000-0000000000%02x", i); }

class UsageTrackingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("ut_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    Exec(
        "CREATE TABLE hs.jobs (id bigserial PRIMARY KEY, org_id uuid, hours integer "
        "NOT NULL DEFAULT 1, note text)");
  }

  void Exec(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec(sql);
    tx.commit();
  }
  // The error message Postgres gives for `sql`, empty if it succeeded.
  std::string ErrorOf(const std::string& sql, const std::string& url = "") {
    try {
      pqxx::connection conn(url.empty() ? url_ : url);
      pqxx::work tx(conn);
      tx.exec(sql);
      tx.commit();
    } catch (const std::exception& e) {
      return e.what();
    }
    return "";
  }
  int64_t Query(const std::string& sql) { return testing::QueryInt(url_, sql); }
  // Like Query, in a read-write transaction that is committed.
  int64_t Call(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    const int64_t value = tx.exec1(sql)[0].as<int64_t>();
    tx.commit();
    return value;
  }
  int64_t Usage(const std::string& meter = "api_calls") {
    return Query(
        absl::StrCat("SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters "
                     "WHERE meter = '",
                     meter, "'"));
  }
  // Inserts `rows` rows spread round-robin over orgs 0..orgs-1 in one statement.
  static std::string InsertRows(int rows, int orgs, int first_org = 0) {
    return absl::StrCat(
        "INSERT INTO hs.jobs (org_id) SELECT ('00000000-0000-4000-8000-0000000000' || "
        "lpad(to_hex(",
        first_org, " + g % ", orgs, "), 2, '0'))::uuid FROM generate_series(0, ", rows - 1, ") g");
  }
  // A URL that logs in as `role` (the test server trusts local logins).
  std::string UrlAs(const std::string& role) {
    const size_t at = url_.find('@');
    return absl::StrCat("postgresql://", role, url_.substr(at));
  }

  std::string url_;
};

TEST_F(UsageTrackingTest, AttachListDetachAreAudited) {
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id')");
  EXPECT_EQ(
      Query("SELECT count(*) FROM shared.tracked_tables WHERE table_name = 'hs.jobs'::regclass "
            "AND meter = 'api_calls' AND industry = 'hs' AND on_ops = '{INSERT}'"),
      1);
  EXPECT_EQ(Query("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'hs.jobs'::regclass "
                  "AND tgname LIKE 'meterd_usage_%'"),
            1);
  // Re-attaching replaces: one trigger per operation asked for, no leftovers.
  Exec(
      "SELECT shared.track_usage('hs.jobs', 'ai_requests', 'org_id', 'hours', "
      "'{insert,update}')");
  EXPECT_EQ(Query("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'hs.jobs'::regclass "
                  "AND tgname LIKE 'meterd_usage_%'"),
            2);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.tracked_tables WHERE meter = 'ai_requests' "
                  "AND on_ops = '{INSERT,UPDATE}'"),
            1);
  EXPECT_EQ(Call("SELECT (shared.untrack_usage('hs.jobs'))::int"), 1);
  EXPECT_EQ(Call("SELECT (shared.untrack_usage('hs.jobs'))::int"), 0);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.tracked_tables"), 0);
  Exec(InsertRows(10, 2));
  EXPECT_EQ(Usage(), 0);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.audit_log WHERE action = 'usage_tracking.attached' "
                  "AND actor = 'role:postgres' AND after->>'table' = 'hs.jobs'"),
            2);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.audit_log WHERE action = 'usage_tracking.detached' "
                  "AND before->>'meter' = 'ai_requests'"),
            1);
}

// 10,000 rows over 3 orgs in one statement: 3 row writes to shared.api_usage_meters (inserts
// the first time, updates the second), counted in the same transaction by Postgres itself.
TEST_F(UsageTrackingTest, OneStatementWritesOneRowPerOrgWhateverItsRows) {
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id')");
  for (int rows : {10'000, 10'000, 1}) {
    SCOPED_TRACE(absl::StrCat(rows, " rows"));
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0(InsertRows(rows, 3));
    const pqxx::row writes = tx.exec1(
        "SELECT n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables "
        "WHERE relid = 'shared.api_usage_meters'::regclass");
    EXPECT_EQ(writes[0].as<int64_t>() + writes[1].as<int64_t>(), std::min(rows, 3));
    tx.commit();
  }
  EXPECT_EQ(Usage(), 20'001);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters"), 3);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters WHERE industry = 'hs' "
                  "AND usage_date = (now() AT TIME ZONE 'UTC')::date"),
            3);
}

TEST_F(UsageTrackingTest, RolledBackWritesBillNothingCommittedOnesOnce) {
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id')");
  {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0(InsertRows(500, 5));
    tx.abort();
  }
  EXPECT_EQ(Usage(), 0);
  {
    // A rolled-back savepoint inside a committed transaction bills nothing either.
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0(InsertRows(7, 1));
    tx.exec0("SAVEPOINT s");
    tx.exec0(InsertRows(100, 1));
    tx.exec0("ROLLBACK TO SAVEPOINT s");
    tx.commit();
  }
  EXPECT_EQ(Usage(), 7);
  EXPECT_EQ(Query("SELECT count(*) FROM hs.jobs"), 7);
}

// The quantity is an integer column (or literal); UPDATE bills each updated row's new value,
// DELETE each deleted row's.
TEST_F(UsageTrackingTest, QuantityColumnUpdatesAndDeletes) {
  Exec(
      "SELECT shared.track_usage('hs.jobs', 'ai_requests', 'org_id', 'hours', "
      "'{INSERT,UPDATE,DELETE}')");
  Exec("INSERT INTO hs.jobs (org_id, hours) VALUES ('" + Org(1) + "', 3), ('" + Org(1) +
       "', 4), ('" + Org(2) + "', 0)");
  EXPECT_EQ(Usage("ai_requests"), 7);
  // An org whose rows sum to zero gets no row at all.
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters WHERE org_id = '" + Org(2) + "'"),
            0);
  Exec("UPDATE hs.jobs SET hours = 5 WHERE hours = 4");  // New rows: 5.
  EXPECT_EQ(Usage("ai_requests"), 12);
  Exec("DELETE FROM hs.jobs WHERE hours = 3");  // Old rows: 3.
  EXPECT_EQ(Usage("ai_requests"), 15);
  Exec("UPDATE hs.jobs SET note = 'x' WHERE false");  // No rows: nothing written.
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters"), 1);
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id', '5')");
  Exec("INSERT INTO hs.jobs (org_id) VALUES ('" + Org(3) + "'), ('" + Org(3) + "')");
  EXPECT_EQ(Usage("api_calls"), 10);
}

// The trigger runs with the owner's rights, so it runs no code the app controls: a column whose
// type was changed to one with a user-defined cast is refused when the trigger fires, before
// the cast could run; a dropped or disabled trigger shows in tracked_tables.
TEST_F(UsageTrackingTest, TheTriggerRunsNoCodeTheAppControls) {
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id', 'hours')");
  Exec("CREATE TABLE hs.ran (who name)");
  Exec("CREATE TYPE hs.wrapped AS (v uuid)");
  Exec(
      "CREATE FUNCTION hs.unwrap(w hs.wrapped) RETURNS uuid LANGUAGE plpgsql AS "
      "$$BEGIN INSERT INTO hs.ran VALUES (current_user); RETURN w.v; END$$");
  Exec("CREATE CAST (hs.wrapped AS uuid) WITH FUNCTION hs.unwrap(hs.wrapped)");
  Exec("ALTER TABLE hs.jobs ALTER COLUMN org_id TYPE hs.wrapped USING row(org_id)::hs.wrapped");
  EXPECT_NE(ErrorOf("INSERT INTO hs.jobs (org_id) VALUES (row('" + Org(1) + "')::hs.wrapped)")
                .find("column org_id is hs.wrapped, not uuid or text"),
            std::string::npos);
  EXPECT_EQ(Query("SELECT count(*) FROM hs.ran"), 0);
  Exec("CREATE TABLE hs.counted (org_id uuid, n integer)");
  Exec("SELECT shared.track_usage('hs.counted', 'api_calls', 'org_id', 'n')");
  Exec("ALTER TABLE hs.counted ALTER COLUMN n TYPE numeric(10,0)");
  Exec("INSERT INTO hs.counted VALUES ('" + Org(1) + "', 4)");
  Exec("ALTER TABLE hs.counted ALTER COLUMN n TYPE text");
  EXPECT_NE(ErrorOf("INSERT INTO hs.counted VALUES ('" + Org(1) + "', '4')")
                .find("must be an integer literal or a column"),
            std::string::npos);
  EXPECT_EQ(Usage(), 4);
  EXPECT_EQ(Query("SELECT active::int FROM shared.tracked_tables WHERE table_name = "
                  "'hs.counted'::regclass"),
            1);
  Exec("ALTER TABLE hs.counted DISABLE TRIGGER meterd_usage_insert");
  EXPECT_EQ(Query("SELECT active::int FROM shared.tracked_tables WHERE table_name = "
                  "'hs.counted'::regclass"),
            0);
}

// A bad row fails the app's statement with the reason; nothing of it is written or billed.
TEST_F(UsageTrackingTest, BadRowsFailTheStatementWithTheirReason) {
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id', 'hours')");
  Exec("UPDATE shared.meters SET max_event_quantity = 1000 WHERE name = 'api_calls'");
  EXPECT_NE(ErrorOf("INSERT INTO hs.jobs (org_id) VALUES ('" + Org(1) + "'), (NULL)")
                .find("1 row(s) without an org in column org_id"),
            std::string::npos);
  EXPECT_NE(ErrorOf("INSERT INTO hs.jobs (org_id, hours) VALUES ('" + Org(1) + "', -2)")
                .find("null or negative"),
            std::string::npos);
  EXPECT_NE(ErrorOf("INSERT INTO hs.jobs (org_id, hours) VALUES ('" + Org(1) + "', 1001)")
                .find("quantity_too_large: 1001 above 1000"),
            std::string::npos);
  EXPECT_EQ(Query("SELECT count(*) FROM hs.jobs"), 0);
  EXPECT_EQ(Usage(), 0);
}

TEST_F(UsageTrackingTest, BadAttachmentsAreRefusedWithTheirReason) {
  Exec("CREATE TABLE public.elsewhere (org_id uuid)");
  Exec("CREATE TABLE hs.numbered (org_id integer)");
  Exec("CREATE TABLE hs.parted (org_id uuid, at date) PARTITION BY RANGE (at)");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"SELECT shared.track_usage('public.elsewhere', 'api_calls', 'org_id')",
       "not an industry schema"},
      {"SELECT shared.track_usage('hs.jobs', 'pages', 'org_id')", "unknown meter pages"},
      {"SELECT shared.track_usage('hs.jobs', 'api_calls', 'tenant')", "no column tenant"},
      {"SELECT shared.track_usage('hs.numbered', 'api_calls', 'org_id')", "not uuid or text"},
      {"SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id', 'hours * 2')",
       "must be an integer literal or a column"},
      {"SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id', 'note')",
       "must be an integer literal or a column"},
      {"SELECT shared.track_usage('hs.parted', 'api_calls', 'org_id')", "is partitioned"},
      {"SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id', '1', '{TRUNCATE}')",
       "on_ops must be"},
  };
  for (const auto& [sql, reason] : cases) {
    EXPECT_NE(ErrorOf(sql).find(reason), std::string::npos) << sql << ": " << ErrorOf(sql);
  }
  EXPECT_EQ(Query("SELECT count(*) FROM shared.usage_tracking"), 0);
  EXPECT_EQ(Query("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'meterd_usage_%'"), 0);
}

// The app's own role, which may not write usage itself, is billed through the trigger; it can
// neither attach tracking nor put meterd's trigger function on a table of its own.
TEST_F(UsageTrackingTest, AppRolesAreBilledButCannotAttachOrForge) {
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id')");
  Exec(
      "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hs_app') THEN "
      "CREATE ROLE hs_app LOGIN; END IF; END $$");
  // Schema usage granted, so what refuses below is the privilege on the object itself.
  Exec("GRANT USAGE ON SCHEMA hs, shared TO hs_app");
  Exec("GRANT INSERT ON hs.jobs TO hs_app");
  Exec("GRANT USAGE ON SEQUENCE hs.jobs_id_seq TO hs_app");
  Exec("GRANT CREATE ON SCHEMA hs TO hs_app");
  const std::string app = UrlAs("hs_app");
  EXPECT_EQ(ErrorOf(InsertRows(25, 5), app), "");
  EXPECT_EQ(Usage(), 25);
  EXPECT_NE(ErrorOf("INSERT INTO shared.api_usage_meters VALUES ('" + Org(1) +
                        "', 'api_calls', 'hs', current_date, 1000)",
                    app)
                .find("permission denied"),
            std::string::npos);
  EXPECT_NE(ErrorOf("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id')", app)
                .find("permission denied for function track_usage"),
            std::string::npos);
  Exec("CREATE TABLE hs.own (org_id uuid)");
  Exec("ALTER TABLE hs.own OWNER TO hs_app");
  EXPECT_NE(ErrorOf("CREATE TRIGGER forged AFTER INSERT ON hs.own REFERENCING NEW TABLE AS "
                    "meterd_new_rows FOR EACH STATEMENT EXECUTE FUNCTION "
                    "shared.tracked_usage_trigger('api_calls', 'hs', 'org_id', '1000000')",
                    app)
                .find("permission denied for function shared.tracked_usage_trigger"),
            std::string::npos);
  // A back-office login may not put a trigger of its own on meterd's tables (it would run
  // with the owner's rights inside meterd's functions), nor write audit rows directly.
  Exec(
      "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ut_backoffice') "
      "THEN CREATE ROLE ut_backoffice LOGIN IN ROLE meterd_admin; END IF; END $$");
  const std::string backoffice = UrlAs("ut_backoffice");
  EXPECT_NE(ErrorOf("CREATE FUNCTION pg_temp.t() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$BEGIN RETURN NULL; END$$; CREATE TRIGGER t AFTER UPDATE ON "
                    "shared.usage_charges FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.t()",
                    backoffice)
                .find("permission denied"),
            std::string::npos);
  EXPECT_NE(ErrorOf("INSERT INTO shared.audit_log (actor, action) VALUES ('role:x', 'forged')",
                    backoffice)
                .find("permission denied"),
            std::string::npos);
  // Nor may the app rewrite the audit trail.
  EXPECT_NE(ErrorOf("DELETE FROM shared.audit_log", app).find("permission denied for table"),
            std::string::npos);
  Exec("REVOKE ALL ON hs.jobs, hs.jobs_id_seq FROM hs_app");
  Exec("REVOKE ALL ON SCHEMA hs, shared FROM hs_app");
  Exec("DROP TABLE hs.own");
}

TEST_F(UsageTrackingTest, TrackedUsageReachesChargesAndAlerts) {
  Exec("INSERT INTO shared.organizations (org_id, name, industry) VALUES ('" + Org(9) +
       "', 'Nine', 'hs')");
  Exec(
      "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
      "current_period_end) VALUES ('" +
      Org(9) +
      "', 'basic', date_trunc('month', now()), date_trunc('month', now()) + "
      "interval '1 month')");
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id')");
  Exec(InsertRows(850, 1, 9));
  EXPECT_EQ(Query("SELECT quantity FROM shared.usage_charges WHERE org_id = '" + Org(9) +
                  "' AND meter = 'api_calls'"),
            850);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.usage_alerts WHERE org_id = '" + Org(9) +
                  "' AND threshold_percent = 80"),
            1);
  Exec(InsertRows(200, 1, 9));
  EXPECT_EQ(Query("SELECT billable_quantity FROM shared.usage_charges WHERE org_id = '" + Org(9) +
                  "' AND meter = 'api_calls'"),
            50);
}

// 100 app transactions of 1-1,000 rows over 20 orgs from 8 connections, a third rolled back,
// while a flush writer commits Kafka deltas for the same orgs and day: usage is exactly the
// committed rows plus the flushed deltas, and nobody deadlocks. The flush latencies with and
// without the app writes are printed (not asserted: this machine is shared).
TEST_F(UsageTrackingTest, ConcurrentAppWritesAndFlushesCountExactlyWithoutDeadlock) {
  Exec("SELECT shared.track_usage('hs.jobs', 'api_calls', 'org_id')");
  constexpr int kOrgs = 20;
  event::MeterRegistry meters = event::MeterRegistry::Defaults();
  auto writer = PgFlushWriter::Create(url_, {"g", "t"}, &meters);
  ASSERT_TRUE(writer.ok()) << writer.status();
  const int32_t today = static_cast<int32_t>(absl::ToUnixSeconds(absl::Now()) / 86'400);
  int64_t next_offset = 0;
  int64_t flushed = 0;
  // One flush: every org gets `quantity` api_calls in industry hs, today.
  auto flush = [&](int64_t quantity) -> absl::Duration {
    SealedPartition s;
    s.partition = 0;
    s.expected_offset = next_offset == 0 ? SealedPartition::kNoStoredOffset : next_offset;
    for (int i = 0; i < kOrgs; ++i) {
      event::UsageEvent e;
      e.org = *event::ParseOrgId(Org(i));
      e.meter = 1;
      e.industry = event::Industry::kHomeServices;
      e.quantity = quantity;
      e.time_micros = int64_t{today} * 86'400'000'000LL + 1;
      s.deltas.Add(e);
    }
    s.next_offset = next_offset + kOrgs;
    const absl::Time start = absl::Now();
    auto outcome = (*writer)->Write({s});
    EXPECT_TRUE(outcome.ok()) << outcome.status();
    if (outcome.ok()) {
      next_offset = s.next_offset;
      flushed += quantity * kOrgs;
    }
    return absl::Now() - start;
  };
  auto percentile = [](std::vector<absl::Duration> v, double p) {
    std::sort(v.begin(), v.end());
    return v.empty() ? absl::ZeroDuration() : v[static_cast<size_t>(p * (v.size() - 1))];
  };
  std::vector<absl::Duration> alone;
  for (int i = 0; i < 30; ++i) alone.push_back(flush(1));

  std::atomic<int> next_tx{0};
  std::atomic<int64_t> committed{0};
  std::atomic<int> failures{0};
  std::vector<std::thread> apps;
  for (int t = 0; t < 8; ++t) {
    apps.emplace_back([&, t] {
      std::mt19937 random(static_cast<uint32_t>(t));
      pqxx::connection conn(url_);
      for (int i = next_tx++; i < 100; i = next_tx++) {
        const int rows = std::uniform_int_distribution<int>(1, 1000)(random);
        const int first = std::uniform_int_distribution<int>(0, kOrgs - 1)(random);
        const int orgs = std::uniform_int_distribution<int>(1, kOrgs - first)(random);
        try {
          pqxx::work tx(conn);
          tx.exec0(InsertRows(rows, orgs, first));
          absl::SleepFor(absl::Milliseconds(random() % 20));  // Hold the row locks a while.
          if (i % 3 == 0) {
            tx.abort();
          } else {
            tx.commit();
            committed += rows;
          }
        } catch (const std::exception& e) {
          ++failures;
          ADD_FAILURE() << "app transaction " << i << ": " << e.what();
        }
      }
    });
  }
  std::vector<absl::Duration> beside_apps;
  while (next_tx.load() < 100) beside_apps.push_back(flush(1 + beside_apps.size() % 7));
  for (std::thread& app : apps) app.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(Query("SELECT count(*) FROM hs.jobs"), committed.load());
  EXPECT_EQ(Usage(), committed.load() + flushed);
  EXPECT_GT(committed.load(), 0);
  EXPECT_GT(beside_apps.size(), 0u);
  std::printf(
      "flush of %d rows: alone p50 %s max %s; beside 8 app writers (%zu flushes) "
      "p50 %s max %s\n",
      kOrgs, absl::FormatDuration(percentile(alone, 0.5)).c_str(),
      absl::FormatDuration(percentile(alone, 1.0)).c_str(), beside_apps.size(),
      absl::FormatDuration(percentile(beside_apps, 0.5)).c_str(),
      absl::FormatDuration(percentile(beside_apps, 1.0)).c_str());
}

}  // namespace
}  // namespace meterd::store
