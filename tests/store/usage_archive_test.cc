// Monthly archive tables of shared.api_usage_meters (migration 0027): closed months move out of
// the hot table, every reader sees the same totals, against a real Postgres.
#include "lib/store/usage_archive.h"

#include <atomic>
#include <thread>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/civil_time.h"
#include "lib/store/data_protection.h"
#include "lib/store/usage_compactor.h"
#include "tests/support/harness.h"

namespace meterd::store {
namespace {

constexpr char kOrgA[] = "a0000000-0000-4000-8000-00000000000a";
constexpr char kOrgB[] = "b0000000-0000-4000-8000-00000000000b";

// 2026-11-27 12:00 UTC: with the default 62-day late window, events are accepted from
// 2026-09-25 on, so July and August are closed and September is still open.
absl::Time Now() {
  return absl::FromCivil(absl::CivilSecond(2026, 11, 27, 12, 0, 0), absl::UTCTimeZone());
}
constexpr char kNow[] = "2026-11-27T12:00:00Z";

class UsageArchiveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("ua_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    // (org, meter, day, quantity): two closed months, the open September, this month.
    for (const char* org : {kOrgA, kOrgB}) {
      for (const auto& [meter, day, quantity] :
           std::vector<std::tuple<std::string, std::string, int>>{
               {"api_calls", "2026-07-15", 700},
               {"api_calls", "2026-08-01", 1200},
               {"ai_requests", "2026-08-31", 30},
               {"api_calls", "2026-09-30", 90},
               {"data_exports", "2026-11-20", 4}}) {
        Exec(
            absl::StrCat("INSERT INTO shared.api_usage_meters (org_id, meter, industry, "
                         "usage_date, quantity) VALUES ('",
                         org, "', '", meter, "', 'edu', '", day, "', ", quantity, ")"));
      }
    }
  }
  void Exec(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::nontransaction tx(conn);
    tx.exec0(sql);
  }
  int64_t Query(const std::string& sql) { return testing::QueryInt(url_, sql); }
  int64_t Sum(const std::string& where) {
    return Query("SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters WHERE " + where);
  }
  int64_t HotRows(const std::string& where) {
    return Query("SELECT count(*) FROM ONLY shared.api_usage_meters WHERE " + where);
  }
  // What the close would bill org A on the Pro plan for August (micro-dollars).
  int64_t AugustChargesOfA() {
    return Query(absl::StrCat("SELECT sum(amount_micros) FROM shared.charges_for_period('", kOrgA,
                              "', 'pro', '2026-08-01T00:00Z', '2026-09-01T00:00Z')"));
  }
  std::vector<ArchivedMonth> Archive(int batch_rows = 100'000) {
    auto archived = ArchiveUsage(url_, Now(), batch_rows);
    EXPECT_TRUE(archived.ok()) << archived.status();
    return archived.ok() ? *archived : std::vector<ArchivedMonth>{};
  }

  std::string url_;
};

TEST_F(UsageArchiveTest, ClosedMonthsMoveToTheirTablesAndEveryReaderSeesTheSameTotals) {
  const int64_t total = Sum("true");
  const int64_t charges = AugustChargesOfA();
  ASSERT_EQ(total, 2 * (700 + 1200 + 30 + 90 + 4));
  ASSERT_GT(charges, 0);

  // Batches of one row, each its own transaction.
  const std::vector<ArchivedMonth> archived = Archive(1);
  ASSERT_EQ(archived.size(), 2u);
  EXPECT_EQ(archived[0].month, "2026-07-01");
  EXPECT_EQ(archived[0].rows, 2);
  EXPECT_EQ(archived[1].month, "2026-08-01");
  EXPECT_EQ(archived[1].rows, 4);
  EXPECT_EQ(ArchiveSummaryJson(archived),
            R"({"months":[{"month":"2026-07-01","rows":2},{"month":"2026-08-01","rows":4}],)"
            R"("rows":6})");

  // The hot table keeps only the open months; each closed month is one table.
  EXPECT_EQ(HotRows("usage_date < '2026-09-01'"), 0);
  EXPECT_EQ(HotRows("true"), 4);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters_2026_07"), 2);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters_2026_08"), 4);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.usage_archive_months"), 2);
  // Readers of shared.api_usage_meters (sums, the billing functions) see the same usage.
  EXPECT_EQ(Sum("true"), total);
  EXPECT_EQ(Sum(absl::StrCat("org_id = '", kOrgA, "' AND usage_date = '2026-08-01'")), 1200);
  EXPECT_EQ(AugustChargesOfA(), charges);

  // A month's table holds only its month: a date range outside it does not read it.
  pqxx::connection conn(url_);
  {
    pqxx::nontransaction tx(conn);
    auto plan = [&](const std::string& where) {
      std::string text;
      for (const auto& row :
           tx.exec("EXPLAIN SELECT sum(quantity) FROM shared.api_usage_meters WHERE " + where)) {
        text += row[0].as<std::string>() + "\n";
      }
      return text;
    };
    const std::string open_months = plan("usage_date >= '2026-09-01'");
    EXPECT_EQ(open_months.find("api_usage_meters_2026_0"), std::string::npos) << open_months;
    const std::string august = plan("usage_date >= '2026-08-10' AND usage_date < '2026-08-20'");
    EXPECT_NE(august.find("api_usage_meters_2026_08"), std::string::npos) << august;
    EXPECT_EQ(august.find("api_usage_meters_2026_07"), std::string::npos) << august;
    EXPECT_THROW(tx.exec0("INSERT INTO shared.api_usage_meters_2026_08 (org_id, meter, industry,"
                          " usage_date, quantity) VALUES ('" +
                          std::string(kOrgA) + "', 'api_calls', 'edu', '2026-09-01', 1)"),
                 pqxx::check_violation);
  }
  // Row-level security holds for the archived rows: a tenant sees its own, and cannot read a
  // month's table directly.
  {
    pqxx::work tx(conn);
    tx.exec0("SET LOCAL ROLE meterd_org");
    tx.exec0(absl::StrCat("SET LOCAL app.org_id = '", kOrgA, "'"));
    auto seen = tx.exec1(absl::StrCat(
        "SELECT count(*) FILTER (WHERE org_id <> '", kOrgA,
        "'), sum(quantity) FROM shared.api_usage_meters WHERE usage_date < '2026-09-01'"));
    EXPECT_EQ(seen[0].as<int64_t>(), 0);
    EXPECT_EQ(seen[1].as<int64_t>(), 700 + 1200 + 30);
  }
  {
    pqxx::work tx(conn);
    tx.exec0("SET LOCAL ROLE meterd_org");
    EXPECT_THROW(tx.exec("SELECT * FROM shared.api_usage_meters_2026_08"),
                 pqxx::insufficient_privilege);
  }

  // Nothing left to move: a second run archives nothing and changes nothing.
  EXPECT_TRUE(Archive().empty());
  EXPECT_EQ(Sum("true"), total);
}

