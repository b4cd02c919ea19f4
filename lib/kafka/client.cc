#include "lib/kafka/client.h"

#include "absl/strings/str_cat.h"

namespace meterd::kafka {

absl::StatusOr<std::pair<std::string, std::string>> ParseProperty(const std::string& text) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kafka-property expects key=value, got '", text, "'"));
  }
  return std::make_pair(text.substr(0, eq), text.substr(eq + 1));
}

absl::StatusOr<rd_kafka_conf_t*> BuildConf(const Properties& properties) {
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  char error[512];
  for (const auto& [key, value] : properties) {
    if (rd_kafka_conf_set(conf, key.c_str(), value.c_str(), error, sizeof(error)) !=
        RD_KAFKA_CONF_OK) {
      rd_kafka_conf_destroy(conf);
      return absl::InvalidArgumentError(
          absl::StrCat("Kafka property ", key, "=", value, ": ", error));
    }
  }
  return conf;
}

absl::StatusOr<Handle> NewClient(rd_kafka_type_t type, const Properties& properties,
                                 const std::function<void(rd_kafka_conf_t*)>& customize) {
  absl::StatusOr<rd_kafka_conf_t*> conf = BuildConf(properties);
  if (!conf.ok()) return conf.status();
  if (customize) customize(*conf);
  char error[512];
  rd_kafka_t* handle = rd_kafka_new(type, *conf, error, sizeof(error));
  if (handle == nullptr) {
    rd_kafka_conf_destroy(*conf);  // rd_kafka_new owns the conf only when it succeeds.
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot create Kafka ", type == RD_KAFKA_PRODUCER ? "producer" : "consumer", ": ", error));
  }
  return Handle(handle);
}

absl::StatusOr<int> PartitionCount(rd_kafka_t* client, const std::string& brokers,
                                   const std::string& topic, absl::Duration timeout) {
  rd_kafka_topic_t* handle = rd_kafka_topic_new(client, topic.c_str(), nullptr);
  const rd_kafka_metadata_t* metadata = nullptr;
  const rd_kafka_resp_err_t err = rd_kafka_metadata(
      client, 0, handle, &metadata, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  rd_kafka_topic_destroy(handle);
  if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
    return absl::UnavailableError(
        absl::StrCat("cannot reach Kafka at ", brokers, ": ", rd_kafka_err2str(err)));
  }
  absl::StatusOr<int> result;
  if (metadata->topic_cnt != 1 || metadata->topics[0].err != RD_KAFKA_RESP_ERR_NO_ERROR ||
      metadata->topics[0].partition_cnt == 0) {
    result = absl::NotFoundError(absl::StrCat(
        "Kafka topic '", topic, "' not found at ", brokers, ": ",
        metadata->topic_cnt == 1 ? rd_kafka_err2str(metadata->topics[0].err) : "no metadata"));
  } else {
    result = metadata->topics[0].partition_cnt;
  }
  rd_kafka_metadata_destroy(metadata);
  return result;
}

}  // namespace meterd::kafka
