#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace meterd::event {

// CloudEvents Kafka protocol binding, binary content mode: the attributes travel as message
// headers named ce_<attribute> and the value is the event's `data`. What kafkajs with the
// CloudEvents SDK, and several official SDKs, send by default.
//
// True if `headers` (name, value) carry a binary-mode event (a ce_specversion header); then
// `out` is the same event in structured mode, which the EventParser reads like any other, so
// both modes are validated by one parser. Header values are JSON-escaped; `data` is copied
// only if it is exactly one JSON object (anything else is embedded as a string, which the
// parser refuses), so the value cannot add attributes. A `content-type` of
// application/cloudevents* means structured mode: false.
bool StructuredFromBinary(const std::vector<std::pair<std::string_view, std::string_view>>& headers,
                          std::string_view data, std::string* out);

}  // namespace meterd::event
