// The flusher's meter refresh with a FlushWriter that injects refresh failures: every tick
// asks, a failure never stops the ticks or counts as a failed flush, and a failure streak is
// logged once.
#include "lib/ingest/flusher.h"
#include "lib/ingest/flush_pacer.h"

#include <atomic>
#include <sstream>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "absl/time/clock.h"

namespace meterd::ingest {
namespace {

// Refresh fails on the calls `fail_from` .. `fail_to` (1-based), succeeds otherwise.
class RefreshFaultWriter final : public store::FlushWriter {
 public:
  RefreshFaultWriter(int fail_from, int fail_to) : fail_from_(fail_from), fail_to_(fail_to) {}

  absl::StatusOr<store::FlushOutcome> Write(
      const std::vector<aggregate::SealedPartition>&) override {
    ++writes;
    return store::FlushOutcome{};
  }
  absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> LoadOffsets() override {
    return absl::flat_hash_map<int32_t, int64_t>{};
  }
  absl::Status RefreshMeters() override {
    const int n = ++refreshes;
    if (n >= fail_from_ && n <= fail_to_) return absl::InternalError("injected: meters unreadable");
    return absl::OkStatus();
  }

  std::atomic<int> refreshes{0};
  std::atomic<int> writes{0};

 private:
  const int fail_from_;
  const int fail_to_;
};

int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

TEST(FlusherTest, RefreshFailureStreakIsLoggedOnceAndNeverStopsTheTicks) {
  std::ostringstream log;
  auto previous = spdlog::default_logger();
  auto logger = std::make_shared<spdlog::logger>(
      "flusher_test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log));
  spdlog::set_default_logger(logger);

  auto writer = std::make_unique<RefreshFaultWriter>(3, 6);
  RefreshFaultWriter* fake = writer.get();
  FlusherOptions options;
  options.interval = absl::Milliseconds(5);
  {
    Flusher flusher({}, std::move(writer), options);
    flusher.Start();
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (fake->refreshes.load() < 10 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    flusher.Stop();
    // Refresh failures are not flush failures: no backoff, shards never paused.
    EXPECT_EQ(flusher.metrics().failures->value(), 0);
    EXPECT_TRUE(flusher.last_ok());
    // The fake lives as long as the flusher that owns it.
    EXPECT_GE(fake->refreshes.load(), 10);
    EXPECT_EQ(fake->writes.load(), 0);  // Nothing was pending: refreshing needs no flush.
  }
  spdlog::set_default_logger(previous);

  const std::string text = log.str();
  EXPECT_EQ(Count(text, "meters: refresh failed"), 1) << text;
  EXPECT_EQ(Count(text, "injected: meters unreadable"), 1) << text;
  EXPECT_EQ(Count(text, "meters: refresh works again"), 1) << text;
}

// Adaptive flushing's decision, step by step: longer while a flush takes more than half the
// interval (at least to took / 0.5, at most the cap), steady in between, shorter when cheap.
TEST(FlushPacerTest, GrowsWhileFlushesAreExpensiveAndComesBackWhenCheap) {
  FlushPacer pacer({.interval = absl::Milliseconds(1000), .max_interval = absl::Seconds(8)});
  EXPECT_EQ(pacer.current(), absl::Milliseconds(1000));
  EXPECT_EQ(pacer.After(absl::Milliseconds(400)), absl::Milliseconds(1000));   // Within budget.
  EXPECT_EQ(pacer.After(absl::Milliseconds(600)), absl::Milliseconds(2000));   // Doubles.
  EXPECT_EQ(pacer.After(absl::Milliseconds(2500)), absl::Milliseconds(5000));  // took / 0.5.
  EXPECT_EQ(pacer.After(absl::Milliseconds(4000)), absl::Seconds(8));          // Capped.
  EXPECT_EQ(pacer.After(absl::Seconds(30)), absl::Seconds(8));
  EXPECT_EQ(pacer.After(absl::Milliseconds(1500)), absl::Seconds(8));  // Hysteresis: stays.
  EXPECT_EQ(pacer.After(absl::Milliseconds(900)), absl::Seconds(4));   // < budget / 4: halves.
  EXPECT_EQ(pacer.After(absl::Milliseconds(100)), absl::Seconds(2));
  EXPECT_EQ(pacer.After(absl::Milliseconds(100)), absl::Seconds(1));
  EXPECT_EQ(pacer.After(absl::Milliseconds(1)), absl::Seconds(1));  // Never below --flush-interval.
}

TEST(FlushPacerTest, ACapAtTheIntervalIsAFixedInterval) {
  FlushPacer pacer({.interval = absl::Milliseconds(300), .max_interval = absl::Milliseconds(300)});
  EXPECT_EQ(pacer.After(absl::Seconds(5)), absl::Milliseconds(300));
  EXPECT_EQ(pacer.After(absl::ZeroDuration()), absl::Milliseconds(300));
}

}  // namespace
}  // namespace meterd::ingest
