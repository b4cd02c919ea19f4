#include "lib/store/pg_flush_writer.h"

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "lib/store/migrations.h"
#include "lib/store/usage_compactor.h"
#include "tests/support/harness.h"

namespace meterd::store {
namespace {

using aggregate::SealedPartition;

event::UsageEvent Event(uint8_t org, int64_t quantity) {
  event::UsageEvent e;
  e.org.bytes[0] = org;
  e.meter = 1;
  e.industry = event::Industry::kRetail;
  e.quantity = quantity;
  e.time_micros = event::DaysFromCivil(2026, 11, 26) * 86'400'000'000LL;
  return e;
}

SealedPartition Sealed(int32_t partition, int64_t expected, int64_t next, int64_t quantity) {
  SealedPartition s;
  s.partition = partition;
  s.expected_offset = expected;
  s.next_offset = next;
  s.deltas.Add(Event(1, quantity));
  return s;
}

class FlushWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("fw_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    meters_ = event::MeterRegistry::Defaults();
  }
  std::unique_ptr<PgFlushWriter> Writer() {
    auto writer = PgFlushWriter::Create(url_, {"g", "t"}, &meters_);
    EXPECT_TRUE(writer.ok()) << writer.status();
    return std::move(writer).value();
  }
  int64_t Total() {
    return testing::QueryInt(url_, "SELECT sum(quantity) FROM shared.api_usage_meters");
  }
  int64_t Offset(int partition) {
    return testing::QueryInt(url_,
                             "SELECT next_offset FROM shared.ingest_offsets WHERE partition = " +
                                 std::to_string(partition));
  }

  std::string url_;
  event::MeterRegistry meters_;
};

TEST_F(FlushWriterTest, WritesCountersAndAdvancesOffsets) {
  auto writer = Writer();
  auto outcome = writer->Write({Sealed(0, SealedPartition::kNoStoredOffset, 100, 7)});
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  EXPECT_TRUE(outcome->fenced.empty());
  EXPECT_EQ(outcome->rows_written, 1u);
  outcome = writer->Write({Sealed(0, 100, 150, 5)});
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  EXPECT_EQ(Total(), 12);
  EXPECT_EQ(Offset(0), 150);
  // Each flush appended one delta row for the key; a fold sums them into one row.
  const std::string rows_of_key =
      "FROM shared.api_usage_meters WHERE industry = 'ret' AND usage_date = '2026-11-26'";
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) FROM ONLY shared.api_usage_deltas"), 2);
  auto compactor = UsageCompactor::Create(url_, {});
  ASSERT_TRUE(compactor.ok()) << compactor.status();
  auto folded = (*compactor)->FoldOnce();
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_EQ(folded->delta_rows, 2);
  EXPECT_EQ(folded->keys, 1);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) " + rows_of_key), 1);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT quantity " + rows_of_key), 12);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) FROM ONLY shared.api_usage_deltas"), 0);
}

// As the flusher hands them over: compacted, one key on two partitions (a producer that did
// not key by org). Written as one row per distinct key, in one transaction with every offset.
TEST_F(FlushWriterTest, CompactedPartitionsSharingAKeyAreWrittenAsOneRowPerKey) {
  auto writer = Writer();
  std::vector<SealedPartition> batch;
  batch.push_back(Sealed(0, SealedPartition::kNoStoredOffset, 10, 3));
  batch.push_back(Sealed(1, SealedPartition::kNoStoredOffset, 20, 0));
  batch[1].deltas = {};
  batch[1].deltas.Add(Event(2, 5));
  batch[1].deltas.Add(Event(9, 1));
  batch.push_back(Sealed(2, SealedPartition::kNoStoredOffset, 30, 4));  // Org 1 again.
  for (SealedPartition& p : batch) aggregate::Compact(p);
  auto outcome = writer->Write(batch);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  EXPECT_TRUE(outcome->fenced.empty());
  EXPECT_EQ(outcome->rows_written, 3u);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) FROM ONLY shared.api_usage_deltas"), 3);
  EXPECT_EQ(
      testing::QueryInt(url_, "SELECT quantity FROM ONLY shared.api_usage_deltas WHERE org_id = '" +
                                  event::OrgIdToString(Event(1, 0).org) + "'"),
      7);
  EXPECT_EQ(Total(), 3 + 5 + 1 + 4);
  EXPECT_EQ(Offset(0), 10);
  EXPECT_EQ(Offset(1), 20);
  EXPECT_EQ(Offset(2), 30);
}

