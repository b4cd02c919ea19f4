#pragma once

#include <functional>
#include <memory>
#include <string>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "absl/status/statusor.h"
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

 private:
  DevBroker() = default;
  kafka::Handle handle_;  // Outlives the cluster it hosts.
  rd_kafka_mock_cluster_t* cluster_ = nullptr;
  std::string bootstrap_;
};

}  // namespace meterd::devtools
