#include "lib/devtools/dev_broker.h"

#include <librdkafka/rdkafka_mock.h>

#include "absl/strings/str_cat.h"

namespace meterd::devtools {

absl::StatusOr<std::unique_ptr<DevBroker>> DevBroker::Start(const std::string& topic,
                                                            int partitions) {
  if (partitions < 1) return absl::InvalidArgumentError("--partitions must be at least 1");
  std::unique_ptr<DevBroker> broker(new DevBroker());
  char error[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "log_level", "3", error, sizeof(error));
  broker->handle_ = rd_kafka_new(RD_KAFKA_PRODUCER, conf, error, sizeof(error));
  if (broker->handle_ == nullptr) {
    rd_kafka_conf_destroy(conf);
    return absl::InternalError(absl::StrCat("cannot create mock cluster handle: ", error));
  }
  broker->cluster_ = rd_kafka_mock_cluster_new(broker->handle_, 1);
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
  if (handle_ != nullptr) rd_kafka_destroy(handle_);
}

}  // namespace meterd::devtools