TEST_F(FlushWriterTest, StaleWriterIsFencedAndWritesNothing) {
  auto owner = Writer();
  auto zombie = Writer();
  ASSERT_TRUE(owner
                  ->Write({Sealed(0, SealedPartition::kNoStoredOffset, 100, 7),
                           Sealed(1, SealedPartition::kNoStoredOffset, 40, 1)})
                  .ok());
  // The zombie still believes partition 0 starts at 50 (it lost the partition long ago);
  // its batch also carries a valid-looking partition 1 advance.
  SealedPartition rejected_carrier = Sealed(1, 40, 60, 1000);
  rejected_carrier.deltas.Reject(41, event::RejectReason::kNotJson, "x", "{");
  auto outcome = zombie->Write({Sealed(0, 50, 120, 1000), rejected_carrier});
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  ASSERT_EQ(outcome->fenced.size(), 1u);
  EXPECT_EQ(outcome->fenced[0].partition, 0);
  EXPECT_EQ(outcome->fenced[0].stored_offset, 100);
  // The whole transaction rolled back: no counter, offset or rejected event of the zombie.
  EXPECT_EQ(Total(), 8);
  EXPECT_EQ(Offset(0), 100);
  EXPECT_EQ(Offset(1), 40);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) FROM shared.rejected_events"), 0);

  // A second claim of a partition that already has a row is fenced too.
  outcome = zombie->Write({Sealed(0, SealedPartition::kNoStoredOffset, 10, 1000)});
  ASSERT_TRUE(outcome.ok());
  EXPECT_EQ(outcome->fenced.size(), 1u);
  EXPECT_EQ(Total(), 8);
}

TEST_F(FlushWriterTest, RetryOfCommittedBatchIsFencedNotDoubleCounted) {
  auto writer = Writer();
  const std::vector<SealedPartition> batch = {Sealed(0, SealedPartition::kNoStoredOffset, 10, 3)};
  ASSERT_TRUE(writer->Write(batch).ok());
  // As after an ambiguous commit: the same batch again.
  auto outcome = writer->Write(batch);
  ASSERT_TRUE(outcome.ok());
  EXPECT_EQ(outcome->fenced.size(), 1u);
  EXPECT_EQ(Total(), 3);
}

TEST_F(FlushWriterTest, RejectedEventsKeepRawBytesAndReason) {
  auto writer = Writer();
  SealedPartition s = Sealed(2, SealedPartition::kNoStoredOffset, 5, 1);
  const std::string raw("{\"a\":\x01\xff\0", 9);
  s.deltas.Reject(4, event::RejectReason::kBadIndustry, "data.industry", raw);
  ASSERT_TRUE(writer->Write({s}).ok());
  pqxx::connection conn(url_);
  pqxx::read_transaction tx(conn);
  auto row = tx.exec1(
      "SELECT topic, partition, kafka_offset, reason, detail, raw, raw_truncated "
      "FROM shared.rejected_events");
  EXPECT_EQ(row[0].as<std::string>(), "t");
  EXPECT_EQ(row[1].as<int>(), 2);
  EXPECT_EQ(row[2].as<int64_t>(), 4);
  EXPECT_EQ(row[3].as<std::string>(), "bad_industry");
  EXPECT_EQ(row[4].as<std::string>(), "data.industry");
  EXPECT_EQ(pqxx::binarystring(row[5]).str(), raw);
  EXPECT_FALSE(row[6].as<bool>());
}

