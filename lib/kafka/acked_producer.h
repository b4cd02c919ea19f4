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
  // Called once per message: OK when every in-sync replica has it, the error otherwise.
  using Done = std::function<void(absl::Status)>;

  // `properties` must name bootstrap.servers; they apply after the idempotence settings and
  // linger.ms=1, so an SRE can tune batching (but idempotence stays on: refused otherwise).
  static absl::StatusOr<std::unique_ptr<AckedProducer>> Create(const Properties& properties);
  // Close(10 s) unless closed before.
  ~AckedProducer();
  // Waits up to `timeout` for outstanding acknowledgements, then fails the rest (their
  // callbacks run with an error), then stops the poll thread: no callback runs after this
  // returns. Send must not be called during or after it.
  void Close(absl::Duration timeout);

  // Queues one message (copied), keyed (librdkafka's partitioner). If it cannot be queued
  // (local queue full: ResourceExhausted; anything else: Unavailable) `done` is called with
  // that error before Send returns.
  void Send(const std::string& topic, std::string_view key, std::string_view value, Done done);

  int64_t in_flight() const { return in_flight_.load(std::memory_order_relaxed); }

 private:
  AckedProducer() = default;
  static void OnDelivery(rd_kafka_t*, const rd_kafka_message_t* message, void* opaque);

  Handle handle_;
  std::atomic<bool> stopping_{false};
  bool closed_ = false;
  std::atomic<int64_t> in_flight_{0};
  std::thread poller_;
};

}  // namespace meterd::kafka
