#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <librdkafka/rdkafka.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace meterd::kafka {

// librdkafka properties in the order they are applied (a later one overrides an earlier one).
using Properties = std::vector<std::pair<std::string, std::string>>;

// Parses "key=value" (from --kafka-property) into a pair; InvalidArgument names the bad text.
absl::StatusOr<std::pair<std::string, std::string>> ParseProperty(const std::string& text);

// Builds an rd_kafka_conf_t from properties; the caller owns the result. InvalidArgument names
// the property librdkafka refused.
absl::StatusOr<rd_kafka_conf_t*> BuildConf(const Properties& properties);

struct HandleDeleter {
  void operator()(rd_kafka_t* handle) const { rd_kafka_destroy(handle); }
};
// An owned client handle: destroyed (rd_kafka_destroy) when it goes out of scope.
using Handle = std::unique_ptr<rd_kafka_t, HandleDeleter>;

// Creates a producer or consumer from `properties`. `customize`, if set, runs on the conf
// before the client is created (callbacks, opaque). InvalidArgument names what was refused.
absl::StatusOr<Handle> NewClient(rd_kafka_type_t type, const Properties& properties,
                                 const std::function<void(rd_kafka_conf_t*)>& customize = {});

// The topic's partition count. Unavailable ("cannot reach Kafka at <brokers>") when the
// cluster does not answer within `timeout`; NotFound when the topic does not exist.
absl::StatusOr<int> PartitionCount(rd_kafka_t* client, const std::string& brokers,
                                   const std::string& topic, absl::Duration timeout);

}  // namespace meterd::kafka
