#pragma once

// Boost 1.74's Asio needs <utility> before it under C++20.
#include <utility>

#include <atomic>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "lib/aggregate/counters.h"
#include "lib/aggregate/dedup_window.h"
#include "lib/common/clock.h"
#include "lib/common/metrics.h"
#include "lib/event/event_parser.h"
#include "lib/kafka/partition_source.h"

namespace meterd::ingest {

struct ShardOptions {
  std::string topic;
  // Unflushed keys above which the shard stops draining its queue and asks for a flush.
  size_t max_unflushed_keys = 1'000'000;
  size_t consume_batch = 1000;
  event::ParseLimits parse_limits;
  // Per-partition memory of counted (source, id) pairs; max_ids 0 turns dedup off.
  aggregate::DedupLimits dedup;
};

// The shards' metrics, shared by all shards of an ingestor (registered once, by name). A shard
// publishes once per batch: counts as one Add, gauges as the change since its last publish.
struct ShardMetrics {
  explicit ShardMetrics(MetricsRegistry& registry);
  Counter* messages;
  Counter* events;  // Counted events (not rejected, not duplicates).
  Counter* rejected;
  Counter* duplicates;  // Not counted: same (source, id) seen before.
  Counter* offset_gaps;
  Counter* seek_failures;
  Gauge* dedup_ids;       // Ids remembered over all partitions.
  Gauge* unflushed_keys;  // Counter keys (and rejected rows) not yet flushed.
  Gauge* paused_shards;
  Gauge* last_counted_unix_ms;  // When a shard last counted an event (0: never).
};

// One consumer shard: a thread running an io_context, woken by its message queue through a
// pipe, that parses and aggregates the messages of the partitions it owns.
// Owned by the Ingestor. All partition state is touched only on the shard thread; other
// threads call the public methods, which post to the shard and (where a result is needed) wait.
class Shard {
 public:
  using FlushRequest = std::function<void()>;

  // `source` outlives the shard; the shard makes its queue there and seeks through it.
  // `source`, `metrics` and `registry` outlive the shard; the shard makes its queue in
  // `source`, seeks through it, and registers each owned partition's lag in `registry`.
  static absl::StatusOr<std::unique_ptr<Shard>> Create(int index, kafka::PartitionSource* source,
                                                       const event::MeterRegistry* meters,
                                                       const Clock* clock, ShardOptions options,
                                                       ShardMetrics* metrics,
                                                       MetricsRegistry* registry,
                                                       FlushRequest request_flush);
  ~Shard();

  kafka::MessageQueue* queue() const { return queue_.get(); }
  int index() const { return index_; }

  // Takes ownership of a partition whose next offset in Postgres is `stored_offset`
  // (SealedPartition::kNoStoredOffset when none). Call before forwarding its queue here.
  // Returns the offset to start fetching at: up to dedup.max_ids messages before the stored
  // offset, re-read to rebuild the dedup window and not counted.
  // `log_start`/`log_end` (the partition's watermarks, -1 when unknown) reveal a gap: a stored
  // offset below the log start (retention deleted unread messages) or past its end (the
  // topic was recreated). A gap is never stepped over silently: it is logged, counted and
  // written to shared.rejected_events (reason offset_gap) with the next flush, and reading
  // restarts at the log start.
  int64_t AddPartition(int32_t partition, int64_t stored_offset, int64_t log_start = -1,
                       int64_t log_end = -1);
  // Seals the deltas of every owned partition and returns them (the flush tick).
  std::vector<aggregate::SealedPartition> SealAll();
  // Seals the deltas of `partitions` and gives them up (revoke): nothing of them is counted
  // here any more.
  std::vector<aggregate::SealedPartition> SealAndRelease(const std::vector<int32_t>& partitions);
  // After a CAS miss: seek the partition to what Postgres holds and drop its unflushed deltas.
  void ResetPartition(int32_t partition, int64_t stored_offset);
  // The partition's log start and end (watermarks, asking the broker; -1 and false, logged,
  // when it does not answer within 5 s). Thread-safe.
  bool LogBounds(int32_t partition, int64_t* low, int64_t* high) const;
  // The source reported the partition's position outside its log (on the group's poll):
  // handled on the shard thread like the same error arriving in the shard's queue.
  void PositionOutOfRange(int32_t partition);
  // Stop draining (Postgres down) / resume draining (after a successful flush). Asynchronous.
  void Pause();
  void Resume();
  // Stops the thread. Pending work posted before is run first.
  void Stop();

