// The consumer logic (shards, flusher, rebalance handling) on the in-memory seams: a
// kafka::FakePartitionSource instead of Kafka and a FlushWriter that keeps offsets and totals
// in memory with the same CAS rule as Postgres. Fast and deterministic where the embedded
// broker cannot be: a partition that never runs dry, a revoke in the middle of a flush, a
// fence, the flush schedule under a clock the test moves.
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/ingest/ingestor.h"
#include "lib/kafka/fake_partition_source.h"
#include "tests/support/harness.h"

namespace meterd::ingest {
namespace {

using aggregate::SealedPartition;

// Partition p's events all belong to org kOrgs[p], quantity 1 each, one event per message with
// id "p<partition>-<offset>": after an exact run, org p's total equals partition p's offset.
const char* const kOrgs[] = {
    "00000000-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000001",
    "00000000-0000-4000-8000-000000000002", "00000000-0000-4000-8000-000000000003"};

std::string EventAt(int32_t partition, int64_t offset, absl::Time time) {
  return absl::StrCat(R"({"specversion":"1.0","id":"p)", partition, "-", offset,
                      R"(","source":"fake","type":"api_calls","subject":")", kOrgs[partition],
                      R"(","time":")",
                      absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", time, absl::UTCTimeZone()),
                      R"(","data":{"quantity":1,"industry":"hs"}})");
}

// Postgres's flush contract in memory: one "transaction" per Write, CAS on each partition's
// next offset, nothing applied if any partition is fenced. Can block a chosen write (a flush
// in progress) and fail writes (Postgres down).
class MemoryWriter final : public store::FlushWriter {
 public:
  absl::StatusOr<store::FlushOutcome> Write(const std::vector<SealedPartition>& batch) override {
    std::unique_lock lock(mu_);
    ++attempts_;
    if (block_next_) {
      block_next_ = false;
      blocked_ = true;
      changed_.notify_all();
      changed_.wait(lock, [&] { return !blocked_; });
    }
    if (failures_left_ > 0) {
      --failures_left_;
      return absl::UnavailableError("injected: Postgres unavailable");
    }
    store::FlushOutcome outcome;
    for (const SealedPartition& p : batch) {
      auto it = offsets_.find(p.partition);
      const int64_t stored = it == offsets_.end() ? SealedPartition::kNoStoredOffset : it->second;
      if (stored != p.expected_offset) outcome.fenced.push_back({p.partition, stored});
    }
    if (!outcome.fenced.empty()) return outcome;
    for (const SealedPartition& p : batch) {
      offsets_[p.partition] = p.next_offset;
      p.ForEachDelta([&](const aggregate::CounterKey& key, int64_t quantity) {
        totals_[event::OrgIdToString(key.org)] += quantity;
      });
      outcome.rows_written += p.keys();
    }
    ++commits_;
    changed_.notify_all();
    return outcome;
  }
  absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> LoadOffsets() override {
    std::lock_guard lock(mu_);
    ++loads_;
    if (fail_loads_) return absl::UnavailableError("injected: Postgres unavailable");
    return absl::flat_hash_map<int32_t, int64_t>(offsets_.begin(), offsets_.end());
  }
  absl::Status RefreshMeters() override { return absl::OkStatus(); }

