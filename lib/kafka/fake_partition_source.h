#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "lib/kafka/partition_source.h"

namespace meterd::kafka {

// An in-memory PartitionSource for deterministic tests of the consumer logic: the test
// appends messages, makes partitions endless, moves the log start (retention) and decides
// when the group assigns and revokes. Behaves like librdkafka where the consumer can tell:
// an empty-to-non-empty queue writes one byte to its fd; a position outside the log is
// delivered once as kOutOfRange and then nothing until a seek; a seek drops nothing that was
// already returned by Poll. Thread-safe.
class FakePartitionSource final : public PartitionSource {
 public:
  explicit FakePartitionSource(int partitions);
  ~FakePartitionSource() override;

  // Test side. Appends a message; returns its offset.
  int64_t Append(int32_t partition, std::string value, int64_t timestamp_ms = -1);
  // From now on the partition never runs dry: message n past what was appended is make(n)
  // (deterministic, so a seek back reads the same bytes again).
  void MakeEndless(int32_t partition, std::function<std::string(int64_t offset)> make);
  // Retention: messages below `offset` are gone.
  void DeleteBefore(int32_t partition, int64_t offset);
  // Group events, served by the next Polls in order.
  void Assign(std::vector<int32_t> partitions);
  void Revoke(std::vector<int32_t> partitions, bool lost = false);
  // The next `n` seeks fail.
  void FailSeeks(int n);
  // Next offset the partition's queue will deliver.
  int64_t Position(int32_t partition) const;
  int64_t seeks() const;

  // PartitionSource.
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
  class Queue;
  struct StoredMessage {
    std::string value;
    int64_t timestamp_ms;
  };
  struct Partition {
    std::deque<StoredMessage> log;  // Offsets [0, log.size()); below log_start deleted.
    int64_t log_start = 0;
    std::function<std::string(int64_t)> endless;
    int64_t generated_end = 0;  // Past the last endless message handed out.
    bool assigned = false;
    Queue* queue = nullptr;
    int64_t position = 0;
    bool out_of_range_reported = false;
  };
  struct GroupEvent {
    bool assign;
    std::vector<int32_t> partitions;
    bool lost;
  };

  // With mu_ held.
  int64_t LogEndLocked(const Partition& p) const;
  bool HasDataLocked(const Partition& p) const;
  void NotifyLocked(Queue* queue);

  mutable std::mutex mu_;
  std::condition_variable events_cv_;
  std::vector<Partition> partitions_;
  std::deque<GroupEvent> events_;
  GroupListener* listener_ = nullptr;
  int failing_seeks_ = 0;
  int64_t seeks_ = 0;
};

}  // namespace meterd::kafka
