#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <librdkafka/rdkafka.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/ingest/flusher.h"
#include "lib/ingest/kafka_config.h"
#include "lib/ingest/shard.h"
#include "lib/store/flush_writer.h"

namespace meterd::ingest {

struct IngestOptions {
  std::string brokers;
  std::string topic;
  std::string group;
  int shards = 1;
  absl::Duration flush_interval = absl::Seconds(1);
  size_t max_unflushed_keys = 2'000'000;
  absl::Duration stats_interval = absl::Seconds(10);
  absl::Duration startup_timeout = absl::Seconds(15);
  event::ParseLimits parse_limits;
  aggregate::DedupLimits dedup;      // Per partition.
  KafkaProperties kafka_properties;  // Passed through to librdkafka, after our defaults.
  CommitListener on_committed;       // Told which orgs each committed flush touched.
};

// A consistent-enough view of the counters for /metrics and logs (each value is read atomically).
struct IngestSnapshot {
  int64_t messages = 0, events = 0, rejected = 0, unflushed_keys = 0, paused_shards = 0;
  int64_t duplicates = 0, dedup_ids = 0, offset_gaps = 0, seek_failures = 0;
  int64_t assigned_partitions = 0, shards = 0;
};

// The consumer: one librdkafka consumer in a group, its partitions spread over shard threads,
// and the flusher. The calling thread runs the poll loop, which serves rebalance callbacks
// and errors. Owns the shards, the flusher and the rd_kafka_t.
class Ingestor {
 public:
  // Fails with one clear message if Kafka is unreachable or the topic does not exist.
  static absl::StatusOr<std::unique_ptr<Ingestor>> Create(
      IngestOptions options, std::unique_ptr<store::FlushWriter> writer,
      const event::MeterRegistry* meters, const Clock* clock);
  ~Ingestor();

  // Consumes until `stop()` returns true, then: stop fetching, flush everything, leave the group.
  absl::Status Run(const std::function<bool()>& stop);

  const FlushStats& flush_stats() const { return flusher_->stats(); }
  // Thread-safe.
  IngestSnapshot Snapshot() const;

 private:
  explicit Ingestor(IngestOptions options) : options_(std::move(options)) {}
  static void OnRebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                          rd_kafka_topic_partition_list_t* partitions, void* opaque);
  void Assign(rd_kafka_topic_partition_list_t* partitions);
  void Revoke(rd_kafka_topic_partition_list_t* partitions);
  void LogStats(absl::Duration elapsed);
  Shard* ShardFor(int32_t partition) const { return shards_[partition % shards_.size()].get(); }

  IngestOptions options_;
  rd_kafka_t* consumer_ = nullptr;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::unique_ptr<Flusher> flusher_;
  int64_t last_logged_events_ = 0;
  std::atomic<int64_t> assigned_partitions_{0};
  // Poll thread only (read again in the destructor, after the poll loop ended).
  bool subscribed_ = false;
  std::atomic<bool> ever_assigned_{false};
  absl::Status last_revoke_status_;  // Of the last revoke's flush; poll thread only.
};

}  // namespace meterd::ingest
