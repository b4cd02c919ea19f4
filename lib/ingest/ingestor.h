#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/ingest/flusher.h"
#include "lib/ingest/shard.h"
#include "lib/kafka/client.h"
#include "lib/kafka/partition_source.h"
#include "lib/store/flush_writer.h"

namespace meterd::ingest {

struct IngestOptions {
  std::string brokers;
  std::string topic;
  std::string group;
  int shards = 1;
  absl::Duration flush_interval = absl::Seconds(1);
  // Adaptive flushing's longest interval (see FlusherOptions::max_interval); at most
  // flush_interval (the default here; `meterd run` gives 5 x flush_interval): a fixed one.
  absl::Duration max_visibility_latency = absl::ZeroDuration();
  size_t max_unflushed_keys = 2'000'000;
  absl::Duration stats_interval = absl::Seconds(10);
  absl::Duration startup_timeout = absl::Seconds(15);
  event::ParseLimits parse_limits;
  aggregate::DedupLimits dedup;        // Per partition.
  kafka::Properties kafka_properties;  // Passed through to librdkafka, after our defaults.
  CommitListener on_committed;         // Told which orgs each committed flush touched.
  // Where the ingest metrics are registered (outlives the ingestor); null: a private registry.
  MetricsRegistry* metrics = nullptr;
};

// The librdkafka consumer configuration meterd runs with: our defaults, then the user's
// --kafka-property values. InvalidArgument for an override of a property meterd manages.
absl::StatusOr<kafka::Properties> ConsumerProperties(const IngestOptions& options);

// The consumer: one member of a consumer group (a kafka::PartitionSource), its partitions
// spread over shard threads, and the flusher. The calling thread runs the poll loop, which
// serves rebalances and errors. Owns the source, the shards and the flusher.
class Ingestor final : private kafka::GroupListener {
 public:
  // On a librdkafka consumer. Fails with one clear message if Kafka is unreachable or the
  // topic does not exist.
  static absl::StatusOr<std::unique_ptr<Ingestor>> Create(
      IngestOptions options, std::unique_ptr<store::FlushWriter> writer,
      const event::MeterRegistry* meters, const Clock* clock);
  // On any source (tests: kafka::FakePartitionSource). `options.brokers`, `group` and
  // `kafka_properties` are not used.
  static absl::StatusOr<std::unique_ptr<Ingestor>> CreateWithSource(
      IngestOptions options, std::unique_ptr<kafka::PartitionSource> source,
      std::unique_ptr<store::FlushWriter> writer, const event::MeterRegistry* meters,
      const Clock* clock);
  ~Ingestor() override;

  // Consumes until `stop()` returns true, then: stop fetching, flush everything, leave the group.
  absl::Status Run(const std::function<bool()>& stop);

  // Ready to count: partitions assigned and the latest flush succeeded; otherwise why not.
  // Thread-safe.
  absl::Status Readiness() const;
  MetricsRegistry& metrics() const { return *metrics_; }

 private:
  Ingestor(IngestOptions options, const Clock* clock)
      : options_(std::move(options)), clock_(clock) {}
  // kafka::GroupListener, on the poll thread.
  bool OnAssign(std::vector<kafka::AssignedPartition>& partitions) override;
  void OnRevoke(const std::vector<int32_t>& partitions, bool lost) override;
  void LogStats(absl::Duration elapsed);
  Shard* ShardFor(int32_t partition) const { return shards_[partition % shards_.size()].get(); }

  IngestOptions options_;
  const Clock* const clock_;
  std::unique_ptr<MetricsRegistry> own_metrics_;  // When options.metrics is null.
  MetricsRegistry* metrics_ = nullptr;
  std::unique_ptr<ShardMetrics> shard_metrics_;
  Gauge* first_assignment_unix_ms_ = nullptr;
  // Declaration order is destruction order: the flusher uses the shards, the shards' queues
  // belong to the source.
  std::unique_ptr<kafka::PartitionSource> source_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::unique_ptr<Flusher> flusher_;
  int64_t last_logged_events_ = 0;
  absl::Status last_revoke_status_;              // Of the last revoke's flush; poll thread only.
  const std::function<bool()>* stop_ = nullptr;  // Run's, while it runs; poll thread only.
};

}  // namespace meterd::ingest