  // Another owner counted [from, to) of `partition` and moved its offset on.
  void CountedElsewhere(int32_t partition, int64_t from, int64_t to) {
    std::lock_guard lock(mu_);
    offsets_[partition] = to;
    totals_[kOrgs[partition]] += to - from;
  }
  void BlockNextWrite() {
    std::lock_guard lock(mu_);
    block_next_ = true;
  }
  bool WaitUntilBlocked(absl::Duration timeout) {
    std::unique_lock lock(mu_);
    return changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return blocked_; });
  }
  void Unblock() {
    std::lock_guard lock(mu_);
    blocked_ = false;
    changed_.notify_all();
  }
  void FailLoads(bool fail) {
    std::lock_guard lock(mu_);
    fail_loads_ = fail;
  }
  int loads() {
    std::lock_guard lock(mu_);
    return loads_;
  }
  void FailNextWrites(int n) {
    std::lock_guard lock(mu_);
    failures_left_ = n;
  }
  // Waits (real time, bounded) until `done` holds with the lock held.
  bool WaitFor(const std::function<bool()>& done, absl::Duration timeout = absl::Seconds(30)) {
    std::unique_lock lock(mu_);
    return changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout), done);
  }
  int64_t offset(int32_t partition) {
    std::lock_guard lock(mu_);
    auto it = offsets_.find(partition);
    return it == offsets_.end() ? SealedPartition::kNoStoredOffset : it->second;
  }
  int64_t total(int32_t partition) {
    std::lock_guard lock(mu_);
    return totals_[kOrgs[partition]];
  }
  int attempts() {
    std::lock_guard lock(mu_);
    return attempts_;
  }
  int commits() {
    std::lock_guard lock(mu_);
    return commits_;
  }
  // For WaitFor's predicate (the lock is held): the stored offset, without inserting a row
  // (an inserted 0 would fence the first flush).
  int64_t OffsetLocked(int32_t partition) const {
    auto it = offsets_.find(partition);
    return it == offsets_.end() ? SealedPartition::kNoStoredOffset : it->second;
  }
  int commits_ = 0;  // Guarded by mu_ (read inside WaitFor's predicate).

 private:
  std::mutex mu_;
  std::condition_variable changed_;
  std::map<int32_t, int64_t> offsets_;
  std::map<std::string, int64_t> totals_;
  int attempts_ = 0;
  int loads_ = 0;
  bool fail_loads_ = false;
  int failures_left_ = 0;
  bool block_next_ = false;
  bool blocked_ = false;
};

class ConsumerFakeTest : public ::testing::Test {
 protected:
  ConsumerFakeTest() : meters_(event::MeterRegistry::Defaults()) {}
  ~ConsumerFakeTest() override { Stop(); }

  // Starts an ingestor on `partitions` fake partitions, consuming on its own thread.
  void Start(int partitions, int shards, absl::Duration flush_interval,
             const Clock* clock = &SystemClock::Get()) {
    auto source = std::make_unique<kafka::FakePartitionSource>(partitions);
    source_ = source.get();
    auto writer = std::make_unique<MemoryWriter>();
    writer_ = writer.get();
    IngestOptions options;
    options.topic = "usage-events";
    options.shards = shards;
    options.flush_interval = flush_interval;
    options.stats_interval = absl::Hours(1);
    auto ingestor =
        Ingestor::CreateWithSource(options, std::move(source), std::move(writer), &meters_, clock);
    ASSERT_TRUE(ingestor.ok()) << ingestor.status();
    ingestor_ = std::move(ingestor).value();
    runner_ = std::thread([this] { status_ = ingestor_->Run([this] { return stop_.load(); }); });
  }

  void Stop() {
    if (!runner_.joinable()) return;
    // Endless partitions end first, so a shard that never yields fails the test, not hangs it.
    for (int32_t p : endless_) source_->MakeEndless(p, {});
    stop_ = true;
    runner_.join();
    EXPECT_TRUE(status_.ok()) << status_;
  }

  void MakeEndless(int32_t partition) {
    const absl::Time now = absl::Now();
    source_->MakeEndless(
        partition, [partition, now](int64_t offset) { return EventAt(partition, offset, now); });
    endless_.push_back(partition);
  }

  // Appends messages [log end, log end + n) to `partition`.
  void Append(int32_t partition, int n) {
    for (int i = 0; i < n; ++i) {
      const int64_t offset = log_end_[partition]++;
      source_->Append(partition, EventAt(partition, offset, absl::Now()));
    }
  }

