#pragma once

#include <string>
#include <utility>
#include <vector>

#include <librdkafka/rdkafka.h>

#include "absl/status/statusor.h"

namespace meterd::ingest {

using KafkaProperties = std::vector<std::pair<std::string, std::string>>;

// Parses "key=value" (from --kafka-property) into a pair; InvalidArgument names the bad text.
absl::StatusOr<std::pair<std::string, std::string>> ParseKafkaProperty(const std::string& text);

// Builds an rd_kafka_conf_t from properties; the caller owns the result. InvalidArgument names
// the property librdkafka refused.
absl::StatusOr<rd_kafka_conf_t*> BuildKafkaConf(const KafkaProperties& properties);

}  // namespace meterd::ingest
