// End-to-end tests: the real meterd binary as child processes, a real Postgres, and the
// embedded Kafka (librdkafka's mock cluster, real protocol) from `meterd dev-broker`.
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include <pqxx/pqxx>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/devtools/loadgen.h"
#include "lib/event/usage_event.h"
#include "lib/kafka/producer.h"
#include "tests/support/harness.h"
#include "tests/support/meterd_fixture.h"
#include "tests/support/tcp_proxy.h"

namespace meterd::testing {
namespace {

class PipelineTest : public MeterdFixture {};

TEST_F(PipelineTest, TotalsAreExactOverManyOrgsAndPartitions) {
  auto loadgen = StartLoadgen(200'000, 1'000, 0.0, 0);
  const auto expected = FinishLoadgen(*loadgen);
  ASSERT_GE(expected.size(), 1'000u);
  auto meterd = StartMeterd("a");
  ExpectExact(expected);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
  // Offsets stored for every partition the events went to.
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.ingest_offsets"), 64);
  EXPECT_EQ(QueryInt(url_, "SELECT sum(next_offset) FROM shared.ingest_offsets"), 200'000);
}

// Flushes append to the delta log; `meterd run` folds it into one row per key while running
// (its metrics say so), and with --compact-interval 0 the deltas stay, still counted.
TEST_F(PipelineTest, TheCompactorFoldsTheDeltaLogIntoOneRowPerKey) {
  auto loadgen = StartLoadgen(60'000, 300, 0.0, 0);
  const auto expected = FinishLoadgen(*loadgen);
  const int http_port = FreeLocalPort();
  auto meterd = StartMeterd(
      "a", "300ms",
      {"--compact-interval", "0", "--http-listen", absl::StrCat("127.0.0.1:", http_port)});
  ExpectExact(expected);
  EXPECT_GT(QueryInt(url_, "SELECT count(*) FROM ONLY shared.api_usage_deltas"), 0);
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM ONLY shared.api_usage_meters"), 0);
  const auto [status, metrics] = HttpGet(http_port, "/metrics");
  EXPECT_EQ(status, 200);
  EXPECT_EQ(metrics.find("meterd_usage_folds_total"), std::string::npos) << "compactor is off";
  meterd->Signal(SIGTERM);
  ASSERT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());

  meterd = StartMeterd(
      "b", "300ms",
      {"--compact-interval", "200ms", "--http-listen", absl::StrCat("127.0.0.1:", http_port)});
  ASSERT_TRUE(Eventually(
      [&] { return QueryInt(url_, "SELECT count(*) FROM ONLY shared.api_usage_deltas") == 0; },
      absl::Seconds(60)))
      << ReadFile(meterd->log_path());
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM ONLY shared.api_usage_meters"),
            static_cast<int64_t>(expected.size()));
  ExpectExact(expected);
  const auto [status_b, metrics_b] = HttpGet(http_port, "/metrics");
  EXPECT_EQ(status_b, 200);
  EXPECT_NE(metrics_b.find("\nmeterd_usage_folds_total 1\n"), std::string::npos) << metrics_b;
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

TEST_F(PipelineTest, MalformedEventsAreRejectedWithTheirReason) {
  auto meterd = StartMeterd("a");
  auto loadgen = StartLoadgen(60'000, 500, 0.05, 0);
  const auto expected = FinishLoadgen(*loadgen);
  ExpectExact(expected);
  // Loadgen's summary names how many of each kind it mixed in.
  const std::vector<std::string> reasons = {"not_json",       "unknown_meter", "bad_org_id",
                                            "bad_quantity",   "bad_industry",  "missing_field",
                                            "time_in_future", "bad_time"};
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  for (const std::string& reason : reasons) {
    const std::string key = absl::StrCat("\"", reason, "\":");
    const size_t at = summary_.find(key);
    ASSERT_NE(at, std::string::npos) << summary_;
    const int64_t want = std::stoll(summary_.substr(at + key.size()));
    EXPECT_GT(want, 0);
    int64_t got = 0;
    do {
      got = QueryInt(url_,
                     "SELECT count(*) FROM shared.rejected_events WHERE reason = '" + reason + "'");
    } while (got < want && absl::Now() < deadline &&
             (absl::SleepFor(absl::Milliseconds(100)), true));
    EXPECT_EQ(got, want) << reason;
  }
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.rejected_events WHERE length(raw) = 0 "
                     "OR partition < 0 OR kafka_offset < 0"),
            0);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

TEST_F(PipelineTest, RepeatedSigkillLosesAndDoublesNothing) {
  const unsigned seed = static_cast<unsigned>(absl::ToUnixMicros(absl::Now()));
  std::mt19937 random(seed);
  SCOPED_TRACE(absl::StrCat("kill timing seed ", seed));
  // Produces for up to 2 minutes; stopped (SIGTERM: it then reports what it produced) once
  // the kills are done, so every kill lands while events are flowing.
  auto loadgen = StartLoadgen(480'000, 1'000, 0.01, 4'000);
  int kills_during_ingest = 0;
  for (int i = 0; i < 5; ++i) {
    auto meterd = StartMeterd(absl::StrCat("kill", i));
    const int64_t before = StoredOffsetSum();
    const bool progressed = WaitForProgress(before, absl::Seconds(45));
    // A random moment after the first flush of this life: mid-batch, mid-flush, anywhere.
    absl::SleepFor(absl::Milliseconds(std::uniform_int_distribution<int>(0, 1500)(random)));
    meterd->Signal(SIGKILL);
    EXPECT_EQ(meterd->Wait(absl::Seconds(10)), 128 + SIGKILL);
    if (progressed) ++kills_during_ingest;
  }
  EXPECT_GE(kills_during_ingest, 5);
  auto meterd = StartMeterd("final");
  loadgen->Signal(SIGTERM);
  const auto expected = FinishLoadgen(*loadgen);
  EXPECT_GE(SumOf(expected), 100'000);
  ExpectExact(expected);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

TEST_F(PipelineTest, SecondInstanceJoiningAndLeavingKeepsTotalsExact) {
  auto loadgen = StartLoadgen(200'000, 1'000, 0.0, 8'000);
  auto first = StartMeterd("first");
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(45))) << ReadFile(first->log_path());
  auto second = StartMeterd("second");
  // Wait until the group gave the second instance partitions and it flushed.
  JoinBrieflyThenLeave(*second);
  EXPECT_NE(ReadFile(second->log_path()).find("revoking partitions"), std::string::npos);
  const auto expected = FinishLoadgen(*loadgen);
  ExpectExact(expected);
  first->Signal(SIGTERM);
  EXPECT_EQ(first->Wait(absl::Seconds(60)), 0) << ReadFile(first->log_path());
  // The first instance gave partitions away and took them back.
  EXPECT_NE(ReadFile(first->log_path()).find("revoking partitions"), std::string::npos);
}

// A producer's re-sends (same source and id) are counted once: 10 % of 200,000 events sent
// twice, some right away, some seconds later, across a kill -9 and restart and across a
// rebalance to a second instance and back.
TEST_F(PipelineTest, ResentEventsAreCountedOnceAcrossCrashAndRebalance) {
  auto loadgen = StartLoadgen(200'000, 1'000, 0.0, 8'000, 0.10);
  auto first = StartMeterd("first");
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(45))) << ReadFile(first->log_path());
  absl::SleepFor(absl::Seconds(2));
  first->Signal(SIGKILL);
  EXPECT_EQ(first->Wait(absl::Seconds(10)), 128 + SIGKILL);
  auto restarted = StartMeterd("restarted");
  ASSERT_TRUE(WaitForProgress(StoredOffsetSum(), absl::Seconds(60)))
      << ReadFile(restarted->log_path());
  auto second = StartMeterd("second");
  JoinBrieflyThenLeave(*second);
  const auto expected = FinishLoadgen(*loadgen);
  const size_t at = summary_.find("\"duplicates\":");
  ASSERT_NE(at, std::string::npos) << summary_;
  EXPECT_GE(std::stoll(summary_.substr(at + 13)), 15'000) << summary_;
  ExpectExact(expected);
  restarted->Signal(SIGTERM);
  EXPECT_EQ(restarted->Wait(absl::Seconds(60)), 0) << ReadFile(restarted->log_path());
  // The windows were rebuilt from the log on every assignment.
  EXPECT_NE(ReadFile(restarted->log_path()).find("to rebuild the dedup window"), std::string::npos);
}

// Postgres stops answering mid-stream (a proxy that black-holes the connection: the kernel
// still ACKs, nothing comes back): the flush in flight gives up after --pg-statement-timeout
// instead of waiting for TCP to notice, the flusher retries, and once the path is back every
// total is exact.
TEST_F(PipelineTest, BlackHoledPostgresTimesOutAndRetriesExactly) {
  const size_t colon = url_.rfind(':');
  const int pg_port = std::stoi(url_.substr(colon + 1, url_.find('/', colon) - colon - 1));
  TcpProxy proxy(pg_port);
  const std::string proxied =
      absl::StrCat(url_.substr(0, colon + 1), proxy.port(), url_.substr(url_.find('/', colon)));
  auto loadgen = StartLoadgen(80'000, 500, 0.0, 5'000);
  auto meterd = StartMeterd("blackhole", "300ms",
                            {"--pg", proxied, "--pg-statement-timeout", "2s",
                             "--pg-connect-timeout", "3s", "--billing=false"});
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(45))) << ReadFile(meterd->log_path());
  proxy.Stall();
  const int64_t at_stall = StoredOffsetSum();
  absl::SleepFor(absl::Seconds(8));
  // Nothing committed through a dead path (a commit already on the wire may have landed).
  EXPECT_LE(StoredOffsetSum() - at_stall, 5'000);
  proxy.Resume();
  const auto expected = FinishLoadgen(*loadgen);
  ExpectExact(expected);
  const std::string log = ReadFile(meterd->log_path());
  EXPECT_NE(log.find("did not finish within"), std::string::npos) << log;
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// With default flags, a crashed instance's replacement resumes consumption within 30 s.
TEST_F(PipelineTest, RestartAfterKillResumesWithin30sWithDefaults) {
  auto loadgen = StartLoadgen(150'000, 500, 0.0, 3'000);
  auto first = StartMeterd("first", "300ms", {}, /*test_group_timing=*/false);
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(60))) << ReadFile(first->log_path());
  first->Signal(SIGKILL);
  EXPECT_EQ(first->Wait(absl::Seconds(10)), 128 + SIGKILL);
  const int64_t at_crash = StoredOffsetSum();
  const absl::Time restarted_at = absl::Now();
  auto second = StartMeterd("second", "300ms", {}, /*test_group_timing=*/false);
  ASSERT_TRUE(WaitForProgress(at_crash, absl::Seconds(60))) << ReadFile(second->log_path());
  const absl::Duration resumed_after = absl::Now() - restarted_at;
  EXPECT_LE(resumed_after, absl::Seconds(30)) << ReadFile(second->log_path());
  std::fprintf(stderr, "resumed %s after the restart\n",
               absl::FormatDuration(resumed_after).c_str());
  loadgen->Signal(SIGTERM);
  ExpectExact(FinishLoadgen(*loadgen));
  second->Signal(SIGTERM);
  EXPECT_EQ(second->Wait(absl::Seconds(60)), 0) << ReadFile(second->log_path());
}

// librdkafka 2.0.2 aborts when a cooperative-sticky consumer is closed before its first
// assignment (upstream issue 4312). Five quick crash-restarts leave dead members the group
// must wait out; a sixth instance stopped while it waits for its first assignment must still
// exit 0, at any moment of the wait.
TEST_F(PipelineTest, SigtermBeforeTheFirstAssignmentExitsCleanly) {
  for (int delay_ms : {500, 6'000, 12'000, 18'000}) {
    SCOPED_TRACE(absl::StrCat("SIGTERM ", delay_ms, " ms after start"));
    for (int i = 0; i < 5; ++i) {
      auto crashing = StartMeterd(absl::StrCat("crash", delay_ms, "-", i), "300ms", {},
                                  /*test_group_timing=*/false);
      absl::SleepFor(absl::Milliseconds(1'200));
      crashing->Signal(SIGKILL);
      crashing->Wait(absl::Seconds(10));
    }
    auto sixth = StartMeterd(absl::StrCat("sixth", delay_ms), "300ms", {},
                             /*test_group_timing=*/false);
    absl::SleepFor(absl::Milliseconds(delay_ms));
    sixth->Signal(SIGTERM);
    EXPECT_EQ(sixth->Wait(absl::Seconds(60)), 0) << ReadFile(sixth->log_path());
  }
}

// Three instances on two partitions: one of them owns nothing, and all stop with exit 0.
TEST_F(PipelineTest, MoreInstancesThanPartitionsAllStopCleanly) {
  broker_.reset();
  broker_ = std::make_unique<DevBrokerProcess>(kTopic, 2, dir_);
  auto loadgen = StartLoadgen(20'000, 100, 0.0, 2'000);
  std::vector<std::unique_ptr<ChildProcess>> instances;
  for (int i = 0; i < 3; ++i) instances.push_back(StartMeterd(absl::StrCat("i", i)));
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(60)));
  absl::SleepFor(absl::Seconds(8));  // Let the group settle on 2 owners and 1 idle member.
  for (auto& instance : instances) instance->Signal(SIGTERM);
  for (auto& instance : instances) {
    EXPECT_EQ(instance->Wait(absl::Seconds(60)), 0) << ReadFile(instance->log_path());
  }
  auto last = StartMeterd("last");
  ExpectExact(FinishLoadgen(*loadgen));
  last->Signal(SIGTERM);
  EXPECT_EQ(last->Wait(absl::Seconds(60)), 0) << ReadFile(last->log_path());
}

// Twenty poison messages, each a batch of 250,000 invalid elements, among 100,000 valid
// events: each costs one rejected row (not 250,000), flushes keep their pace, the valid totals
// are exact and memory stays bounded.
TEST_F(PipelineTest, PoisonBatchesCostOneRowEachAndStallNothing) {
  const int http_port = FreeLocalPort();
  auto meterd =
      StartMeterd("poison", "500ms", {"--http-listen", absl::StrCat("127.0.0.1:", http_port)});
  const int port = WaitForHttp(http_port);
  ASSERT_GT(port, 0) << ReadFile(meterd->log_path());
  auto loadgen = StartLoadgen(100'000, 500, 0.0, 8'000);
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(60))) << ReadFile(meterd->log_path());
  std::string poison = "[";
  for (int i = 0; i < 250'000; ++i) poison += i == 0 ? "{}" : ",{}";
  poison += "]";
  // While the poison goes in, the stored offsets must keep advancing at the flush pace.
  std::atomic<bool> producing{true};
  absl::Duration longest_gap;
  std::thread watch([&] {
    int64_t last = StoredOffsetSum();
    absl::Time last_change = absl::Now();
    while (producing.load()) {
      absl::SleepFor(absl::Milliseconds(100));
      const int64_t now = StoredOffsetSum();
      if (now != last) {
        longest_gap = std::max(longest_gap, absl::Now() - last_change);
        last = now;
        last_change = absl::Now();
      }
    }
  });
  for (int i = 0; i < 20; ++i) {
    ProduceOrDie(broker_->bootstrap(), kTopic, absl::StrCat("poison-", i), {poison});
    absl::SleepFor(absl::Milliseconds(200));
  }
  const auto expected = FinishLoadgen(*loadgen);
  producing.store(false);
  watch.join();
  ExpectExact(expected);
  // A poison message that stalled the partition would stop the offsets for as long as its
  // 250,000 elements took to refuse one by one (many seconds); a few flush intervals allow for
  // this shared machine (CI builds the sanitizer trees at low priority meanwhile).
  EXPECT_LE(longest_gap, absl::Milliseconds(2'500)) << "flush interval 500 ms";
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.rejected_events WHERE reason = "
                     "'batch_rejected' AND detail LIKE '250000 of 250000 %'"),
            20);
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.rejected_events"), 20);
  const auto [status, metrics] = HttpGet(port, "/metrics");
  ASSERT_EQ(status, 200);
  const size_t at = metrics.find("\nmeterd_peak_rss_bytes ");
  ASSERT_NE(at, std::string::npos) << metrics;
  const double rss = std::stod(metrics.substr(at + 23));
  // Before: 1.5M rejections held in memory (165 MB). Now: bounded by one row per message.
  EXPECT_LT(rss, 120.0 * 1024 * 1024);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// The topic was deleted and recreated while the group's offsets stayed in Postgres: the stored
// offsets are past the new log's end. Never stepped over silently, never counted twice: each
// partition's range is a rejected_events row (offset_gap, naming the range NOT counted and
// how to count it), a metric and a log line; counting goes on from the log end, exactly.
TEST_F(PipelineTest, StoredOffsetPastTheLogEndIsReportedNotSkipped) {
  FinishLoadgen(*StartLoadgen(5'000, 100, 0.0, 0));  // In the log before meterd looks.
  {
    pqxx::connection conn(url_);
    pqxx::work tx(conn);
    tx.exec0(
        "INSERT INTO shared.ingest_offsets (consumer_group, topic, partition, next_offset) "
        "SELECT 'it', '" +
        std::string(kTopic) + "', p, 1000000 FROM generate_series(0, 63) p");
    tx.commit();
  }
  const int http_port = FreeLocalPort();
  auto meterd =
      StartMeterd("gap", "300ms", {"--http-listen", absl::StrCat("127.0.0.1:", http_port)});
  Eventually(
      [&] {
        return QueryInt(url_,
                        "SELECT count(*) FROM shared.ingest_offsets WHERE next_offset < "
                        "1000000") >= 64;
      },
      absl::Seconds(60));
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.rejected_events WHERE reason = "
                     "'offset_gap' AND kafka_offset = 1000000 AND detail LIKE '%past the "
                     "log end%NOT counted%'"),
            64);
  EXPECT_EQ(QueryInt(url_, "SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters"), 0);
  // What arrives from now on is counted exactly.
  ExpectExact(FinishLoadgen(*StartLoadgen(20'000, 200, 0.0, 0)));
  const std::string log = ReadFile(meterd->log_path());
  EXPECT_NE(log.find("offset gap: stored next offset 1000000"), std::string::npos) << log;
  const int port = WaitForHttp(http_port);
  ASSERT_GT(port, 0);
  const std::string metrics = HttpGet(port, "/metrics").second;
  EXPECT_NE(metrics.find("\nmeterd_offset_gaps_total 64\n"), std::string::npos) << metrics;
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// Retention deleted messages meterd had not read yet (the embedded broker keeps ~5 MiB per
// partition): the missing range is an offset_gap row, and what is still in the log is counted.
TEST_F(PipelineTest, RetentionGapIsReportedWithItsRange) {
  broker_.reset();
  broker_ = std::make_unique<DevBrokerProcess>(kTopic, 1, dir_);
  FinishLoadgen(*StartLoadgen(1'000, 10, 0.0, 0));
  {
    auto first = StartMeterd("first");
    ASSERT_TRUE(WaitForProgress(0, absl::Seconds(60))) << ReadFile(first->log_path());
    first->Signal(SIGTERM);
    ASSERT_EQ(first->Wait(absl::Seconds(60)), 0) << ReadFile(first->log_path());
  }
  ASSERT_EQ(StoredOffsetSum(), 1'000);
  FinishLoadgen(*StartLoadgen(60'000, 10, 0.0, 0));  // ~20 MB: the oldest are dropped.
  auto second = StartMeterd("second");
  Eventually(
      [&] {
        return QueryInt(url_,
                        "SELECT count(*) FROM shared.rejected_events WHERE reason = "
                        "'offset_gap'") > 0;
      },
      absl::Seconds(60));
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.rejected_events WHERE reason = "
                     "'offset_gap' AND kafka_offset = 1000 AND detail LIKE "
                     "'messages [1000, %) were deleted (retention)%'"),
            1);
  // Everything from the log start on is counted: the stored offset reaches the log end.
  EXPECT_TRUE(WaitForProgress(61'000 - 1, absl::Seconds(60)));
  EXPECT_EQ(StoredOffsetSum(), 61'000);
  second->Signal(SIGTERM);
  EXPECT_EQ(second->Wait(absl::Seconds(60)), 0) << ReadFile(second->log_path());
}

// CloudEvents Kafka binary content mode (attributes in ce_* headers, the value is `data`), as
// kafkajs with the CloudEvents SDK sends it: counted like structured events, rejected alike.
TEST_F(PipelineTest, BinaryContentModeEventsCountLikeStructuredOnes) {
  auto meterd = StartMeterd("binary");
  const std::string org = "5f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f";
  auto producer = kafka::Producer::Create({{"bootstrap.servers", broker_->bootstrap()}});
  ASSERT_TRUE(producer.ok()) << producer.status();
  const std::string time = absl::FormatTime(absl::RFC3339_sec, absl::Now(), absl::UTCTimeZone());
  for (int i = 0; i < 1'000; ++i) {
    // Every tenth is missing its subject: refused as missing_field, like a structured one.
    std::vector<std::pair<std::string, std::string>> headers = {{"ce_specversion", "1.0"},
                                                                {"ce_id", absl::StrCat("bin-", i)},
                                                                {"ce_source", "hs/binary"},
                                                                {"ce_type", "api_calls"}};
    if (i % 10 != 9) headers.emplace_back("ce_subject", org);
    headers.emplace_back("ce_time", time);
    headers.emplace_back("content-type", "application/json");
    ASSERT_TRUE((*producer)
                    ->Send(kTopic, kafka::Producer::kAnyPartition, org,
                           R"({"quantity":2,"industry":"hs"})", headers)
                    .ok());
  }
  ASSERT_TRUE((*producer)->Flush(absl::Seconds(30)).ok());
  EXPECT_EQ(WaitForSum(url_, 900 * 2, absl::Seconds(60)), 900 * 2);
  Eventually([&] { return QueryInt(url_, "SELECT count(*) FROM shared.rejected_events") >= 100; },
             absl::Seconds(30));
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.rejected_events WHERE reason = "
                     "'missing_field' AND convert_from(raw, 'UTF8') LIKE '%\"ce_%' = false "
                     "AND convert_from(raw, 'UTF8') LIKE '%\"id\":\"bin-%'"),
            100);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

TEST_F(PipelineTest, PostgresOutagePausesAndLosesNothing) {
  auto meterd = StartMeterd("a");
  auto loadgen = StartLoadgen(100'000, 500, 0.0, 10'000);
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(45))) << ReadFile(meterd->log_path());
  SharedPostgres().Stop();
  absl::SleepFor(absl::Seconds(3));
  SharedPostgres().Start();
  const auto expected = FinishLoadgen(*loadgen);
  ExpectExact(expected);
  EXPECT_NE(ReadFile(meterd->log_path()).find("flush failed, retrying"), std::string::npos);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// Postgres gone for a minute under steady load: consumption pauses (the shards stop draining,
// librdkafka's bounded buffer fills), memory stays bounded, and once Postgres is back every
// event is counted exactly once.
TEST_F(PipelineTest, AMinuteWithoutPostgresPausesWithinAMemoryBoundThenCatchesUpExactly) {
  const int http_port = FreeLocalPort();
  auto meterd = StartMeterd("outage", "500ms",
                            {"--http-listen", absl::StrCat("127.0.0.1:", http_port),
                             "--max-unflushed-keys", "20000", "--billing=false"});
  ASSERT_GT(WaitForHttp(http_port), 0) << ReadFile(meterd->log_path());
  // 5,000 events/s for 80 s: the outage sits in the middle of the load.
  auto loadgen = StartLoadgen(400'000, 1'000, 0.0, 5'000);
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(45))) << ReadFile(meterd->log_path());
  auto metric = [&](const std::string& name) -> int64_t {
    const std::string text = HttpGet(http_port, "/metrics").second;
    const size_t at = text.find("\n" + name + " ");
    return at == std::string::npos ? -1 : std::stoll(text.substr(at + name.size() + 2));
  };
  SharedPostgres().Stop();
  absl::SleepFor(absl::Seconds(20));
  const int64_t messages_at_20s = metric("meterd_messages_total");
  EXPECT_GT(metric("meterd_paused_shards"), 0) << "consumption did not pause";
  absl::SleepFor(absl::Seconds(40));
  // Paused: at most what librdkafka had already buffered arrives in 40 more seconds, not the
  // 200,000 events produced meanwhile.
  EXPECT_LT(metric("meterd_messages_total") - messages_at_20s, 50'000);
  // The bound: the process's start-up size, librdkafka's buffer
  // (queued.max.messages.kbytes = 64 MiB) and the unflushed keys (20,000 at a few hundred
  // bytes each), with room to spare; not the ~130 MB the minute's events would take.
  const int64_t rss = metric("meterd_peak_rss_bytes");
  EXPECT_GT(rss, 0);
  EXPECT_LT(rss, 200LL * 1024 * 1024) << "peak RSS " << rss;
  SharedPostgres().Start();
  ExpectExact(FinishLoadgen(*loadgen));
  EXPECT_EQ(metric("meterd_paused_shards"), 0);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// Adaptive flushing end to end: a Postgres where every flush takes at least 400 ms (a
// statement trigger on the delta log sleeps) against a 200 ms interval makes meterd flush less
// often, within
// --max-visibility-latency, with exact totals; once flushes are cheap again it comes back.
TEST_F(PipelineTest, SlowFlushesLengthenTheIntervalWithinTheCapAndTotalsStayExact) {
  Exec(url_,
       "CREATE FUNCTION public.slow_flush() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
       "PERFORM pg_sleep(0.4); RETURN NULL; END $$; "
       "CREATE TRIGGER slow_flush AFTER INSERT ON shared.api_usage_deltas "
       "FOR EACH STATEMENT EXECUTE FUNCTION public.slow_flush()");
  const int port = FreeLocalPort();
  auto meterd = StartMeterd(
      "adaptive", "200ms",
      {"--max-visibility-latency", "2s", "--http-listen", absl::StrCat("127.0.0.1:", port)});
  ASSERT_EQ(WaitForHttp(port), port) << ReadFile(meterd->log_path());
  auto loadgen = StartLoadgen(30'000, 200, 0, 10'000);
  const auto expected = FinishLoadgen(*loadgen);
  ExpectExact(expected);
  auto metric = [&](const std::string& series) -> int64_t {
    const std::string body = HttpGet(port, "/metrics").second;
    const size_t at = body.find("\n" + series + " ");
    return at == std::string::npos ? -1 : std::stoll(body.substr(at + series.size() + 2));
  };
  EXPECT_GT(metric("meterd_flush_interval_changes_total{direction=\"longer\"}"), 0);
  // Every interval it chose stayed within the cap.
  const std::string log = ReadFile(meterd->log_path());
  int longer = 0;
  for (size_t at = log.find("flushing every "); at != std::string::npos;
       at = log.find("flushing every ", at + 1)) {
    const size_t start = at + std::string("flushing every ").size();
    absl::Duration chosen;
    ASSERT_TRUE(absl::ParseDuration(log.substr(start, log.find(' ', start) - start), &chosen));
    EXPECT_GE(chosen, absl::Milliseconds(200));
    EXPECT_LE(chosen, absl::Seconds(2));
    if (chosen > absl::Milliseconds(200)) ++longer;
  }
  EXPECT_GT(longer, 0) << log;
  // Cheap flushes again (nothing to write, or no trigger): back to --flush-interval.
  Exec(url_, "DROP TRIGGER slow_flush ON shared.api_usage_deltas");
  EXPECT_TRUE(
      Eventually([&] { return metric("meterd_flush_interval_ms") == 200; }, absl::Seconds(30)))
      << metric("meterd_flush_interval_ms");
  EXPECT_GT(metric("meterd_flush_interval_changes_total{direction=\"shorter\"}"), 0);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// /metrics, /metrics.json and --summary-json render one registry: the same numbers, per
// partition lag and the flush histograms included.
TEST_F(PipelineTest, HttpEndpointServesMetricsAndReadiness) {
  const int http_port = FreeLocalPort();
  const std::string summary = dir_ + "/summary.json";
  auto meterd = StartMeterd(
      "a", "300ms",
      {"--http-listen", absl::StrCat("127.0.0.1:", http_port), "--summary-json", summary});
  const int port = WaitForHttp(http_port);
  ASSERT_GT(port, 0) << ReadFile(meterd->log_path());
  EXPECT_EQ(HttpGet(port, "/healthz").first, 200);
  EXPECT_EQ(HttpGet(port, "/nope").first, 404);

  auto loadgen = StartLoadgen(20'000, 100, 0.0, 0);
  const auto expected = FinishLoadgen(*loadgen);
  ExpectExact(expected);
  const auto [ready_status, ready_body] = HttpGet(port, "/readyz");
  EXPECT_EQ(ready_status, 200) << ready_body;
  const auto [status, metrics] = HttpGet(port, "/metrics");
  EXPECT_EQ(status, 200);
  EXPECT_NE(metrics.find("\nmeterd_events_total 20000\n"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\nmeterd_flushed_events_total 20000\n"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\nmeterd_assigned_partitions 64\n"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("# TYPE meterd_flushes_total counter"), std::string::npos);
  // Everything read: every owned partition's lag is 0.
  int lag_zero = 0;
  for (size_t at = metrics.find("\nmeterd_partition_lag{"); at != std::string::npos;
       at = metrics.find("\nmeterd_partition_lag{", at + 1)) {
    const size_t end = metrics.find('\n', at + 1);
    lag_zero += absl::EndsWith(metrics.substr(at, end - at), "} 0") ? 1 : 0;
  }
  EXPECT_EQ(lag_zero, 64) << metrics;
  EXPECT_NE(metrics.find("# TYPE meterd_flush_duration_seconds histogram"), std::string::npos);
  const size_t visible = metrics.find("\nmeterd_event_visible_latency_seconds_count ");
  ASSERT_NE(visible, std::string::npos) << metrics;
  EXPECT_GE(std::stoll(metrics.substr(visible + 44)), 1) << metrics;
  const auto [json_status, json] = HttpGet(port, "/metrics.json");
  EXPECT_EQ(json_status, 200);
  EXPECT_NE(json.find("\"meterd_events_total\":20000"), std::string::npos) << json;

  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
  const std::string written = ReadFile(summary);
  EXPECT_NE(written.find("\"meterd_flushed_events_total\":20000"), std::string::npos) << written;
  EXPECT_NE(written.find("\"meterd_first_assignment_unix_ms\":"), std::string::npos) << written;
}

// The Kafka path and the direct SQL path (increment_api_usage) give the same billing status,
// and the overage worker shows the charges and alerts within two flush intervals.
TEST_F(PipelineTest, KafkaPathBillsLikeTheDirectPathWithinTwoFlushes) {
  const std::string org = "00000000-0000-4000-8000-0000000000aa";
  const std::string subscribe =
      "INSERT INTO shared.organizations VALUES ('" + org +
      "', 'Acme', 'hs'); "
      "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
      "current_period_end) VALUES ('" +
      org +
      "', 'basic', date_trunc('month', now()), "
      "date_trunc('month', now()) + interval '1 month')";
  const std::string direct_url = SharedPostgres().CreateMigratedDatabase("it_direct_path");
  for (const std::string& url : {url_, direct_url}) {
    pqxx::connection conn(url);
    pqxx::work tx(conn);
    tx.exec(subscribe);
    tx.commit();
  }
  const absl::Duration flush = absl::Seconds(2);
  auto meterd = StartMeterd("a", "2s");
  // Warm up: wait until the group has assigned partitions and a flush went through.
  ProduceOrDie(broker_->bootstrap(), kTopic, "warmup",
               {UsageEventJson("00000000-0000-4000-8000-0000000000bb", "api_calls", 1, "rest")});
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(60))) << ReadFile(meterd->log_path());

  const std::vector<std::tuple<std::string, int64_t>> usage = {{"api_calls", 500},
                                                               {"api_calls", 500},
                                                               {"api_calls", 150},
                                                               {"data_exports", 4},
                                                               {"ai_requests", 3}};
  std::vector<std::string> events;
  for (const auto& [meter, quantity] : usage)
    events.push_back(UsageEventJson(org, meter, quantity, "hs"));
  ProduceOrDie(broker_->bootstrap(), kTopic, org, events);
  const absl::Time produced = absl::Now();
  const int64_t want_micros = 150 * 10'000 + 4 * 100'000 + 3 * 50'000;  // $2.05
  const std::string charges_sql =
      "SELECT coalesce(sum(amount_micros), 0) FROM "
      "shared.usage_charges WHERE org_id = '" +
      org + "'";
  while (QueryInt(url_, charges_sql) != want_micros && absl::Now() - produced < 4 * flush) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  const absl::Duration visible_after = absl::Now() - produced;
  EXPECT_EQ(QueryInt(url_, charges_sql), want_micros) << ReadFile(meterd->log_path());
  EXPECT_LE(visible_after, 2 * flush) << "charges visible after " << visible_after;
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM shared.usage_alerts WHERE org_id = '" + org + "'"),
            2);

  for (const auto& [meter, quantity] : usage) {
    pqxx::connection conn(direct_url);
    pqxx::work tx(conn);
    tx.exec_params("SELECT shared.increment_api_usage($1, $2, $3)", org, meter, quantity);
    tx.commit();
  }
  // Identical status, but for when each alert was raised and the quantity at that moment.
  const std::string status_sql =
      "SELECT (s - 'alerts')::text || (SELECT jsonb_agg(a - 'raised_at' - 'quantity')::text "
      "FROM jsonb_array_elements(s->'alerts') a) FROM shared.get_billing_status('" +
      org + "') s";
  auto status_of = [&](const std::string& url) {
    pqxx::connection conn(url);
    pqxx::read_transaction tx(conn);
    return tx.exec1(status_sql)[0].as<std::string>();
  };
  EXPECT_EQ(status_of(url_), status_of(direct_url));
  EXPECT_NE(status_of(url_).find("\"usage_charges_micros\": 2050000"), std::string::npos)
      << status_of(url_);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// App transactions on a tracked table in `hs` (100 of 1-1,000 rows, a third rolled back, over
// the same orgs as the Kafka events) while meterd ingests: usage is exactly the loadgen totals
// plus the committed rows, and no transaction or flush deadlocks.
TEST_F(PipelineTest, TrackedAppWritesAndKafkaEventsCountExactlyTogether) {
  Exec(url_, "CREATE TABLE hs.appointments (id bigserial PRIMARY KEY, org_id uuid NOT NULL)");
  Exec(url_, "SELECT shared.track_usage('hs.appointments', 'api_calls', 'org_id')");
  constexpr int kOrgs = 50;
  std::vector<std::string> orgs;
  for (int i = 0; i < kOrgs; ++i) {
    char text[36];
    event::FormatOrgId(devtools::LoadgenOrgId(1, i), text);
    orgs.emplace_back(text, sizeof(text));
  }
  auto meterd = StartMeterd("a");
  auto loadgen = StartLoadgen(150'000, kOrgs, 0.0, 30'000);
  ASSERT_TRUE(WaitForProgress(0, absl::Seconds(60))) << ReadFile(meterd->log_path());
  std::atomic<int> next_tx{0};
  std::mutex mu;
  std::map<std::string, int64_t> committed;  // org → rows committed.
  std::vector<std::string> failures;
  std::vector<std::thread> apps;
  for (int t = 0; t < 8; ++t) {
    apps.emplace_back([&, t] {
      std::mt19937 random(static_cast<uint32_t>(100 + t));
      pqxx::connection conn(url_);
      for (int i = next_tx++; i < 100; i = next_tx++) {
        const int rows = std::uniform_int_distribution<int>(1, 1'000)(random);
        std::map<std::string, int64_t> mine;
        std::string values;
        for (int r = 0; r < rows; ++r) {
          const std::string& org = orgs[random() % kOrgs];
          ++mine[org];
          absl::StrAppend(&values, r ? "," : "", "('", org, "')");
        }
        try {
          pqxx::work tx(conn);
          tx.exec0("INSERT INTO hs.appointments (org_id) VALUES " + values);
          if (i % 3 == 0) {
            tx.abort();
            continue;
          }
          tx.commit();
          std::lock_guard lock(mu);
          for (const auto& [org, n] : mine) committed[org] += n;
        } catch (const std::exception& e) {
          std::lock_guard lock(mu);
          failures.push_back(absl::StrCat("transaction ", i, ": ", e.what()));
        }
      }
    });
  }
  for (std::thread& app : apps) app.join();
  EXPECT_TRUE(failures.empty()) << failures.front();
  auto expected = FinishLoadgen(*loadgen);
  const std::string today = absl::FormatTime("%Y-%m-%d", absl::Now(), absl::UTCTimeZone());
  int64_t rows = 0;
  for (const auto& [org, n] : committed) {
    expected[{org, "api_calls", "hs", today}] += n;
    rows += n;
  }
  EXPECT_GT(rows, 10'000);
  EXPECT_EQ(QueryInt(url_, "SELECT count(*) FROM hs.appointments"), rows);
  ExpectExact(expected);
  EXPECT_EQ(ReadFile(meterd->log_path()).find("deadlock"), std::string::npos)
      << ReadFile(meterd->log_path());
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

// Personal values planted through every entry point (back office SQL, Stripe tables, a webhook
// payload, the request log, a Kafka event that is counted and one that is rejected) are all in
// `meterd org export`; after `meterd org erase` none of them is anywhere in the database, in
// meterd's log or in /metrics, and the org's invoice totals are unchanged. A tenant login and
// the daemon's role may run neither command; a back-office login may.
TEST_F(PipelineTest, OrgExportFindsPersonalDataAndEraseLeavesNoneOfIt) {
  const std::string org = "00000000-0000-4000-8000-0000000000cd";
  const std::string name = "Zelda Quux-Marlowe";
  const std::string email = "zelda.quux@example.org";
  const std::string last4 = "9731";
  Exec(url_,
       absl::StrCat(
           "INSERT INTO shared.organizations VALUES ('", org, "', '", name,
           " Plumbing', 'hs');"
           "INSERT INTO shared.stripe_customers VALUES ('",
           org, "', 'cus_Zq1', '", email,
           "');"
           "INSERT INTO shared.payment_methods (org_id, stripe_payment_method_id, brand, last4, "
           "  exp_month, exp_year) VALUES ('",
           org, "', 'pm_Zq1', 'visa', '", last4,
           "', 4, 2031);"
           "INSERT INTO shared.stripe_webhook_events (stripe_event_id, event_type, payload) VALUES "
           "  ('evt_Zq1', 'customer.updated', '{\"data\": {\"object\": {\"id\": \"cus_Zq1\", "
           "  \"email\": \"",
           email, "\", \"name\": \"", name,
           "\"}}}');"
           // A period that ended an hour ago, so close-period invoices it.
           "INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, "
           "  current_period_end, billing_anchor) VALUES ('",
           org,
           "', 'pro', "
           "  now() - interval '1 month' - interval '1 hour', now() - interval '1 hour', "
           "  now() - interval '1 month' - interval '1 hour');"
           "SELECT shared.track_api_request('",
           org, "', '/customers/", email, "', 'GET', 200, 3);"));
  // An API key labelled with the person's name (its metadata is exported, the key erased).
  auto key = RunCommand(
      {"api-key", "create", "--pg", url_, "--org", org, "--label", name + "'s laptop"}, "key");
  ASSERT_EQ(key.first, 0) << key.second;
  const int http_port = FreeLocalPort();
  auto meterd = StartMeterd("a", "300ms", {"--http-listen", absl::StrCat("127.0.0.1:", http_port)});
  ASSERT_GT(WaitForHttp(http_port), 0) << ReadFile(meterd->log_path());
  // Counted (its extra fields are never stored) and rejected (stored raw, with the org's id).
  const std::string counted = UsageEventJson(org, "api_calls", 40, "hs");
  const std::string with_email =
      counted.substr(0, counted.rfind('}')) + absl::StrCat(",\"contact\":\"", email, "\"}");
  const std::string rejected = absl::StrCat(
      "{\"specversion\":\"1.0\",\"id\":\"r1\",\"source\":\"app\",\"type\":\"api_calls\","
      "\"subject\":\"",
      org, "\",\"data\":{\"quantity\":-5,\"industry\":\"hs\",\"email\":\"", email, "\",\"name\":\"",
      name, "\"}}");
  ProduceOrDie(broker_->bootstrap(), kTopic, org, {with_email, rejected});
  ASSERT_TRUE(Eventually(
      [&] {
        return QueryInt(url_, "SELECT count(*) FROM shared.rejected_events") == 1 &&
               QueryInt(url_,
                        "SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters "
                        "WHERE org_id = '" +
                            org + "'") == 41;
      },
      absl::Seconds(60)))
      << ReadFile(meterd->log_path());
  auto close = RunCommand({"close-period", "--pg", url_}, "close");
  ASSERT_EQ(close.first, 0) << close.second;
  const std::string invoice_sql =
      "SELECT count(*) * 1000000000 + sum(total_micros) FROM "
      "shared.invoices";
  const int64_t invoices_before = QueryInt(url_, invoice_sql);
  ASSERT_GT(invoices_before, 1'000'000'000);

  // Who may: not a tenant login, not the daemon's role; a back-office login may.
  Exec(url_,
       "DO $$ BEGIN "
       "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'it_tenant') THEN "
       "  CREATE ROLE it_tenant LOGIN IN ROLE meterd_org; END IF; "
       "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'it_daemon') THEN "
       "  CREATE ROLE it_daemon LOGIN IN ROLE meterd; END IF; "
       "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'it_backoffice') THEN "
       "  CREATE ROLE it_backoffice LOGIN IN ROLE meterd_admin; END IF; END $$");
  Exec(url_, "INSERT INTO shared.org_logins VALUES ('it_tenant', '" + org + "')");
  auto as = [&](const std::string& role) {
    return absl::StrCat("postgresql://", role, url_.substr(url_.find('@')));
  };
  for (const char* role : {"it_tenant", "it_daemon"}) {
    for (const char* command : {"export", "erase"}) {
      auto refused = RunCommand({"org", command, "--pg", as(role), "--org", org}, "refused");
      EXPECT_EQ(refused.first, 1) << role << " " << command;
      EXPECT_NE(refused.second.find("lacks the meterd_admin role"), std::string::npos)
          << refused.second;
    }
  }
  Exec(url_, "DELETE FROM shared.org_logins WHERE login = 'it_tenant'");

  const std::string exported = dir_ + "/export.json";
  auto export_run = RunCommand(
      {"org", "export", "--pg", as("it_backoffice"), "--org", org, "--out", exported}, "export");
  ASSERT_EQ(export_run.first, 0) << export_run.second;
  const std::string document = ReadFile(exported);
  EXPECT_EQ(std::filesystem::status(exported).permissions() & std::filesystem::perms::others_read,
            std::filesystem::perms::none);
  for (const std::string& planted :
       std::vector<std::string>{name + " Plumbing", email, "\"last4\": \"" + last4 + "\"",
                                "/customers/" + email, "\"email\\\":\\\"" + email, "\"cus_Zq1\"",
                                "\"pm_Zq1\"", "\"evt_Zq1\"", name + "'s laptop"}) {
    EXPECT_NE(document.find(planted), std::string::npos) << planted << " not in " << document;
  }
  for (const char* section : {"\"invoices\": [{", "\"usage\": [{", "\"subscriptions\": [{",
                              "\"rejected_events\": [{", "\"request_logs\": [{"}) {
    EXPECT_NE(document.find(section), std::string::npos) << section << " in " << document;
  }

  // Still billed: refused until the subscription has ended.
  auto live = RunCommand({"org", "erase", "--pg", as("it_backoffice"), "--org", org}, "live");
  EXPECT_EQ(live.first, 1);
  EXPECT_NE(live.second.find("has a subscription still active"), std::string::npos) << live.second;
  Exec(url_, "UPDATE shared.subscriptions SET status = 'ended' WHERE org_id = '" + org + "'");
  auto erase = RunCommand({"org", "erase", "--pg", as("it_backoffice"), "--org", org}, "erase");
  ASSERT_EQ(erase.first, 0) << erase.second;
  EXPECT_NE(erase.second.find("\"found\": true"), std::string::npos) << erase.second;
  EXPECT_EQ(erase.second.find(org), std::string::npos) << erase.second;
  auto again = RunCommand({"org", "erase", "--pg", url_, "--org", org}, "erase-again");
  ASSERT_EQ(again.first, 0) << again.second;
  EXPECT_NE(again.second.find("{\"found\": false}"), std::string::npos) << again.second;

  const std::string dump_path = dir_ + "/dump.sql";
  ASSERT_EQ(
      std::system(absl::StrCat("pg_dump --data-only --dbname='", url_, "' > ", dump_path).c_str()),
      0);
  const std::string dump = ReadFile(dump_path);
  const auto [metrics_status, metrics] = HttpGet(http_port, "/metrics");
  EXPECT_EQ(metrics_status, 200);
  const std::string log = ReadFile(meterd->log_path());
  for (const std::string& planted :
       std::vector<std::string>{name, email, "\t" + last4 + "\t", "cus_Zq1", "pm_Zq1"}) {
    EXPECT_EQ(dump.find(planted), std::string::npos) << planted << " still in the database";
    EXPECT_EQ(log.find(planted), std::string::npos) << planted << " in meterd's log";
    EXPECT_EQ(metrics.find(planted), std::string::npos) << planted << " in /metrics";
  }
  EXPECT_EQ(dump.find(org), std::string::npos) << "the old org id is still in the database";
  EXPECT_EQ(QueryInt(url_, invoice_sql), invoices_before);
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.audit_log WHERE action = 'org.erased' "
                     "AND actor = 'role:it_backoffice'"),
            1);
  EXPECT_EQ(QueryInt(url_,
                     "SELECT count(*) FROM shared.organizations WHERE name = "
                     "'erased organization'"),
            1);
  meterd->Signal(SIGTERM);
  EXPECT_EQ(meterd->Wait(absl::Seconds(60)), 0) << ReadFile(meterd->log_path());
}

}  // namespace
}  // namespace meterd::testing