TEST_F(FlushWriterTest, LoadOffsetsReturnsOnlyThisGroupAndTopic) {
  auto writer = Writer();
  ASSERT_TRUE(writer->Write({Sealed(3, SealedPartition::kNoStoredOffset, 77, 1)}).ok());
  auto other = PgFlushWriter::Create(url_, {"other", "t"}, &meters_);
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE((*other)->Write({Sealed(3, SealedPartition::kNoStoredOffset, 5, 1)}).ok());
  auto offsets = writer->LoadOffsets();
  ASSERT_TRUE(offsets.ok());
  ASSERT_EQ(offsets->size(), 1u);
  EXPECT_EQ(offsets->at(3), 77);
}

TEST_F(FlushWriterTest, MigrationsAreIdempotentAndSchemaCheckPasses) {
  auto again = ApplyMigrations(url_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0);
  EXPECT_TRUE(CheckSchemaCurrent(url_).ok());
  const std::string empty = testing::SharedPostgres().CreateDatabase("fw_empty");
  absl::Status status = CheckSchemaCurrent(empty);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("meterd migrate"), absl::string_view::npos);
}

TEST_F(FlushWriterTest, RefreshMetersPublishesNewMetersAndMaximaButNoRenames) {
  auto writer = Writer();
  auto exec = [&](const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0(sql);
    tx.commit();
  };
  exec(
      "INSERT INTO shared.meters (meter_id, name, unit, max_event_quantity) VALUES "
      "(10, 'gpu_seconds', 'second', 50), (11, 'storage_gb', 'gigabyte', 5)");
  EXPECT_FALSE(meters_.Find("gpu_seconds").has_value());
  ASSERT_TRUE(writer->RefreshMeters().ok());
  EXPECT_EQ(meters_.Find("gpu_seconds"), event::MeterId{10});
  EXPECT_EQ(meters_.MaxQuantity(10), 50);
  EXPECT_EQ(meters_.size(), 5u);

  // The new meter's counters flush under its name.
  SealedPartition s;
  s.partition = 0;
  s.next_offset = 1;
  event::UsageEvent e = Event(1, 40);
  e.meter = 10;
  s.deltas.Add(e);
  ASSERT_TRUE(writer->Write({s}).ok());
  EXPECT_EQ(testing::QueryInt(
                url_, "SELECT quantity FROM shared.api_usage_meters WHERE meter = 'gpu_seconds'"),
            40);

  exec("UPDATE shared.meters SET max_event_quantity = 70 WHERE meter_id = 10");
  exec("UPDATE shared.meters SET name = 'storage_gib' WHERE meter_id = 11");
  ASSERT_TRUE(writer->RefreshMeters().ok());
  EXPECT_EQ(meters_.MaxQuantity(10), 70);
  // A published name never changes under the parsers; the rename waits for a restart.
  EXPECT_EQ(meters_.Name(11), "storage_gb");
  EXPECT_FALSE(meters_.Find("storage_gib").has_value());
  auto loaded = LoadMeters(url_);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->Find("storage_gib"), event::MeterId{11});
  EXPECT_EQ(loaded->MaxQuantity(10), 70);
}

TEST_F(FlushWriterTest, SchemaCheckNamesAMissingMigrationEvenBelowTheNewest) {
  {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0("DELETE FROM shared.schema_migrations WHERE version = 2");
    tx.commit();
  }
  absl::Status status = CheckSchemaCurrent(url_);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(status.message().find("0002_billing_schema"), absl::string_view::npos) << status;
}

TEST_F(FlushWriterTest, UnreachablePostgresIsUnavailable) {
  auto writer = PgFlushWriter::Create("postgresql://postgres@127.0.0.1:1/x?connect_timeout=2",
                                      {"g", "t"}, &meters_);
  ASSERT_FALSE(writer.ok());
  EXPECT_EQ(writer.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace meterd::store
