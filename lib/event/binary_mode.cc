#include "lib/event/binary_mode.h"

#include "absl/strings/str_format.h"
#include "lib/common/json.h"

namespace meterd::event {
namespace {

// True if `data` is exactly one JSON object and nothing after it (whitespace aside): a value
// like `{...},"subject":"x"` must not add attributes the headers did not give.
bool IsOneObject(std::string_view data) {
  size_t i = 0;
  auto skip_space = [&] {
    while (i < data.size() &&
           (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r')) {
      ++i;
    }
  };
  skip_space();
  if (i == data.size() || data[i] != '{') return false;
  int depth = 0;
  bool in_string = false;
  for (; i < data.size(); ++i) {
    const char c = data[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // The escaped character, whatever it is.
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      if (--depth == 0) {
        ++i;
        break;
      }
    }
  }
  if (depth != 0) return false;
  skip_space();
  return i == data.size();
}

}  // namespace

bool StructuredFromBinary(const std::vector<std::pair<std::string_view, std::string_view>>& headers,
                          std::string_view data, std::string* out) {
  constexpr std::string_view kPrefix = "ce_";
  bool binary = false;
  for (const auto& [name, value] : headers) {
    if (name == "ce_specversion") binary = true;
    // The binding: this content type means structured mode, whatever else the headers say.
    if (name == "content-type" && value.substr(0, 23) == "application/cloudevents") return false;
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
  if (IsOneObject(data)) {
    out->append(data);
  } else {
    // Not one object: embedded as a string, so the parser refuses it (data must be an object)
    // and the stored row shows exactly what came.
    AppendJsonString(out, data);
  }
  out->push_back('}');
  return true;
}

}  // namespace meterd::event
