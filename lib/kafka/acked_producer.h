#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/kafka/client.h"

namespace meterd::kafka {

// An idempotent producer (enable.idempotence=true, acks=all) that tells each sender when
// Kafka acknowledged its message: what HTTP ingest answers on. Thread-safe: any thread may
// Send; delivery callbacks run on the producer's own poll thread and must be quick.
class AckedProducer {
 public:
  // One message of a SendAll: both views need to live only until SendAll returns (librdkafka
  // copies them).
  struct Message {
    std::string_view key;
    std::string_view value;
  };
  // Called once per SendAll, when every message has an outcome: ok[i] is true when every
  // in-sync replica has messages[i].
  using AllDone = std::function<void(std::vector<bool> ok)>;

  // `properties` must name bootstrap.servers; they apply after the idempotence settings and
  // linger.ms=1, so an SRE can tune batching (but idempotence stays on: refused otherwise).
  static absl::StatusOr<std::unique_ptr<AckedProducer>> Create(const Properties& properties);
  // Close(10 s) unless closed before.
  ~AckedProducer();
  // Waits up to `timeout` for outstanding acknowledgements, then fails the rest (their
  // callbacks run with an error), then stops the poll thread: no callback runs after this
  // returns. SendAll must not be called during or after it.
  void Close(absl::Duration timeout);

  // Queues the messages (keyed: librdkafka's partitioner) and calls `done` once, on the
  // producer's poll thread when the last acknowledgement (or failure) arrives, or before
  // SendAll returns if every message is settled by then (a message that cannot be queued,
  // e.g. the local queue is full, counts as failed). One allocation per call, none per message.
  void SendAll(const std::string& topic, const std::vector<Message>& messages, AllDone done);

  int64_t in_flight() const { return in_flight_.load(std::memory_order_relaxed); }

 private:
  AckedProducer() = default;
  struct Batch;
  static void OnDelivery(rd_kafka_t*, const rd_kafka_message_t* message, void* opaque);

  Handle handle_;
  std::atomic<bool> stopping_{false};
  bool closed_ = false;
  std::atomic<int64_t> in_flight_{0};
  std::thread poller_;
};

}  // namespace meterd::kafka
