// The flusher's meter refresh with a FlushWriter that injects refresh failures: every tick
// asks, a failure never stops the ticks or counts as a failed flush, and a failure streak is
// logged once.
#include "lib/ingest/flusher.h"

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

}  // namespace
}  // namespace meterd::ingest