  // Blocks until the group has served `fake`'s pending events (assign/revoke), bounded.
  bool WaitAssigned(int count, absl::Duration timeout = absl::Seconds(10)) {
    return testing::Eventually([&] { return source_->AssignedCount() == count; }, timeout,
                               absl::Microseconds(200));
  }

  event::MeterRegistry meters_;
  kafka::FakePartitionSource* source_ = nullptr;  // Owned by the ingestor.
  MemoryWriter* writer_ = nullptr;                // Owned by the ingestor.
  std::unique_ptr<Ingestor> ingestor_;
  std::map<int32_t, int64_t> log_end_;
  std::vector<int32_t> endless_;
  std::atomic<bool> stop_{false};
  absl::Status status_;
  std::thread runner_;
};

// A queue that never runs dry (a broker catching up faster than the shard parses): the shard
// must still seal on every flush interval and give up a revoked partition at once.
TEST_F(ConsumerFakeTest, FlushesKeepTheirIntervalAndARevokeIsQuickWhileTheQueueNeverRunsDry) {
  Start(/*partitions=*/2, /*shards=*/1, /*flush_interval=*/absl::Milliseconds(100));
  MakeEndless(0);
  MakeEndless(1);
  source_->Assign({0, 1});
  ASSERT_TRUE(WaitAssigned(2));

  // Flush interval: 100 ms. Over 2 s, about 20 commits; a shard that drains without yielding
  // makes none (every seal waits behind the queue forever).
  const int commits_before = writer_->commits();
  absl::SleepFor(absl::Seconds(2));
  const int commits = writer_->commits() - commits_before;
  EXPECT_GE(commits, 5) << "flushes starve behind a queue that never runs dry";

  // Revokes (each flushes the partition before giving it up) while the other partition keeps
  // the shard busy: each completes well within 100 ms.
  std::vector<absl::Duration> revokes;
  for (int round = 0; round < 5; ++round) {
    const absl::Time started = absl::Now();
    source_->Revoke({1});
    ASSERT_TRUE(WaitAssigned(1)) << "revoke " << round << " never completed";
    revokes.push_back(absl::Now() - started);
    source_->Assign({1});
    ASSERT_TRUE(WaitAssigned(2));
  }
  std::sort(revokes.begin(), revokes.end());
  EXPECT_LT(revokes[revokes.size() / 2], absl::Milliseconds(100))
      << "median revoke " << absl::FormatDuration(revokes[revokes.size() / 2]);

  Stop();
  // Exactly once across the seals, revokes and re-assignments: each partition's org holds one
  // unit per offset Postgres says was consumed.
  for (int32_t p = 0; p < 2; ++p) {
    EXPECT_GT(writer_->offset(p), 0);
    EXPECT_EQ(writer_->total(p), writer_->offset(p)) << "partition " << p;
  }
}

// Another owner advanced the partition (we were a zombie): our flush fails the CAS, our deltas
// are dropped, the shard seeks to what "Postgres" holds and counts on from there.
TEST_F(ConsumerFakeTest, AFencedPartitionSeeksBackToTheStoredOffsetAndCountsOnExactly) {
  Start(/*partitions=*/1, /*shards=*/1, absl::Milliseconds(50));
  Append(0, 500);
  source_->Assign({0});
  ASSERT_TRUE(writer_->WaitFor([&] { return writer_->OffsetLocked(0) == 500; }));
  const int64_t seeks_before = source_->seeks();

  writer_->CountedElsewhere(0, 500, 800);  // Messages [500, 800) were counted by the new owner.
  Append(0, 500);                          // [500, 1000)
  ASSERT_TRUE(writer_->WaitFor([&] { return writer_->OffsetLocked(0) == 1000; }));
  Stop();

  EXPECT_GE(source_->seeks(), seeks_before + 1) << "the fenced partition was not sought back";
  EXPECT_EQ(ingestor_->metrics().Value("meterd_fenced_partitions_total"), 1);
  // 500 by us, 300 elsewhere, 200 by us after the fence: nothing twice, nothing lost.
  EXPECT_EQ(writer_->total(0), 1000);
}

