#pragma once

#include <spdlog/spdlog.h>

#include "absl/strings/string_view.h"

#ifndef ABSL_USES_STD_STRING_VIEW
// Debian's Abseil has its own string_view (status messages are one); let fmt print it.
template <>
struct fmt::formatter<absl::string_view> : fmt::formatter<fmt::string_view> {
  template <typename Context>
  auto format(absl::string_view text, Context& ctx) const {
    return fmt::formatter<fmt::string_view>::format(fmt::string_view(text.data(), text.size()),
                                                    ctx);
  }
};
#endif

namespace meterd {

// One line per event, to stderr, with a UTC timestamp and level: what an SRE greps.
// Level from METERD_LOG_LEVEL (trace, debug, info, warn, error); default info.
void InitLogging();

}  // namespace meterd

#define LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)
#define LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
