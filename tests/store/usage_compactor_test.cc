// The usage delta log (migration 0025): flushes append, UsageCompactor folds, readers of
// shared.api_usage_meters see both, against a real Postgres.
#include "lib/store/usage_compactor.h"

#include <atomic>
#include <thread>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/status/statusor.h"
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

// Flushes and folds run at the same time; a reader checks, in one statement, the sum it sees
// against the offset committed with it: round r commits offset r + 1, so the sum must be
// exactly that of rounds 0..offset-1. A delta counted twice (in the log and in its key's row)
// or in neither would differ.
TEST_F(UsageCompactorTest, ConcurrentFlushesFoldsAndReadsNeverDoubleCountOrLose) {
  constexpr int kRounds = 60;
  std::vector<int64_t> committed_sum = {0};  // Sum of rounds 0..i-1.
  for (int r = 0; r < kRounds; ++r) {
    int64_t sum = 0;
    Round(r, &sum);
    committed_sum.push_back(committed_sum.back() + sum);
  }
  std::atomic<bool> done{false};
  auto compactor = Compactor({.interval = absl::Milliseconds(1), .max_rows_per_fold = 500});
  compactor->Start();
  std::thread flusher([&] {
    for (int r = 0; r < kRounds; ++r) {
      int64_t sum = 0;
      auto outcome = writer_->Write({Round(r, &sum)});
      if (!outcome.ok() || !outcome->fenced.empty()) {
        ADD_FAILURE() << "flush " << r << ": " << outcome.status();
        break;
      }
    }
    done = true;
  });
  pqxx::connection reader(url_);
  int reads = 0, mismatches = 0;
  while (!done) {
    pqxx::nontransaction tx(reader);
    const pqxx::row row = tx.exec1(
        "SELECT coalesce(sum(quantity), 0), (SELECT coalesce(max(next_offset), 0) FROM "
        "shared.ingest_offsets) FROM shared.api_usage_meters");
    const int64_t seen = row[0].as<int64_t>();
    const auto offset = row[1].as<size_t>();
    ASSERT_LT(offset, committed_sum.size());
    if (seen != committed_sum[offset]) {
      ADD_FAILURE() << "read " << reads << ": sum " << seen << " with " << offset
                    << " flushes committed, which carry " << committed_sum[offset];
      if (++mismatches > 5) break;
    }
    ++reads;
  }
  flusher.join();
  compactor->Stop();
  EXPECT_GT(reads, 10);
  EXPECT_GT(compactor->metrics().folds->value(), 1);
  auto rest = Compactor()->FoldOnce();
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(Pending(), 0);
  EXPECT_EQ(Total(), committed_sum.back());
  EXPECT_EQ(Query("SELECT count(*) FROM shared.api_usage_meters"), kOrgs * kDays * 3);
}

// The log has no foreign key: a flush locks the meters its rows name instead. A rename that
// got in first makes the flush (which still knows the old name) fail, nothing written, to be
// retried; it is never counted under a name shared.meters no longer has.
TEST_F(UsageCompactorTest, AFlushNamingAMeterRenamedMeanwhileFailsAndWritesNothing) {
  Exec("INSERT INTO shared.meters (meter_id, name, unit) VALUES (4, 'gpu_seconds', 'second')");
  ASSERT_TRUE(writer_->RefreshMeters().ok());
  auto gpu = [](int64_t expected, int64_t next) {
    SealedPartition s;
    s.expected_offset = expected;
    s.next_offset = next;
    event::UsageEvent e;
    e.org = Org(1);
    e.meter = 4;
    e.industry = event::Industry::kEducation;
    e.quantity = 3;
    e.time_micros = event::DaysFromCivil(2026, 11, 24) * 86'400'000'000LL;
    s.deltas.Add(e);
    return s;
  };
  pqxx::connection renamer(url_);
  pqxx::work rename(renamer);
  rename.exec0("UPDATE shared.meters SET name = 'gpu_time' WHERE name = 'gpu_seconds'");
  absl::StatusOr<FlushOutcome> outcome;
  std::thread flush([&] { outcome = writer_->Write({gpu(SealedPartition::kNoStoredOffset, 1)}); });
  absl::SleepFor(absl::Milliseconds(300));  // The flush now waits for the meter's row.
  rename.commit();
  flush.join();
  ASSERT_FALSE(outcome.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(outcome.status())) << outcome.status();
  EXPECT_NE(outcome.status().message().find("no longer in shared.meters"), std::string::npos)
      << outcome.status();
  EXPECT_EQ(Pending(), 0);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.ingest_offsets"), 0);
  // Renamed back, the retried flush commits; a rename now meets its deltas: refused.
  Exec("UPDATE shared.meters SET name = 'gpu_seconds' WHERE name = 'gpu_time'");
  outcome = writer_->Write({gpu(SealedPartition::kNoStoredOffset, 1)});
  ASSERT_TRUE(outcome.ok() && outcome->fenced.empty()) << outcome.status();
  EXPECT_EQ(Pending(), 1);
  EXPECT_THROW(Exec("UPDATE shared.meters SET name = 'gpu_time' WHERE name = 'gpu_seconds'"),
               std::exception);
}

// What reads one key or one day's total sums its rows, folded or not.
TEST_F(UsageCompactorTest, DayTotalsAndPeaksCountUnfoldedDeltas) {
  Flush(0, 2);
  const std::string org = event::OrgIdToString(Org(5));
  // Org 5, rounds 0 and 1: 6 + 7 on every day, in two delta rows per day.
  EXPECT_EQ(Query("SELECT peak_day_quantity FROM shared.api_usage_analytics WHERE org_id = '" +
                  org + "' AND meter = 'api_calls'"),
            13);
  // increment_api_usage returns the day's new total, deltas included.
  int64_t sum = 0;
  SealedPartition today = Round(2, &sum);
  today.deltas.counters.clear();
  event::UsageEvent e;
  e.org = Org(5);
  e.meter = 1;
  e.industry = event::Industry::kEducation;
  e.quantity = 40;
  e.time_micros = absl::ToUnixMicros(absl::Now());
  today.deltas.Add(e);
  ASSERT_TRUE(writer_->Write({today}).ok());
  pqxx::connection conn(url_);
  pqxx::work tx(conn);
  EXPECT_EQ(tx.exec1("SELECT shared.increment_api_usage('" + org + "', 'api_calls', 2, 'edu')")[0]
                .as<int64_t>(),
            42);
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
