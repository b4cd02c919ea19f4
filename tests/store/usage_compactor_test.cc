// The usage delta log (migration 0025): flushes append, UsageCompactor folds, readers of
// shared.api_usage_meters see both, against a real Postgres.
#include "lib/store/usage_compactor.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "lib/store/data_protection.h"
#include "lib/store/pg_flush_writer.h"
#include "tests/support/harness.h"

namespace meterd::store {
namespace {

using aggregate::SealedPartition;

constexpr int kOrgs = 40;
constexpr int kDays = 3;

event::OrgId Org(int n) {
  event::OrgId org{};
  org.bytes[0] = 0x10;
  org.bytes[15] = static_cast<uint8_t>(n);
  return org;
}

// Flush `round`: every org on every day and all three meters, quantity 1 + (round + org) % 7.
SealedPartition Round(int round, int64_t* quantity_sum) {
  SealedPartition s;
  s.partition = 0;
  s.expected_offset = round == 0 ? SealedPartition::kNoStoredOffset : round;
  s.next_offset = round + 1;
  for (int org = 0; org < kOrgs; ++org) {
    for (int day = 0; day < kDays; ++day) {
      for (event::MeterId meter = 1; meter <= 3; ++meter) {
        event::UsageEvent e;
        e.org = Org(org);
        e.meter = meter;
        e.industry = event::Industry::kEducation;
        e.quantity = 1 + (round + org) % 7;
        e.time_micros = (event::DaysFromCivil(2026, 11, 24) + day) * 86'400'000'000LL;
        s.deltas.Add(e);
        *quantity_sum += e.quantity;
      }
    }
  }
  return s;
}

class UsageCompactorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("uc_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    meters_ = event::MeterRegistry::Defaults();
    auto writer = PgFlushWriter::Create(url_, {"g", "t"}, &meters_);
    ASSERT_TRUE(writer.ok()) << writer.status();
    writer_ = std::move(writer).value();
  }
  std::unique_ptr<UsageCompactor> Compactor(UsageCompactorOptions options = {}) {
    auto compactor = UsageCompactor::Create(url_, options);
    EXPECT_TRUE(compactor.ok()) << compactor.status();
    return std::move(compactor).value();
  }
  // Writes `rounds` flushes; returns the quantity they carry.
  int64_t Flush(int first_round, int rounds) {
    int64_t sum = 0;
    for (int r = first_round; r < first_round + rounds; ++r) {
      auto outcome = writer_->Write({Round(r, &sum)});
      EXPECT_TRUE(outcome.ok() && outcome->fenced.empty()) << outcome.status();
    }
    return sum;
  }
  int64_t Query(const std::string& sql) { return testing::QueryInt(url_, sql); }
  void Exec(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::nontransaction tx(conn);
    tx.exec0(sql);
  }
  int64_t Total() {
    return Query("SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters");
  }
  int64_t Pending() { return Query("SELECT count(*) FROM ONLY shared.api_usage_deltas"); }

