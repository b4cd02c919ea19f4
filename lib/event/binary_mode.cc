#include "lib/event/binary_mode.h"

#include "absl/strings/str_format.h"

namespace meterd::event {
namespace {

void AppendJsonString(std::string* out, std::string_view value) {
  out->push_back('"');
  for (char c : value) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(c);
    } else if (u < 0x20) {
      absl::StrAppendFormat(out, "\\u%04x", u);
    } else {
      out->push_back(c);
    }
  }
  out->push_back('"');
}

}  // namespace

bool StructuredFromBinary(const std::vector<std::pair<std::string_view, std::string_view>>& headers,
                          std::string_view data, std::string* out) {
  constexpr std::string_view kPrefix = "ce_";
  bool binary = false;
  for (const auto& [name, value] : headers) {
    if (name == "ce_specversion") binary = true;
  }
  if (!binary) return false;
  out->clear();
  out->push_back('{');
  for (const auto& [name, value] : headers) {
    if (name.substr(0, kPrefix.size()) != kPrefix || name.size() == kPrefix.size()) continue;
    // Attribute names are lowercase alphanumerics by the CloudEvents spec; anything else is not
    // an attribute and stays out of the JSON.
    const std::string_view attribute = name.substr(kPrefix.size());
    bool valid = true;
    for (char c : attribute) valid &= (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (!valid || attribute == "data") continue;
    if (out->size() > 1) out->push_back(',');
    AppendJsonString(out, attribute);
    out->push_back(':');
    AppendJsonString(out, value);
  }
  if (out->size() > 1) out->push_back(',');
  out->append("\"data\":");
  if (data.empty()) {
    out->append("null");
  } else {
    out->append(data);
  }
  out->push_back('}');
  return true;
}

}  // namespace meterd::event
