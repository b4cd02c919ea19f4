// The ingestor in process, against the embedded Kafka and a real Postgres, with the two seams
// tests substitute: a FlushWriter that injects faults and a clock the test drives.
#include "lib/ingest/ingestor.h"

#include <atomic>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/devtools/dev_broker.h"
#include "lib/devtools/loadgen.h"
#include "lib/store/pg_flush_writer.h"
#include "tests/support/harness.h"

namespace meterd::ingest {
namespace {

constexpr char kTopic[] = "usage-events";

// Writes through the real writer, then reports the chosen writes as failed although they
// committed: what a connection lost during COMMIT looks like to the flusher.
class AmbiguousCommitWriter final : public store::FlushWriter {
 public:
  AmbiguousCommitWriter(std::unique_ptr<store::FlushWriter> inner, std::set<int> lie_on)
      : inner_(std::move(inner)), lie_on_(std::move(lie_on)) {}

  absl::StatusOr<store::FlushOutcome> Write(
      const std::vector<aggregate::SealedPartition>& batch) override {
    auto outcome = inner_->Write(batch);
    const int n = ++writes_;
    if (outcome.ok() && outcome->fenced.empty() && lie_on_.contains(n)) {
      ++lies_;
      return absl::UnavailableError("injected: connection lost during COMMIT");
    }
    return outcome;
  }
  absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> LoadOffsets() override {
    return inner_->LoadOffsets();
  }
  absl::Status RefreshMeters() override { return inner_->RefreshMeters(); }
  static std::atomic<int> lies_;

 private:
  std::unique_ptr<store::FlushWriter> inner_;
  std::set<int> lie_on_;
  int writes_ = 0;
};
std::atomic<int> AmbiguousCommitWriter::lies_{0};

class IngestorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    url_ = testing::SharedPostgres().CreateMigratedDatabase(
        std::string("ing_") + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    auto broker = devtools::DevBroker::Start(kTopic, 8);
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = std::move(broker).value();
    meters_ = event::MeterRegistry::Defaults();
  }

  devtools::LoadgenResult Produce(int64_t events, uint64_t seed = 1) {
    devtools::LoadgenOptions options;
    options.seed = seed;
    options.brokers = broker_->bootstrap();
    options.topic = std::string(kTopic);
    options.events = events;
    options.orgs = 300;
    auto result = devtools::RunLoadgen(options);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? *result : devtools::LoadgenResult{};
  }

  std::unique_ptr<store::FlushWriter> RealWriter() {
    auto writer = store::PgFlushWriter::Create(url_, {"g", kTopic}, &meters_);
    EXPECT_TRUE(writer.ok()) << writer.status();
    return std::move(writer).value();
  }

  // Runs an ingestor on its own thread until `done` holds (bounded), then stops it. A
  // ManualClock given as `clock` is moved on with real time from where it starts.
  void RunUntil(std::unique_ptr<store::FlushWriter> writer, const Clock* clock,
                const std::function<bool()>& done, ManualClock* manual = nullptr) {
    IngestOptions options;
    options.brokers = broker_->bootstrap();
    options.topic = std::string(kTopic);
    options.group = std::string("g");  // GCC 12 -Wrestrict false positive on = "g".
    options.shards = 2;
    options.flush_interval = absl::Milliseconds(200);
    options.kafka_properties = {{"session.timeout.ms", "6000"}};
    auto ingestor = Ingestor::Create(options, std::move(writer), &meters_, clock);
    ASSERT_TRUE(ingestor.ok()) << ingestor.status();
    std::atomic<bool> stop{false};
    absl::Status status;
    std::thread runner([&] { status = (*ingestor)->Run([&] { return stop.load(); }); });
    const absl::Time deadline = absl::Now() + absl::Seconds(90);
    auto wait = [&](absl::Duration d) {
      absl::SleepFor(d);
      if (manual != nullptr) manual->Advance(d);
    };
    while (!done() && absl::Now() < deadline) wait(absl::Milliseconds(100));
    for (int i = 0; i < 10; ++i) wait(absl::Milliseconds(100));  // Room for a wrong extra flush.
    stop = true;
    // The stop (final flush, retries) waits on the clock too: keep it moving until it is done.
    std::atomic<bool> joined{false};
    std::thread ticker([&] {
      while (!joined.load()) wait(absl::Milliseconds(10));
    });
    runner.join();
    joined = true;
    ticker.join();
    EXPECT_TRUE(status.ok()) << status;
  }

  std::string url_;
  std::unique_ptr<devtools::DevBroker> broker_;
  event::MeterRegistry meters_;
};

TEST_F(IngestorTest, AmbiguousCommitsAreNeitherLostNorDoubleCounted) {
  devtools::ExpectedTotals expected = Produce(25'000, 1).totals;
  bool second_half = false;
  AmbiguousCommitWriter::lies_ = 0;
  // The 1st, 3rd and 4th writes commit but are reported failed. Their retries are fenced;
  // consumption must then go on: the second half is produced only after the first lie.
  RunUntil(std::make_unique<AmbiguousCommitWriter>(RealWriter(), std::set<int>{1, 3, 4}),
           &SystemClock::Get(), [&] {
             if (!second_half && AmbiguousCommitWriter::lies_.load() >= 1) {
               for (const auto& [key, quantity] : Produce(25'000, 2).totals) {
                 expected[key] += quantity;
               }
               second_half = true;
             }
             return second_half &&
                    testing::QueryInt(url_,
                                      "SELECT coalesce(sum(quantity), 0) FROM "
                                      "shared.api_usage_meters") >= testing::SumOf(expected);
           });
  EXPECT_TRUE(second_half);
  EXPECT_GE(AmbiguousCommitWriter::lies_.load(), 1);
  EXPECT_EQ(testing::DiffTotals(expected, testing::StoredTotals(url_)), "");
  EXPECT_EQ(testing::QueryInt(url_, "SELECT sum(next_offset) FROM shared.ingest_offsets"), 50'000);
}

TEST_F(IngestorTest, LateWindowFollowsTheInjectedClock) {
  const devtools::LoadgenResult produced = Produce(5'000);
  // The consumer's clock is 100 days ahead: every event is older than the 62-day window.
  ManualClock clock(absl::Now() + absl::Hours(24 * 100));
  RunUntil(
      RealWriter(), &clock,
      [&] {
        return testing::QueryInt(url_, "SELECT count(*) FROM shared.rejected_events") >=
               produced.produced;
      },
      &clock);
  EXPECT_EQ(testing::QueryInt(url_,
                              "SELECT count(*) FROM shared.rejected_events "
                              "WHERE reason = 'time_too_old'"),
            5'000);
  EXPECT_EQ(testing::QueryInt(url_, "SELECT count(*) FROM shared.api_usage_meters"), 0);
}

}  // namespace
}  // namespace meterd::ingest