// A revoke arrives while a flush is in the middle of its transaction: the revoke waits for it,
// then flushes what the partition counted since, and the next owner (here: us again) starts
// exactly there.
TEST_F(ConsumerFakeTest, ARevokeDuringAFlushWaitsForItAndLosesNothing) {
  Start(/*partitions=*/2, /*shards=*/2, absl::Milliseconds(50));
  Append(0, 300);
  Append(1, 300);
  source_->Assign({0, 1});
  ASSERT_TRUE(writer_->WaitFor([&] { return writer_->OffsetLocked(0) == 300; }));

  writer_->BlockNextWrite();
  Append(0, 200);
  Append(1, 200);
  ASSERT_TRUE(writer_->WaitUntilBlocked(absl::Seconds(30)));
  Append(0, 100);  // Counted after the blocked flush sealed: the revoke flush must carry them.
  source_->Revoke({0});
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(source_->AssignedCount(), 2) << "the revoke must wait for the flush in progress";
  writer_->Unblock();
  ASSERT_TRUE(WaitAssigned(1));
  // When the revoke returns, partition 0 is flushed to the end of what it had read.
  EXPECT_EQ(writer_->offset(0), 600);

  Append(0, 100);
  source_->Assign({0});
  ASSERT_TRUE(writer_->WaitFor(
      [&] { return writer_->OffsetLocked(0) == 700 && writer_->OffsetLocked(1) == 500; }));
  Stop();
  EXPECT_EQ(writer_->total(0), 700);
  EXPECT_EQ(writer_->total(1), 500);
}

// The flush schedule runs on the injected clock: a flush is due one interval after the last
// one started, and after a failure the retry waits the backoff (200 ms, then 400 ms, ...).
TEST_F(ConsumerFakeTest, FlushScheduleAndRetryBackoffFollowTheInjectedClock) {
  ManualClock clock(absl::Now());
  Start(/*partitions=*/1, /*shards=*/1, absl::Seconds(1), &clock);
  Append(0, 10);
  source_->Assign({0});
  ASSERT_TRUE(WaitAssigned(1));
  auto settle = [] { absl::SleepFor(absl::Milliseconds(150)); };  // Real time for threads.

  settle();
  clock.Advance(absl::Milliseconds(999));
  settle();
  EXPECT_EQ(writer_->attempts(), 0) << "flushed before the interval";
  clock.Advance(absl::Milliseconds(1));
  ASSERT_TRUE(writer_->WaitFor([&] { return writer_->commits_ == 1; }));

  writer_->FailNextWrites(2);
  Append(0, 10);
  settle();
  clock.Advance(absl::Seconds(1));  // The next flush: fails.
  testing::Eventually([&] { return writer_->attempts() >= 2; }, absl::Seconds(10),
                      absl::Milliseconds(1));
  ASSERT_EQ(writer_->attempts(), 2);
  // No retry 1 ms before the backoff is up; one right at it.
  auto expect_retry_after = [&](absl::Duration backoff, int attempts_before) {
    settle();
    clock.Advance(backoff - absl::Milliseconds(1));
    settle();
    EXPECT_EQ(writer_->attempts(), attempts_before)
        << "retried before the " << absl::FormatDuration(backoff) << " backoff";
    clock.Advance(absl::Milliseconds(1));
    testing::Eventually([&] { return writer_->attempts() != attempts_before; }, absl::Seconds(10),
                        absl::Milliseconds(1));
  };
  expect_retry_after(absl::Milliseconds(200), 2);  // Fails again: the next waits 400 ms.
  ASSERT_EQ(writer_->attempts(), 3);
  expect_retry_after(absl::Milliseconds(400), 3);
  ASSERT_TRUE(writer_->WaitFor([&] { return writer_->OffsetLocked(0) == 20; }));
  Stop();
  EXPECT_EQ(writer_->total(0), 20);
}

