#pragma once

#include <string>
#include <string_view>

namespace meterd::http {

// Builds the Prometheus text exposition format (no Debian C++ library does this).
class PrometheusText {
 public:
  // kind: "counter" or "gauge".
  void Add(std::string_view name, std::string_view kind, std::string_view help, double value);
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

}  // namespace meterd::http
