#include "lib/ingest/kafka_config.h"

#include "absl/strings/str_cat.h"

namespace meterd::ingest {

absl::StatusOr<std::pair<std::string, std::string>> ParseKafkaProperty(const std::string& text) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kafka-property expects key=value, got '", text, "'"));
  }
  return std::make_pair(text.substr(0, eq), text.substr(eq + 1));
}

absl::StatusOr<rd_kafka_conf_t*> BuildKafkaConf(const KafkaProperties& properties) {
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

}  // namespace meterd::ingest