TEST_F(UsageArchiveTest, LateRowsOfAnArchivedMonthAreSummedIntoItsTableByTheNextRun) {
  ASSERT_EQ(Archive().size(), 2u);
  // A delta flushed for an archived key (the late window raised after the archive), folded into the
  // hot table: until the next run the key has one row in each table, and readers sum them.
  Exec(
      absl::StrCat("INSERT INTO shared.api_usage_deltas (org_id, meter, industry, usage_date, "
                   "quantity) VALUES ('",
                   kOrgA, "', 'api_calls', 'edu', '2026-08-01', 5)"));
  const std::string key =
      absl::StrCat("org_id = '", kOrgA, "' AND meter = 'api_calls' AND usage_date = '2026-08-01'");
  EXPECT_EQ(Sum(key), 1205);
  auto compactor = UsageCompactor::Create(url_, {});
  ASSERT_TRUE(compactor.ok()) << compactor.status();
  auto folded = (*compactor)->FoldOnce();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(folded->delta_rows, 1);
  EXPECT_EQ(HotRows(key), 1);
  EXPECT_EQ(Sum(key), 1205);

  const std::vector<ArchivedMonth> again = Archive();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].month, "2026-08-01");
  EXPECT_EQ(again[0].rows, 1);
  EXPECT_EQ(HotRows(key), 0);
  // One row per key in the month's table, the late quantity added to it.
  EXPECT_EQ(Query("SELECT quantity FROM shared.api_usage_meters_2026_08 WHERE " + key), 1205);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters_2026_08"), 4);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.audit_log WHERE action = 'usage.archived'"), 3);
}

// Each batch is atomic: a reader summing the whole table while a month moves in small batches
// sees the same total in every statement, and sees the month partly moved.
TEST_F(UsageArchiveTest, ReadersSeeTheSameTotalWhileAMonthMoves) {
  Exec(
      "INSERT INTO shared.api_usage_meters (org_id, meter, industry, usage_date, quantity) "
      "SELECT ('c0000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 'api_calls', 'hs', "
      "'2026-08-01'::date + (n % 31), n FROM generate_series(1, 4000) n");
  const int64_t total = Sum("true");
  std::atomic<bool> done{false};
  absl::StatusOr<std::vector<ArchivedMonth>> archived;
  std::thread archiver([&] {
    archived = ArchiveUsage(url_, Now(), 25);
    done = true;
  });
  pqxx::connection conn(url_);
  int reads = 0;
  int partly_moved = 0;
  int mismatches = 0;
  while (!done) {
    pqxx::read_transaction tx(conn);
    const auto row = tx.exec1(
        "SELECT (SELECT sum(quantity) FROM shared.api_usage_meters), "
        "(SELECT count(*) FROM ONLY shared.api_usage_meters WHERE usage_date < '2026-09-01')");
    mismatches += row[0].as<int64_t>() != total;  // (No ASSERT: the archiver must be joined.)
    partly_moved += row[1].as<int64_t>() > 0 && row[1].as<int64_t>() < 4006;
    ++reads;
  }
  archiver.join();
  EXPECT_EQ(mismatches, 0) << "of " << reads << " reads";
  ASSERT_TRUE(archived.ok()) << archived.status();
  EXPECT_EQ(Sum("true"), total);
  EXPECT_EQ(HotRows("usage_date < '2026-09-01'"), 0);
  EXPECT_GT(partly_moved, 0) << reads << " reads";
}

