// `meterd replay-rejected`'s library against a real Postgres. Rejections are stored the way
// the daemon stores them: parsed by EventParser, written by PgFlushWriter.
#include "lib/store/rejected_replay.h"

#include <thread>

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/store/pg_flush_writer.h"
#include "tests/support/harness.h"

namespace meterd::store {
namespace {

using aggregate::SealedPartition;

constexpr char kOrg[] = "00000000-0000-4000-8000-00000000b001";
constexpr char kOtherOrg[] = "00000000-0000-4000-8000-00000000b002";

class RejectedReplayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("rr_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    auto writer = PgFlushWriter::Create(url_, {"g", "t"}, &meters_);
    ASSERT_TRUE(writer.ok()) << writer.status();
    writer_ = std::move(writer).value();
  }

  // Each message is one Kafka message: parsed as a shard parses it (with the meters the
  // daemon had), its events counted and its rejections stored, in one flush.
  void Ingest(const std::vector<std::string>& messages, absl::Time now = absl::Now()) {
    event::EventParser parser(&meters_, {});
    SealedPartition s;
    s.partition = 0;
    s.expected_offset = next_offset_ == 0 ? SealedPartition::kNoStoredOffset : next_offset_;
    for (const std::string& message : messages) {
      const event::ParsedMessage& parsed = parser.Parse(message, now);
      for (const event::UsageEvent& e : parsed.events) s.deltas.Add(e);
      for (const event::Rejection& r : parsed.rejections) {
        s.deltas.Reject(next_offset_, r.reason, r.detail, r.raw);
      }
      ++next_offset_;
    }
    s.next_offset = next_offset_;
    auto outcome = writer_->Write({s});
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    ASSERT_TRUE(outcome->fenced.empty());
  }

  void Exec(const std::string& sql) {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0(sql);
    tx.commit();
  }

  int64_t Query(const std::string& sql) { return testing::QueryInt(url_, sql); }

  int64_t Total(const std::string& meter) {
    return Query("SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters WHERE meter = '" +
                 meter + "'");
  }

  ReplaySummary Replay(const std::string& reason, ReplayOptions options = {}) {
    options.reason = reason;
    auto summary = ReplayRejected(url_, options, absl::Now());
    EXPECT_TRUE(summary.ok()) << summary.status();
    return summary.ok() ? *summary : ReplaySummary{};
  }

