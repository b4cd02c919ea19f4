#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/kafka/client.h"

namespace meterd::kafka {

// A producer that counts its delivery reports. One thread uses it at a time (reports are
// served on the calling thread, inside Send and Flush).
class Producer {
 public:
  static constexpr int32_t kAnyPartition = RD_KAFKA_PARTITION_UA;  // By key (librdkafka's hash).

  // `properties` must name bootstrap.servers; they apply after linger.ms=5.
  static absl::StatusOr<std::unique_ptr<Producer>> Create(const Properties& properties);

  // Queues one message (copied). Waits, serving delivery reports, while librdkafka's local
  // queue is full; fails on any other error.
  absl::Status Send(const std::string& topic, int32_t partition, std::string_view key,
                    std::string_view value,
                    const std::vector<std::pair<std::string, std::string>>& headers = {});
  // Waits up to `timeout` for every queued message's report. Unavailable if any delivery
  // failed or was not confirmed in time, with the first error.
  absl::Status Flush(absl::Duration timeout);

  int64_t delivered() const { return delivered_; }
  rd_kafka_t* handle() const { return handle_.get(); }

 private:
  Producer() = default;
  static void OnDelivery(rd_kafka_t*, const rd_kafka_message_t* message, void* opaque);

  Handle handle_;
  int64_t delivered_ = 0;
  int64_t failed_ = 0;
  std::string first_error_;
};

}  // namespace meterd::kafka