// Erasure and export reach the month tables through the parent, as they reach the delta log.
TEST_F(UsageArchiveTest, EraseAndExportReachArchivedMonths) {
  ASSERT_EQ(Archive().size(), 2u);
  auto exported = ExportOrg(url_, kOrgA);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_NE(exported->find("2026-07-15"), std::string::npos) << *exported;
  EXPECT_NE(exported->find("2026-08-31"), std::string::npos) << *exported;

  const int64_t total = Sum("true");
  auto erased = EraseOrg(url_, kOrgA);
  ASSERT_TRUE(erased.ok()) << erased.status();
  EXPECT_EQ(Sum(absl::StrCat("org_id = '", kOrgA, "'")), 0);
  EXPECT_EQ(Query(absl::StrCat("SELECT count(*) FROM shared.api_usage_meters_2026_08 WHERE ",
                               "org_id = '", kOrgA, "'")),
            0);
  // Usage stays, under the new pseudonymous id.
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters_2026_08"), 4);
  EXPECT_EQ(Sum("true"), total);
}

TEST_F(UsageArchiveTest, AMonthTheLateWindowStillReachesIsRefused) {
  for (const char* month : {"2026-09-01", "2026-11-01"}) {
    for (const char* function :
         {"archive_usage_month('%s', 1000, '%s')", "create_usage_month_table('%s', '%s')"}) {
      const std::string call = absl::StrFormat(function, month, kNow);
      EXPECT_EQ(testing::SqlStateOf(url_, "SELECT shared." + call), "22023") << call;
    }
  }
  // No reference can open the guard: NULL and future ones are taken as now() (this month is
  // open whenever the test runs).
  for (const char* ref : {"NULL", "'infinity'", "now() + interval '10 years'"}) {
    const std::string call =
        absl::StrCat("SELECT shared.create_usage_month_table(current_date, ", ref, ")");
    EXPECT_EQ(testing::SqlStateOf(url_, call), "22023") << call;
  }
  EXPECT_EQ(Query("SELECT count(*) FROM shared.usage_archive_months"), 0);
  // A closed month with no row in the hot table: nothing to create.
  EXPECT_EQ(Query(absl::StrCat("SELECT count(*) FROM shared.create_usage_month_table("
                               "'2026-05-01', '",
                               kNow, "') WHERE create_usage_month_table IS NOT NULL")),
            0);
  // Moving rows needs the month's table first (created and committed on its own).
  EXPECT_EQ(
      testing::SqlStateOf(
          url_, absl::StrCat("SELECT shared.archive_usage_month('2026-08-01', 10, '", kNow, "')")),
      "55000");
  EXPECT_EQ(HotRows("usage_date < '2026-09-01'"), 6);
  // A wider late window keeps August open too.
  Exec("UPDATE shared.billing_settings SET late_window = interval '90 days'");
  const std::vector<ArchivedMonth> archived = Archive();
  ASSERT_EQ(archived.size(), 1u);
  EXPECT_EQ(archived[0].month, "2026-07-01");
  EXPECT_EQ(HotRows("usage_date >= '2026-08-01' AND usage_date < '2026-09-01'"), 4);
  EXPECT_EQ(ArchiveUsage(url_, Now(), 0).status().code(), absl::StatusCode::kInvalidArgument);
}

// A month table taken out of the hierarchy (ALTER TABLE ... NO INHERIT) no longer receives
// rows: they would vanish from every reader. The run fails, naming it; the rows stay where
// readers see them; re-attached, the next run moves them.
TEST_F(UsageArchiveTest, ADetachedMonthTableReceivesNothing) {
  ASSERT_EQ(Archive().size(), 2u);
  Exec("ALTER TABLE shared.api_usage_meters_2026_08 NO INHERIT shared.api_usage_meters");
  Exec(
      absl::StrCat("INSERT INTO shared.api_usage_meters (org_id, meter, industry, usage_date, "
                   "quantity) VALUES ('",
                   kOrgB, "', 'data_exports', 'edu', '2026-08-05', 5)"));
  auto refused = ArchiveUsage(url_, Now(), 100);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("api_usage_meters_2026_08 exists but is not"),
            std::string::npos)
      << refused.status();
  EXPECT_EQ(Sum("usage_date = '2026-08-05'"), 5);
  EXPECT_EQ(HotRows("usage_date = '2026-08-05'"), 1);

  Exec("ALTER TABLE shared.api_usage_meters_2026_08 INHERIT shared.api_usage_meters");
  const std::vector<ArchivedMonth> archived = Archive();
  ASSERT_EQ(archived.size(), 1u);
  EXPECT_EQ(archived[0].rows, 1);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters_2026_08"), 5);
  EXPECT_EQ(Sum("usage_date = '2026-08-05'"), 5);
}

}  // namespace
}  // namespace meterd::store
