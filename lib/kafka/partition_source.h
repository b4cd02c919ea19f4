#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::kafka {

// The seam between meterd's consumer logic (lib/ingest) and Kafka: a consumer-group member
// whose partitions are routed to queues, one per consuming thread. `RdKafkaSource` is the
// librdkafka implementation; `FakePartitionSource` an in-memory one for deterministic tests.

// Start reading at the partition's first message (an offset, librdkafka's value).
inline constexpr int64_t kOffsetBeginning = -2;

struct Header {
  std::string_view name;
  std::string_view value;
};

// One message, or one per-partition error, as a queue delivers it. Views stay valid until
// the queue's next Poll.
struct Message {
  enum class Status {
    kOk,
    // The partition's position is outside its log (retention deleted it, or the topic was
    // recreated); nothing more of it is delivered until it is sought.
    kOutOfRange,
    kError,  // Anything else; `error` says what (the client retries on its own).
  };
  Status status = Status::kOk;
  int32_t partition = -1;
  int64_t offset = -1;
  int64_t timestamp_ms = -1;    // When produced (or appended), -1 if unknown.
  const char* value = nullptr;  // nullptr for a message without a value (a tombstone).
  size_t size = 0;
  // Set when the message carries a `ce_specversion` header (CloudEvents binary content mode):
  // then, and only then, `headers` holds all its headers.
  bool binary_mode = false;
  std::span<const Header> headers;
  std::string_view error;
};

// Messages of the partitions routed to this queue. Used by one thread at a time.
class MessageQueue {
 public:
  virtual ~MessageQueue() = default;
  // From now on one byte is written to `fd` whenever the queue goes from empty to non-empty
  // (-1: never again). The consumer drains until Poll returns nothing, then waits on `fd`.
  virtual void NotifyOn(int fd) = 0;
  // Up to `max` messages, without waiting. They stay valid until Release or the next Poll.
  virtual std::span<const Message> Poll(size_t max) = 0;
  // Gives the last batch back (its memory may pin the client's fetch buffers): call when done
  // with it, before waiting.
  virtual void Release() {}
};

struct AssignedPartition {
  int32_t partition = -1;
  int64_t start_offset = kOffsetBeginning;  // Set by GroupListener::OnAssign.
};

// Told about rebalances, on the thread that calls PartitionSource::Poll (or Close).
class GroupListener {
 public:
  virtual ~GroupListener() = default;
  // The group gives us `partitions`: route each to a queue and set where reading starts.
  // Return false to take none of them (the group moves them on when our session expires).
  virtual bool OnAssign(std::vector<AssignedPartition>& partitions) = 0;
  // The group takes `partitions` away; when this returns they are released (nothing of them
  // is delivered any more). `lost`: the group may already have given them to another member.
  virtual void OnRevoke(const std::vector<int32_t>& partitions, bool lost) = 0;
};

// What the group's own poll surfaced besides rebalances.
struct PollEvent {
  enum class Kind { kNone, kOutOfRange, kError, kFatal };
  Kind kind = Kind::kNone;
  int32_t partition = -1;  // For kOutOfRange.
  std::string text;
};

// One member of a consumer group on one topic. Thread-safety: NewQueue, Subscribe, Poll and
// Close on one thread (the poll thread); Route inside OnAssign; Seek and LogBounds from any
// thread (a queue's consumer seeks its own partitions).
class PartitionSource {
 public:
  virtual ~PartitionSource() = default;
  virtual absl::StatusOr<std::unique_ptr<MessageQueue>> NewQueue() = 0;
  // Messages of `partition` go to `queue` (one made by this source). Call from OnAssign.
  virtual void Route(int32_t partition, MessageQueue* queue) = 0;
  virtual absl::Status Subscribe(GroupListener* listener) = 0;
  // Serves rebalances (the listener runs inside) and returns what else happened, waiting up
  // to `timeout` for something.
  virtual PollEvent Poll(absl::Duration timeout) = 0;
  // Leaves the group: everything assigned is revoked through the listener first.
  virtual absl::Status Close() = 0;
  // Moves the partition's read position; messages fetched before it are not delivered.
  virtual absl::Status Seek(int32_t partition, int64_t offset) = 0;
  // The partition's first offset and the offset after its last message.
  virtual absl::Status LogBounds(int32_t partition, int64_t* low, int64_t* high) = 0;
  // The partition's log end as last seen by the client (no broker round trip), -1 if unknown.
  // Thread-safe: the lag gauge reads it on the metrics thread.
  virtual int64_t CachedLogEnd(int32_t partition) const = 0;
  // Partitions currently assigned to this member. Thread-safe.
  virtual int AssignedCount() const = 0;
};

}  // namespace meterd::kafka
