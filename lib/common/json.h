#pragma once

#include <string>
#include <string_view>

#include "absl/strings/str_format.h"

namespace meterd {

// Appends `text` as a JSON string, quotes included: `"` and `\` escaped, control bytes as
// \u00XX. Bytes >= 0x80 are copied as they are (the callers' text is UTF-8 or opaque).
inline void AppendJsonString(std::string* out, std::string_view text) {
  out->push_back('"');
  for (const char c : text) {
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

}  // namespace meterd