  std::string url_;
  event::MeterRegistry meters_;
  std::unique_ptr<PgFlushWriter> writer_;
};

TEST_F(UsageCompactorTest, FlushesAreVisibleBeforeTheFoldAndOneRowPerKeyAfterIt) {
  const int64_t written = Flush(0, 3);
  const int64_t keys = kOrgs * kDays * 3;
  EXPECT_EQ(Pending(), 3 * keys);
  EXPECT_EQ(Query("SELECT count(*) FROM ONLY shared.api_usage_meters"), 0);
  EXPECT_EQ(Total(), written);  // Visible through the table before any fold.

  auto compactor = Compactor();
  auto folded = compactor->FoldOnce();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(folded->delta_rows, 3 * keys);
  EXPECT_EQ(folded->keys, keys);
  EXPECT_EQ(Pending(), 0);
  EXPECT_EQ(Query("SELECT count(*) FROM ONLY shared.api_usage_meters"), keys);
  EXPECT_EQ(Total(), written);
  // One key, summed: rounds 0, 1, 2 of org 5 carry 1 + (r + 5) % 7 = 6, 7, 1.
  EXPECT_EQ(Query(absl::StrCat("SELECT quantity FROM shared.api_usage_meters WHERE org_id = '",
                               event::OrgIdToString(Org(5)),
                               "' AND meter = 'ai_requests' AND usage_date = '2026-11-25'")),
            14);
  // A second wave folds onto the existing rows.
  const int64_t more = Flush(3, 2);
  folded = compactor->FoldOnce();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(folded->delta_rows, 2 * keys);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters"), keys);
  EXPECT_EQ(Total(), written + more);
  EXPECT_EQ(compactor->metrics().folds->value(), 2);
  EXPECT_EQ(compactor->metrics().delta_rows->value(), 5 * keys);
  EXPECT_EQ(compactor->metrics().keys->value(), 2 * keys);
}

TEST_F(UsageCompactorTest, AFoldMovesAtMostItsBatchAndLeavesTheRestVisible) {
  const int64_t written = Flush(0, 2);
  auto compactor = Compactor({.max_rows_per_fold = 100});
  int folds = 0;
  while (true) {
    auto folded = compactor->FoldOnce();
    ASSERT_TRUE(folded.ok()) << folded.status();
    if (folded->delta_rows == 0) break;
    EXPECT_LE(folded->delta_rows, 100);
    EXPECT_EQ(Total(), written);
    ++folds;
  }
  EXPECT_EQ(folds, (2 * kOrgs * kDays * 3 + 99) / 100);
  EXPECT_EQ(Pending(), 0);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters"), kOrgs * kDays * 3);
}

// Flushes and folds run at the same time; a reader checks every sum it sees lies between what
// was committed before it read and what had been started: a delta counted twice (in the log
// and in its key's row) or in neither would fall outside.
TEST_F(UsageCompactorTest, ConcurrentFlushesFoldsAndReadsNeverDoubleCountOrLose) {
  std::atomic<int64_t> started{0}, committed{0};
  std::atomic<bool> done{false};
  auto compactor = Compactor({.interval = absl::Milliseconds(1), .max_rows_per_fold = 500});
  compactor->Start();
  std::thread flusher([&] {
    for (int r = 0; r < 60; ++r) {
      int64_t sum = 0;
      SealedPartition batch = Round(r, &sum);
      started += sum;
      auto outcome = writer_->Write({batch});
      ASSERT_TRUE(outcome.ok() && outcome->fenced.empty()) << outcome.status();
      committed += sum;
    }
    done = true;
  });
  pqxx::connection reader(url_);
  int reads = 0;
  while (!done) {
    const int64_t low = committed.load();
    pqxx::nontransaction tx(reader);
    const int64_t seen =
        tx.exec1("SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters")[0].as<int64_t>();
    const int64_t high = started.load();
    ASSERT_GE(seen, low) << "a committed delta was not visible";
    ASSERT_LE(seen, high) << "a delta was counted twice";
    ++reads;
  }
  flusher.join();
  compactor->Stop();
  EXPECT_GT(reads, 10);
  EXPECT_GT(compactor->metrics().folds->value(), 1);
  auto rest = Compactor()->FoldOnce();
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(Pending(), 0);
  EXPECT_EQ(Total(), committed.load());
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters"), kOrgs * kDays * 3);
}

TEST_F(UsageCompactorTest, ADeltaOfAnUnknownMeterStaysVisibleAndDoesNotStopTheFold) {
  const int64_t written = Flush(0, 1);
  // As if the meter vanished between a flush and its fold (the log has no foreign key).
  Exec(
      "INSERT INTO shared.api_usage_deltas (org_id, meter, industry, usage_date, "
      "quantity) VALUES ('" +
      event::OrgIdToString(Org(1)) + "', 'gone_meter', 'edu', '2026-11-24', 9)");
  auto folded = Compactor()->FoldOnce();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(folded->delta_rows, kOrgs * kDays * 3);
  EXPECT_EQ(Pending(), 1);
  EXPECT_EQ(Total(), written + 9);
}

TEST_F(UsageCompactorTest, AMeterNamedByPendingDeltasCannotBeRenamedOrDeleted) {
  Flush(0, 1);
  for (const char* change : {"UPDATE shared.meters SET name = 'calls' WHERE name = 'api_calls'",
                             "DELETE FROM shared.meters WHERE name = 'ai_requests'"}) {
    try {
      Exec(change);
      ADD_FAILURE() << change << " succeeded";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("not yet folded"), std::string::npos) << e.what();
    }
  }
}

TEST_F(UsageCompactorTest, ATenantSeesItsOwnDeltasThroughTheTableAndNeverTheLog) {
  const int64_t written = Flush(0, 1);
  pqxx::connection conn(url_);
  {
    pqxx::work tx(conn);
    tx.exec0("SET LOCAL ROLE meterd_org");
    tx.exec0("SET LOCAL app.org_id = '" + event::OrgIdToString(Org(3)) + "'");
    // Org 3 in round 0: quantity 1 + 3 % 7 = 4 on each of 3 days x 3 meters.
    EXPECT_EQ(tx.exec1("SELECT sum(quantity) FROM shared.api_usage_meters")[0].as<int64_t>(),
              4 * kDays * 3);
  }
  pqxx::work tx(conn);
  tx.exec0("SET LOCAL ROLE meterd_org");
  EXPECT_THROW(tx.exec("SELECT * FROM shared.api_usage_deltas"), pqxx::insufficient_privilege);
  EXPECT_GT(written, 0);
}

TEST_F(UsageCompactorTest, OrgExportListsOneUsageRowPerKeyWhetherFoldedOrNot) {
  Flush(0, 2);
  const std::string org = event::OrgIdToString(Org(2));
  Exec("INSERT INTO shared.organizations VALUES ('" + org + "', 'Two', 'edu')");
  auto exported = ExportOrg(url_, org);
  ASSERT_TRUE(exported.ok()) << exported.status();
  pqxx::connection conn(url_);
  pqxx::nontransaction tx(conn);
  const pqxx::row usage = tx.exec_params1(
      "SELECT jsonb_array_length(d->'usage'), (SELECT sum((u->>'quantity')::bigint) "
      "FROM jsonb_array_elements(d->'usage') u), "
      "(d->'usage'->0) ?& ARRAY['org_id', 'meter', 'industry', 'usage_date', 'quantity'] "
      "FROM (SELECT $1::jsonb AS d) x",
      *exported);
  EXPECT_EQ(usage[0].as<int>(), kDays * 3);
  // Org 2, rounds 0 and 1: 3 + 4 per key.
  EXPECT_EQ(usage[1].as<int64_t>(), 7 * kDays * 3);
  EXPECT_TRUE(usage[2].as<bool>());
}

}  // namespace
}  // namespace meterd::store
