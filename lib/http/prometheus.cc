#include "lib/http/prometheus.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace meterd::http {

void PrometheusText::Add(std::string_view name, std::string_view kind, std::string_view help,
                         double value) {
  const std::string n(name);
  absl::StrAppend(&text_, "# HELP ", n, " ", std::string(help), "\n# TYPE ", n, " ",
                  std::string(kind), "\n", n, " ", absl::StrFormat("%.17g", value), "\n");
}

}  // namespace meterd::http
