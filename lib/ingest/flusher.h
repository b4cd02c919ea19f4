#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/aggregate/counters.h"
#include "lib/common/clock.h"
#include "lib/common/metrics.h"
#include "lib/ingest/shard.h"
#include "lib/store/flush_writer.h"

namespace meterd::ingest {

// Told, after each commit, which orgs it touched (the overage worker listens). Must not block.
using CommitListener = std::function<void(const std::vector<event::OrgId>&)>;

struct FlusherOptions {
  absl::Duration interval = absl::Seconds(1);
  // Adaptive flushing (FlushPacer): the interval grows up to this while flushes take more than
  // half of it, and shrinks back to `interval` when they are cheap again. Zero or at most
  // `interval`: a fixed interval.
  absl::Duration max_interval = absl::ZeroDuration();
  absl::Duration max_backoff = absl::Seconds(30);
  CommitListener on_committed;
  const Clock* clock = &SystemClock::Get();  // Schedules flushes and retries; stamps them.
  MetricsRegistry* metrics = nullptr;        // Where FlushMetrics go (null: a private one).
};

// The flusher's metrics, registered by name (so tests and the stats line read them back).
struct FlushMetrics {
  FlushMetrics(MetricsRegistry& registry, const Clock* clock);
  Counter* flushes;   // Committed flush transactions.
  Counter* failures;  // Attempts that failed (retried).
  Counter* fenced;    // Partitions whose offset CAS failed.
  Counter* rows;
  Counter* events;
  Gauge* last_rows;
  Gauge* last_events;
  Gauge* largest_rows;
  Gauge* largest_events;
  Gauge* last_success_unix_ms;  // 0: never.
  Histogram* duration;          // Of committed flushes: seal + write + commit.
  Histogram* visible_latency;   // Per partition and flush: commit time - oldest message's time.
  Gauge* interval_ms;           // The interval adaptive flushing chose (FlushPacer).
  Counter* interval_longer;     // Times it grew (flushes took more than half of it)…
  Counter* interval_shorter;    // …and shrank back.
};

// Every interval (or when a shard hits its key cap) seals every shard's counters by message
// passing and writes them in ONE Postgres transaction through the FlushWriter. Sealed deltas
// that could not be written stay pending and are merged with the next seal; while Postgres is
// down the shards are paused. After each successful flush the writer refreshes the meter
// registry the shards parse with, so a meter inserted into shared.meters is counted within one
// interval; this thread is that registry's only writer. Owned by the Ingestor; runs its own
// thread. `mu_` serialises the writer between that thread and the rebalance callback.
class Flusher {
 public:
  Flusher(std::vector<Shard*> shards, std::unique_ptr<store::FlushWriter> writer,
          FlusherOptions options);
  ~Flusher();

  void Start();
  // Stops the thread; does not flush (the Ingestor's revoke path does the final flush).
  void Stop();
  // Wakes the flusher early. Thread-safe; cheap.
  void RequestFlush();

  // Revoke path: seals `partitions` out of their shards, writes them with everything pending,
  // retrying until `deadline`. Deltas still unwritten then are dropped (their offsets were not
  // advanced, so the partition's next owner counts them).
  absl::Status FlushAndRelease(const std::vector<int32_t>& partitions, absl::Duration deadline);
  // Stored offsets, retrying while Postgres is unavailable until `deadline`.
  absl::StatusOr<absl::flat_hash_map<int32_t, int64_t>> LoadOffsets(absl::Duration deadline);

  const FlushMetrics& metrics() const { return metrics_; }
  // Did the latest flush attempt succeed? (Readiness.) Thread-safe.
  bool last_ok() const { return last_ok_.load(std::memory_order_relaxed); }

 private:
  void Loop();
  // With mu_ held: merge `fresh` into pending_, write, handle fenced partitions.
  absl::Status WritePendingLocked(std::vector<aggregate::SealedPartition> fresh);
  void ResumeShardsLocked();
  // With mu_ held: has the writer bring the shared MeterRegistry up to shared.meters.
  void RefreshMetersLocked();
  Shard* ShardFor(int32_t partition) const { return shards_[partition % shards_.size()]; }

  const std::vector<Shard*> shards_;
  const FlusherOptions options_;
  std::unique_ptr<MetricsRegistry> own_metrics_;  // When options.metrics is null.
  MetricsRegistry* const registry_;               // options.metrics or own_metrics_.
  FlushMetrics metrics_;
  std::atomic<bool> last_ok_{true};

  std::mutex mu_;
  std::unique_ptr<store::FlushWriter> writer_;       // Guarded by mu_.
  std::vector<aggregate::SealedPartition> pending_;  // Guarded by mu_.
  bool shards_paused_ = false;                       // Guarded by mu_.
  bool meters_refresh_failing_ = false;              // Guarded by mu_.

  std::mutex wake_mu_;
  std::condition_variable wake_;
  bool wake_requested_ = false;  // Guarded by wake_mu_.
  bool stopping_ = false;        // Guarded by wake_mu_.
  std::thread thread_;
};

}  // namespace meterd::ingest
