#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <librdkafka/rdkafka.h>

#include "absl/container/flat_hash_set.h"
#include "lib/kafka/client.h"
#include "lib/kafka/partition_source.h"

namespace meterd::kafka {

struct RdKafkaSourceOptions {
  std::string brokers;  // For messages; bootstrap.servers itself is one of `properties`.
  std::string topic;
  Properties properties;  // Complete consumer configuration (group.id, strategy, ...).
  absl::Duration startup_timeout = absl::Seconds(15);
};

// PartitionSource on one librdkafka consumer. Each queue is an rd_kafka_queue_t; an assigned
// partition's own queue is forwarded to it (Route), before incremental_assign.
class RdKafkaSource final : public PartitionSource {
 public:
  // Fails with one clear message if Kafka is unreachable or the topic does not exist.
  static absl::StatusOr<std::unique_ptr<RdKafkaSource>> Create(RdKafkaSourceOptions options);
  // Queues made by this source must be destroyed first.
  ~RdKafkaSource() override;

  absl::StatusOr<std::unique_ptr<MessageQueue>> NewQueue() override;
  void Route(int32_t partition, MessageQueue* queue) override;
  absl::Status Subscribe(GroupListener* listener) override;
  PollEvent Poll(absl::Duration timeout) override;
  absl::Status Close() override;
  absl::Status Seek(int32_t partition, int64_t offset) override;
  absl::Status LogBounds(int32_t partition, int64_t* low, int64_t* high) override;
  int64_t CachedLogEnd(int32_t partition) const override;
  int AssignedCount() const override;

 private:
  explicit RdKafkaSource(RdKafkaSourceOptions options) : options_(std::move(options)) {}
  static void OnRebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                          rd_kafka_topic_partition_list_t* partitions, void* opaque);
  void Assign(rd_kafka_topic_partition_list_t* partitions);
  void Revoke(rd_kafka_topic_partition_list_t* partitions);

  const RdKafkaSourceOptions options_;
  Handle consumer_;
  GroupListener* listener_ = nullptr;
  mutable std::mutex assigned_mu_;
  absl::flat_hash_set<int32_t> assigned_;  // Guarded by assigned_mu_: what incremental_assign took.
  // Poll thread only (read again in the destructor, after the poll loop ended).
  bool subscribed_ = false;
  bool ever_assigned_ = false;
};

}  // namespace meterd::kafka
