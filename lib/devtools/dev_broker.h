#pragma once

#include <functional>
#include <memory>
#include <string>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/kafka/client.h"

namespace meterd::devtools {

// librdkafka's mock cluster: a real Kafka protocol server on 127.0.0.1, in this process.
// Keeps ~5 MiB / 100k messages per partition (older ones are dropped), so big runs use many
// partitions or consume while producing.
class DevBroker {
 public:
  static absl::StatusOr<std::unique_ptr<DevBroker>> Start(const std::string& topic, int partitions);
  ~DevBroker();
  const std::string& bootstrap() const { return bootstrap_; }

  // Fault injection (the chaos driver): the broker refuses connections / accepts them again;
  // every request answered `rtt` late; the next `count` requests of Kafka protocol API
  // `api_key` (0 Produce, 1 Fetch, 12 Heartbeat, ...) fail with `error`.
  void SetDown(bool down);
  void SetRtt(absl::Duration rtt);
  void FailRequests(int16_t api_key, int count, rd_kafka_resp_err_t error);

 private:
  DevBroker() = default;
  kafka::Handle handle_;  // Outlives the cluster it hosts.
  rd_kafka_mock_cluster_t* cluster_ = nullptr;
  std::string bootstrap_;
};

}  // namespace meterd::devtools