  std::string url_;
  event::MeterRegistry meters_ = event::MeterRegistry::Defaults();
  std::unique_ptr<PgFlushWriter> writer_;
  int64_t next_offset_ = 0;
};

std::string Event(const std::string& org, const std::string& meter, int64_t quantity,
                  const std::string& industry = "hs") {
  return testing::UsageEventJson(org, meter, quantity, industry);
}

TEST_F(RejectedReplayTest, CountsEachRowOnceAndLeavesWhatStillFails) {
  // A batch whose first element counts now and whose second waits for its meter.
  const std::string batch =
      absl::StrCat("[", Event(kOrg, "api_calls", 1), ",", Event(kOrg, "gpu_seconds", 5), "]");
  // Stored, but cut at 4 KiB: never replayable.
  std::string truncated = Event(kOrg, "gpu_seconds", 1000);
  truncated.insert(1, absl::StrCat(R"("padding":")", std::string(5000, 'x'), R"(",)"));
  Ingest({Event(kOrg, "gpu_seconds", 2), Event(kOrg, "gpu_seconds", 3),
          Event(kOrg, "gpu_seconds", 4, "rest"), Event(kOtherOrg, "gpu_seconds", 7), batch,
          Event(kOrg, "teleports", 100), truncated});
  ASSERT_EQ(Query("SELECT count(*) FROM shared.rejected_events WHERE reason = 'unknown_meter'"), 7);
  ASSERT_EQ(Query("SELECT count(*) FROM shared.rejected_events WHERE raw_truncated"), 1);
  ASSERT_EQ(Total("api_calls"), 1);

  // Nothing to count before the meter exists.
  const ReplaySummary early = Replay("unknown_meter");
  EXPECT_EQ(early.rows_examined, 7);
  EXPECT_EQ(early.rows_replayed, 0);
  EXPECT_EQ(early.still_rejected.at("unknown_meter"), 6);
  EXPECT_EQ(early.truncated, 1);
  EXPECT_EQ(Total("gpu_seconds"), 0);

  Exec("INSERT INTO shared.meters (meter_id, name, unit) VALUES (10, 'gpu_seconds', 'second')");
  const ReplaySummary first = Replay("unknown_meter");
  EXPECT_EQ(first.rows_examined, 7);
  EXPECT_EQ(first.rows_replayed, 5);
  EXPECT_EQ(first.events_counted, 5);
  EXPECT_EQ(first.quantity_counted, 2 + 3 + 4 + 7 + 5);
  EXPECT_EQ(first.still_rejected.size(), 1u);
  EXPECT_EQ(first.still_rejected.at("unknown_meter"), 1);  // teleports
  EXPECT_EQ(first.truncated, 1);
  EXPECT_EQ(ReplaySummaryJson(first),
            R"({"rows_examined":7,"rows_replayed":5,"events_counted":5,"quantity_counted":21,)"
            R"("duplicates":0,"still_rejected":{"unknown_meter":1},"truncated":1})");
  // Audited per org in the chunk's transaction, with what was counted by meter.
  EXPECT_EQ(Query("SELECT count(*) FROM shared.audit_log WHERE action = 'usage.replayed'"), 2);
  EXPECT_EQ(Query(absl::StrCat("SELECT (after->'quantity_by_meter'->>'gpu_seconds')::bigint FROM "
                               "shared.audit_log WHERE action = 'usage.replayed' AND org_id = '",
                               kOrg, "' AND after->>'reason' = 'unknown_meter'")),
            2 + 3 + 4 + 5);
  // One row per distinct key, the same as a flush would have written.
  const std::string today = "(now() AT TIME ZONE 'UTC')::date";
  EXPECT_EQ(Query(absl::StrCat("SELECT quantity FROM shared.api_usage_meters WHERE org_id = '",
                               kOrg, "' AND meter = 'gpu_seconds' AND industry = 'hs' ",
                               "AND usage_date = ", today)),
            2 + 3 + 5);
  EXPECT_EQ(Query(absl::StrCat("SELECT quantity FROM shared.api_usage_meters WHERE org_id = '",
                               kOrg, "' AND meter = 'gpu_seconds' AND industry = 'rest'")),
            4);
  EXPECT_EQ(Query(absl::StrCat("SELECT quantity FROM shared.api_usage_meters WHERE org_id = '",
                               kOtherOrg, "' AND meter = 'gpu_seconds'")),
            7);
  EXPECT_EQ(Total("api_calls"), 1);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.rejected_events WHERE replayed_at IS NOT NULL"), 5);

  const ReplaySummary second = Replay("unknown_meter");
  EXPECT_EQ(second.rows_examined, 2);
  EXPECT_EQ(second.rows_replayed, 0);
  EXPECT_EQ(second.events_counted, 0);
  EXPECT_EQ(Total("gpu_seconds"), 21);
  // Other reasons are not touched.
  EXPECT_EQ(Replay("bad_quantity").rows_examined, 0);
}

TEST_F(RejectedReplayTest, WholeBatchesAndNestedElementsAreReadAsTheShardReadThem) {
  const std::string gpu = Event(kOrg, "gpu_seconds", 3);
  // An element that is itself an array: not_object, with the array as its bytes. Read as a
  // message it would be a batch holding a good event; it must stay refused.
  // A batch cut short: the whole message is not_json, and stays so.
  Ingest({absl::StrCat("[[", gpu, "]]"), absl::StrCat("[", gpu, ",", gpu)});
  ASSERT_EQ(Query("SELECT count(*) FROM shared.rejected_events WHERE reason = 'not_object'"), 1);
  ASSERT_EQ(Query("SELECT count(*) FROM shared.rejected_events WHERE reason = 'not_json'"), 1);
  Exec("INSERT INTO shared.meters (meter_id, name, unit) VALUES (10, 'gpu_seconds', 'second')");

  const ReplaySummary nested = Replay("not_object");
  EXPECT_EQ(nested.rows_examined, 1);
  EXPECT_EQ(nested.rows_replayed, 0);
  EXPECT_EQ(nested.still_rejected.at("not_object"), 1);
  const ReplaySummary broken = Replay("not_json");
  EXPECT_EQ(broken.rows_examined, 1);
  EXPECT_EQ(broken.rows_replayed, 0);
  EXPECT_EQ(broken.still_rejected.at("not_json"), 1);
  EXPECT_EQ(Total("gpu_seconds"), 0);
}

TEST_F(RejectedReplayTest, RaisedMaximumAndWiderWindowMakeRowsCountable) {
  Exec("UPDATE shared.meters SET max_event_quantity = 100 WHERE name = 'ai_requests'");
  auto fresh = LoadMeters(url_);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  meters_ = *fresh;
  const absl::Time now = absl::Now();
  const std::string old_time =
      absl::FormatTime(absl::RFC3339_full, now - absl::Hours(24 * 70), absl::UTCTimeZone());
  std::string old_event = Event(kOrg, "api_calls", 9);
  const size_t at = old_event.find("\"time\":\"") + 8;
  old_event.replace(at, old_event.find('"', at) - at, old_time);
  Ingest({Event(kOrg, "ai_requests", 100), Event(kOrg, "ai_requests", 150), old_event}, now);
  ASSERT_EQ(Total("ai_requests"), 100);
  ASSERT_EQ(
      Query("SELECT count(*) FROM shared.rejected_events WHERE reason = 'quantity_too_large'"), 1);
  ASSERT_EQ(Query("SELECT count(*) FROM shared.rejected_events WHERE reason = 'time_too_old'"), 1);

  EXPECT_EQ(Replay("quantity_too_large").still_rejected.at("quantity_too_large"), 1);
  Exec("UPDATE shared.meters SET max_event_quantity = 150 WHERE name = 'ai_requests'");
  EXPECT_EQ(Replay("quantity_too_large").quantity_counted, 150);
  EXPECT_EQ(Total("ai_requests"), 250);

  EXPECT_EQ(Replay("time_too_old").still_rejected.at("time_too_old"), 1);
  ReplayOptions wider;
  wider.limits.late_window = absl::Hours(24 * 100);
  EXPECT_EQ(Replay("time_too_old", wider).quantity_counted, 9);
  EXPECT_EQ(Total("api_calls"), 9);
}

TEST_F(RejectedReplayTest, SinceSkipsOlderRows) {
  Ingest({Event(kOrg, "gpu_seconds", 1), Event(kOrg, "gpu_seconds", 2)});
  Exec(
      "UPDATE shared.rejected_events SET rejected_at = now() - interval '2 days' "
      "WHERE id = (SELECT min(id) FROM shared.rejected_events)");
  Exec("INSERT INTO shared.meters (meter_id, name, unit) VALUES (10, 'gpu_seconds', 'second')");
  ReplayOptions recent;
  recent.since = absl::Now() - absl::Hours(24);
  const ReplaySummary summary = Replay("unknown_meter", recent);
  EXPECT_EQ(summary.rows_examined, 1);
  EXPECT_EQ(summary.quantity_counted, 2);
  EXPECT_EQ(Replay("unknown_meter").quantity_counted, 1);
  EXPECT_EQ(Total("gpu_seconds"), 3);
}

// A producer's retry of a refused event is two rows with the same (source, id): one event.
TEST_F(RejectedReplayTest, RetriedEventRejectedTwiceIsCountedOnce) {
  const std::string event = Event(kOrg, "gpu_seconds", 7);
  Ingest({event, event, Event(kOrg, "gpu_seconds", 1)});
  Exec("INSERT INTO shared.meters (meter_id, name, unit) VALUES (10, 'gpu_seconds', 'second')");
  const ReplaySummary summary = Replay("unknown_meter");
  EXPECT_EQ(summary.rows_replayed, 3);
  EXPECT_EQ(summary.duplicates, 1);
  EXPECT_EQ(Total("gpu_seconds"), 8);
  EXPECT_EQ(Replay("unknown_meter").rows_examined, 0);
}

// A batch_rejected row summarises a batch whose valid elements were counted: never replayed.
TEST_F(RejectedReplayTest, BatchSummaryRowsAreRefused) {
  ReplayOptions options;
  options.reason = "batch_rejected";
  auto summary = ReplayRejected(url_, options, absl::Now());
  EXPECT_TRUE(absl::IsInvalidArgument(summary.status())) << summary.status();
}

TEST_F(RejectedReplayTest, ConcurrentReplaysCountEachRowOnce) {
  constexpr int kRows = 3'000;
  // Stored straight by SQL: realistic events, many rows, one statement.
  Exec(absl::StrCat(
      "INSERT INTO shared.rejected_events (topic, partition, kafka_offset, reason, raw) "
      "SELECT 't', 0, i, 'unknown_meter', convert_to(format('{\"specversion\":\"1.0\",\"id\":"
      "\"%s\",\"source\":\"s\",\"type\":\"gpu_seconds\",\"subject\":\"%s\",\"time\":\"%s\","
      "\"data\":{\"quantity\":%s,\"industry\":\"hs\"}}', i, ",
      "CASE WHEN i % 2 = 0 THEN '", kOrg, "' ELSE '", kOtherOrg, "' END, ",
      "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 1 + i % 3), 'UTF8') "
      "FROM generate_series(1, ",
      kRows, ") i"));
  const int64_t want = Query("SELECT sum(1 + kafka_offset % 3) FROM shared.rejected_events");
  Exec("INSERT INTO shared.meters (meter_id, name, unit) VALUES (10, 'gpu_seconds', 'second')");

  // Small chunks, so the replays interleave chunk by chunk and wait on each other's locks.
  constexpr int kReplays = 3;
  std::vector<absl::StatusOr<ReplaySummary>> results(kReplays, ReplaySummary{});
  std::vector<std::thread> threads;
  for (int i = 0; i < kReplays; ++i) {
    threads.emplace_back([&, i] {
      ReplayOptions options;
      options.reason = "unknown_meter";
      options.chunk_rows = 100;
      results[i] = ReplayRejected(url_, options, absl::Now());
    });
  }
  for (std::thread& t : threads) t.join();
  int64_t replayed = 0, quantity = 0;
  for (const auto& result : results) {
    ASSERT_TRUE(result.ok()) << result.status();
    replayed += result->rows_replayed;
    quantity += result->quantity_counted;
  }
  EXPECT_EQ(replayed, kRows);
  EXPECT_EQ(quantity, want);
  EXPECT_EQ(Total("gpu_seconds"), want);
  EXPECT_EQ(Query("SELECT count(*) FROM shared.rejected_events WHERE replayed_at IS NULL"), 0);
}

// Retention: rows older than --older-than go, younger ones stay, and nothing a replay could
// still bill (within the late window plus 7 days) can be purged.
TEST_F(RejectedReplayTest, PurgeDeletesOnlyRowsPastTheRetentionAndNeverInsideTheLateWindow) {
  Ingest({"not json", "{also not json", "[1,2"});
  Exec(
      "UPDATE shared.rejected_events SET rejected_at = now() - interval '100 days' "
      "WHERE kafka_offset = 0");
  Exec(
      "UPDATE shared.rejected_events SET rejected_at = now() - interval '80 days' "
      "WHERE kafka_offset = 1");
  auto too_short = PurgeRejected(url_, absl::Hours(24 * 30));
  EXPECT_EQ(too_short.status().code(), absl::StatusCode::kInvalidArgument) << too_short.status();
  EXPECT_NE(too_short.status().message().find("late window"), std::string::npos);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) FROM shared.rejected_events"), 3);
  auto purged = PurgeRejected(url_, absl::Hours(24 * 90));
  ASSERT_TRUE(purged.ok()) << purged.status();
  EXPECT_EQ(*purged, 1);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) FROM shared.rejected_events"), 2);
  EXPECT_EQ(testing::QueryInt(url_,
                              "SELECT count(*) FROM shared.audit_log WHERE action = "
                              "'rejected_events.purged'"),
            1);
  // A wider recorded late window (an instance runs with --late-window 90d) raises the floor.
  Exec("UPDATE shared.billing_settings SET late_window = interval '90 days'");
  EXPECT_EQ(PurgeRejected(url_, absl::Hours(24 * 90)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RejectedReplayTest, UnknownReasonIsRefusedBeforeConnecting) {
  ReplayOptions options;
  options.reason = "teleported";
  auto summary =
      ReplayRejected("postgresql://postgres@127.0.0.1:1/x?connect_timeout=1", options, absl::Now());
  ASSERT_FALSE(summary.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(summary.status())) << summary.status();
  EXPECT_NE(summary.status().message().find("unknown reason 'teleported'"), std::string::npos);
  EXPECT_NE(summary.status().message().find("quantity_too_large"), std::string::npos);
}

}  // namespace
}  // namespace meterd::store