// Postgres is away when the group assigns partitions, for longer than the rebalance's 20 s
// offset-load deadline: the assignment waits and retries (declining it would leave the
// partitions with nobody while this member keeps heartbeating), then counts exactly.
TEST_F(ConsumerFakeTest, AnAssignmentWaitsForTheStoredOffsetsInsteadOfDecliningThem) {
  ManualClock clock(absl::Now());
  Start(/*partitions=*/1, /*shards=*/1, absl::Seconds(1), &clock);
  Append(0, 50);
  writer_->FailLoads(true);
  source_->Assign({0});
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  // Move the clock on past two 20 s deadlines (the load's backoff sleeps on it).
  while (writer_->loads() < 12 && absl::Now() < deadline) {
    clock.Advance(absl::Seconds(1));
    absl::SleepFor(absl::Milliseconds(2));
  }
  ASSERT_GE(writer_->loads(), 12);
  EXPECT_EQ(source_->AssignedCount(), 0);
  writer_->FailLoads(false);
  while (source_->AssignedCount() == 0 && absl::Now() < deadline) {
    clock.Advance(absl::Milliseconds(100));
    absl::SleepFor(absl::Milliseconds(2));
  }
  ASSERT_EQ(source_->AssignedCount(), 1) << "the assignment was given up";
  while (writer_->offset(0) != 50 && absl::Now() < deadline) {
    clock.Advance(absl::Milliseconds(100));
    absl::SleepFor(absl::Milliseconds(2));
  }
  Stop();
  EXPECT_EQ(writer_->total(0), 50);
}

// The metrics an SRE reads: per-partition lag (log end - position) and how long the slowest
// event of each flush waited to become visible, measured from its Kafka timestamp.
TEST_F(ConsumerFakeTest, LagAndEventToVisibleLatencyAreMeasured) {
  Start(/*partitions=*/1, /*shards=*/1, absl::Milliseconds(50));
  // Produced two seconds ago.
  const int64_t produced_ms = absl::ToUnixMillis(absl::Now() - absl::Seconds(2));
  for (int i = 0; i < 100; ++i) {
    source_->Append(0, EventAt(0, i, absl::Now()), produced_ms);
    ++log_end_[0];
  }
  source_->Assign({0});
  ASSERT_TRUE(writer_->WaitFor([&] { return writer_->OffsetLocked(0) == 100; }));
  MetricsRegistry& metrics = ingestor_->metrics();
  // The flusher records a flush's metrics after the writer returned, its duration last (after
  // re-reading the meters).
  ASSERT_TRUE(testing::Eventually(
      [&] {
        const std::string text = metrics.RenderPrometheus();
        return text.find("meterd_event_visible_latency_seconds_count 0\n") == std::string::npos &&
               text.find("meterd_flush_duration_seconds_count 0\n") == std::string::npos;
      },
      absl::Seconds(10)));
  EXPECT_EQ(metrics.Value("meterd_partition_lag", {{"partition", "0"}}), 0);
  EXPECT_EQ(metrics.Value("meterd_events_total"), 100);
  EXPECT_EQ(metrics.Value("meterd_flushed_events_total"), 100);
  const std::string text = metrics.RenderPrometheus();
  // At least one observation, none of them under 1 s: the wait counts from production.
  EXPECT_NE(text.find("meterd_event_visible_latency_seconds_bucket{le=\"1\"} 0\n"),
            std::string::npos)
      << text;
  EXPECT_EQ(text.find("meterd_event_visible_latency_seconds_count 0\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("meterd_flush_duration_seconds_count 0\n"), std::string::npos) << text;
  Stop();
  // A released partition's lag series goes with it.
  EXPECT_EQ(metrics.Value("meterd_partition_lag", {{"partition", "0"}}), std::nullopt);
}

}  // namespace
}  // namespace meterd::ingest
