#pragma once

// Usage events for meterd from C++: KafkaEmitter produces to meterd's topic with librdkafka
// (idempotent, acks=all, keyed by org); HttpEmitter posts batches to meterd's POST /v1/events
// over a plain POSIX socket (HTTP/1.1, keep-alive; no TLS: put it behind a local proxy or use
// Kafka). Dependencies: the C++ standard library, POSIX, and librdkafka for KafkaEmitter only.
// See proto/clients/README.md.
//
// Both: Emit() never blocks on the network and never throws; memory is bounded (a full queue
// drops the event: HttpEmitter drops its oldest, KafkaEmitter the new one, as librdkafka's
// queue cannot drop its oldest); every event gets a fresh random id, so a retry of the same
// event (same source and id) is counted once by meterd.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

struct rd_kafka_s;
struct rd_kafka_message_s;

namespace meterd::clients {

// One billable action.
struct Usage {
  std::string org{};                // The organization's UUID (the event's subject).
  std::string meter = "api_calls";  // The event's type: api_calls, data_exports, ...
  int64_t quantity = 1;
  std::string industry = "hs";  // hs, rest, auto, ret, edu or payroll.
};

// Counters of an emitter. accepted: acknowledged (Kafka has the event); rejected: refused by
// meterd (never retried); dropped: queue full; failed: given up after retries or at close;
// skipped: not emitted (invalid, or the emitter is closed); retries: extra attempts.
struct EmitterStats {
  int64_t emitted = 0;
  int64_t accepted = 0;
  int64_t rejected = 0;
  int64_t dropped = 0;
  int64_t failed = 0;
  int64_t skipped = 0;
  int64_t retries = 0;
};

// A random UUID (version 4), as the event id.
std::string NewEventId();
// The CloudEvent (structured JSON) for `usage`, stamped `at`.
std::string UsageEventJson(const Usage& usage, std::string_view source, std::string_view id,
                           std::chrono::system_clock::time_point at);

// Produces one event per message. Thread-safe (librdkafka's producer is).
class KafkaEmitter {
 public:
  struct Options {
    std::string brokers{};
    std::string topic = "usage-events";
    std::string source = "cpp";
    // Extra librdkafka properties (e.g. security.protocol). enable.idempotence and acks are
    // always true and all.
    std::vector<std::pair<std::string, std::string>> properties{};
  };

  // nullptr, with the reason in `error`, if the producer cannot be configured.
  static std::unique_ptr<KafkaEmitter> Create(const Options& options, std::string* error);
  ~KafkaEmitter();  // Waits up to 10 s for what is still queued.
  KafkaEmitter(const KafkaEmitter&) = delete;
  KafkaEmitter& operator=(const KafkaEmitter&) = delete;

  // Queues the event in librdkafka; false if it was not (invalid, or librdkafka's queue full:
  // counted as dropped).
  bool Emit(const Usage& usage);
  // Serves delivery reports; Emit does it too.
  void Poll();
  // Waits until every queued event is delivered or failed; true if none is left.
  bool Flush(std::chrono::milliseconds timeout);
  EmitterStats Stats() const;

 private:
  explicit KafkaEmitter(Options options) : options_(std::move(options)) {}
  static void OnDelivery(rd_kafka_s* producer, const rd_kafka_message_s* message, void* opaque);

  const Options options_;
  rd_kafka_s* producer_ = nullptr;
  mutable std::mutex mu_;
  EmitterStats stats_;
};

// Batches events in a bounded queue; one thread posts them to meterd, retrying 503, 429 and
// network errors with exponential backoff and Retry-After. Thread-safe.
class HttpEmitter {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    int port = 8080;
    std::string path = "/v1/events";
    std::string api_key{};  // An org key with the ingest scope, or an admin key.
    std::string source = "cpp";
    size_t batch_size = 100;  // At most 1000 (meterd's limit per request).
    std::chrono::milliseconds flush_interval{200};
    size_t max_queue = 10000;
    int max_attempts = 8;  // Per batch.
    std::chrono::milliseconds min_backoff{100};
    std::chrono::milliseconds max_backoff{5000};
    std::chrono::milliseconds io_timeout{15000};  // Connect, send, and wait for the answer.
  };

  static std::unique_ptr<HttpEmitter> Create(const Options& options, std::string* error);
  ~HttpEmitter();  // Close(0): what is unsent is dropped.
  HttpEmitter(const HttpEmitter&) = delete;
  HttpEmitter& operator=(const HttpEmitter&) = delete;

  // Queues one event; false if skipped (invalid, or closed). A full queue drops its oldest.
  bool Emit(const Usage& usage);
  // Sends everything queued; true once nothing is queued or in flight.
  bool Flush(std::chrono::milliseconds timeout);
  // Stops taking events, flushes for up to `timeout`, then gives up on the rest (failed) and
  // stops the sender thread.
  EmitterStats Close(std::chrono::milliseconds timeout);
  EmitterStats Stats() const;

 private:
  struct Answer {
    int status = 0;  // 0: network error or timeout.
    std::chrono::milliseconds retry_after{0};
    std::string body;
    std::string error;
  };

  explicit HttpEmitter(Options options) : options_(std::move(options)) {}
  void Run();
  // One batch with retries; updates the counters.
  void SendBatch(const std::vector<std::string>& events);
  Answer Post(const std::string& body);
  bool Connect(std::string* error);
  void Disconnect();
  bool Stopping() const;

  const Options options_;
  int fd_ = -1;  // Touched by the sender thread only.
  std::string read_buffer_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::string> queue_;  // Event JSON texts; at most options_.max_queue.
  std::chrono::steady_clock::time_point first_queued_at_;
  size_t in_flight_ = 0;
  int flushes_ = 0;
  bool closed_ = false;
  std::atomic<bool> stop_{false};  // Close's deadline passed: retries give up, sender exits.
  EmitterStats stats_;
  std::string last_error_;
  std::thread sender_;
};

}  // namespace meterd::clients
