#include "lib/common/logging.h"

#include <cstdlib>
#include <string>

#include <spdlog/sinks/stdout_sinks.h>

namespace meterd {

void InitLogging() {
  auto logger = spdlog::stderr_logger_mt("meterd");
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%eZ %^%l%$ %v", spdlog::pattern_time_type::utc);
  const char* level = std::getenv("METERD_LOG_LEVEL");
  logger->set_level(level ? spdlog::level::from_str(level) : spdlog::level::info);
  spdlog::set_default_logger(std::move(logger));
}

}  // namespace meterd