 private:
  struct OwnedPartition {
    OwnedPartition(int64_t stored_offset, const aggregate::DedupLimits& limits)
        : expected_offset(stored_offset),
          next_offset(stored_offset),
          warm_until(stored_offset),
          dedup(limits),
          position(std::make_shared<std::atomic<int64_t>>(stored_offset)) {}
    int64_t expected_offset;  // What Postgres holds for the deltas not yet sealed.
    int64_t next_offset;      // After the last message counted; kNoStoredOffset before any.
    // Messages below this offset were counted before this shard owned the partition (or
    // before a fence reset): they are re-read only to remember their ids, never counted.
    int64_t warm_until;
    // Its position could not be set (seek failed): nothing of it is read until it is
    // assigned again; loud in the log and in meterd_seek_failures_total.
    bool stopped = false;
    aggregate::PartitionCounters deltas;
    aggregate::DedupWindow dedup;
    // Kafka timestamp of the oldest message counted since the last seal (-1: none): how long
    // the slowest event of a flush waited to become visible.
    int64_t oldest_timestamp_ms = -1;
    // next_offset, published once per batch for the lag gauge (read on the metrics thread).
    std::shared_ptr<std::atomic<int64_t>> position;
  };

  Shard(int index, kafka::PartitionSource* source, const event::MeterRegistry* meters,
        const Clock* clock, ShardOptions options, ShardMetrics* metrics, MetricsRegistry* registry,
        FlushRequest request_flush);
  // Moves the partition's deltas since the last seal into `sealed` (nothing if none).
  void SealOne(int32_t partition, OwnedPartition& owned,
               std::vector<aggregate::SealedPartition>& sealed);
  // Publishes the batch's counts and the gauges' changes (shard thread).
  void Publish(absl::Time now);
  void SetPaused(bool paused);
  // Registers (or drops) the partition's lag gauge: log end minus its position.
  void RegisterLag(int32_t partition, const OwnedPartition& owned);
  void DropLag(int32_t partition);
  absl::Status Open();
  void ArmWakeup();
  void Drain();
  void Process(const kafka::Message& message, absl::Time now);
  // The event bytes of a message: its value, or for a CloudEvents binary-mode message (ce_*
  // headers) the same event in structured mode. nullopt for an empty message.
  std::optional<std::string_view> MessageBytes(const kafka::Message& message);
  void RecordGap(OwnedPartition& owned, int32_t partition, int64_t at, const std::string& what);
  // The partition's position fell outside its log (kafka::Message::Status::kOutOfRange).
  void OutOfRange(OwnedPartition& owned, int32_t partition);
  // Seeks on the shard thread, 3 attempts; false if it never took.
  bool SeekTo(int32_t partition, int64_t offset);
  void StopPartition(OwnedPartition& owned, int32_t partition);
  static std::string PastEndDetail(int64_t stored, int64_t low, int64_t high);
  // Where to start reading a partition whose next offset in Postgres is `stored_offset`: far
  // enough back to rebuild its dedup window, never below `log_start` (-1: unknown, then no
  // re-read at all).
  int64_t ReadFrom(int64_t stored_offset, int64_t log_start) const;
  size_t LiveKeys() const;

  template <typename F>
  auto RunOnShard(F&& body) -> decltype(body()) {
    using Result = decltype(body());
    auto task = std::make_shared<std::packaged_task<Result()>>(std::forward<F>(body));
    auto result = task->get_future();
    boost::asio::post(io_, [task] { (*task)(); });
    return result.get();
  }

  const int index_;
  kafka::PartitionSource* const source_;
  const Clock* const clock_;
  const ShardOptions options_;
  ShardMetrics* const metrics_;
  MetricsRegistry* const registry_;
  const FlushRequest request_flush_;

  boost::asio::io_context io_;
  boost::asio::posix::stream_descriptor wakeup_;
  int wakeup_write_fd_ = -1;
  char wakeup_buffer_[64];
  std::unique_ptr<kafka::MessageQueue> queue_;
  std::thread thread_;

  // Shard-thread state.
  event::EventParser parser_;
  aggregate::PrefetchingAdder adder_;
  absl::flat_hash_map<int32_t, OwnedPartition> partitions_;
  std::vector<std::pair<std::string_view, std::string_view>> header_pairs_;  // Reused.
  std::string binary_event_;                                                 // Reused.
  bool paused_ = false;
  bool flush_requested_ = false;
  // Counted since the last Publish; what this shard last added to the shared gauges.
  int64_t batch_events_ = 0, batch_rejected_ = 0, batch_duplicates_ = 0;
  int64_t published_keys_ = 0, published_ids_ = 0;
};

}  // namespace meterd::ingest
