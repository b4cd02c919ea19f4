#include "lib/devtools/dev_broker.h"

#include <librdkafka/rdkafka_mock.h>

#include <vector>

#include "absl/strings/str_cat.h"

namespace meterd::devtools {

absl::StatusOr<std::unique_ptr<DevBroker>> DevBroker::Start(const std::string& topic,
                                                            int partitions) {
  if (partitions < 1) return absl::InvalidArgumentError("--partitions must be at least 1");
  std::unique_ptr<DevBroker> broker(new DevBroker());
  absl::StatusOr<kafka::Handle> handle = kafka::NewClient(RD_KAFKA_PRODUCER, {{"log_level", "3"}});
  if (!handle.ok()) return handle.status();
  broker->handle_ = std::move(*handle);
  broker->cluster_ = rd_kafka_mock_cluster_new(broker->handle_.get(), 1);
  if (broker->cluster_ == nullptr) return absl::InternalError("cannot start mock cluster");
  rd_kafka_resp_err_t err =
      rd_kafka_mock_topic_create(broker->cluster_, topic.c_str(), partitions, 1);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return absl::InternalError(absl::StrCat("cannot create topic: ", rd_kafka_err2str(err)));
  }
  broker->bootstrap_ = rd_kafka_mock_cluster_bootstraps(broker->cluster_);
  return broker;
}

DevBroker::~DevBroker() {
  if (cluster_ != nullptr) rd_kafka_mock_cluster_destroy(cluster_);
}

void DevBroker::SetDown(bool down) {
  if (down) {
    rd_kafka_mock_broker_set_down(cluster_, -1);
  } else {
    rd_kafka_mock_broker_set_up(cluster_, -1);
  }
}

void DevBroker::SetRtt(absl::Duration rtt) {
  rd_kafka_mock_broker_set_rtt(cluster_, -1, static_cast<int>(absl::ToInt64Milliseconds(rtt)));
}

void DevBroker::FailRequests(int16_t api_key, int count, rd_kafka_resp_err_t error) {
  const std::vector<rd_kafka_resp_err_t> errors(static_cast<size_t>(count), error);
  rd_kafka_mock_push_request_errors_array(cluster_, api_key, errors.size(), errors.data());
}

}  // namespace meterd::devtools
