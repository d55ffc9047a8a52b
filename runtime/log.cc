#include "log.h"

#include <unistd.h>

#include <cstdlib>
#include <string>

#include <spdlog/sinks/stdout_sinks.h>

namespace mos {

void initLogging(const char* program, spdlog::level::level_enum defaultLevel) {
  auto logger = spdlog::stderr_logger_mt(program);
  logger->set_pattern(std::string("[") + program + " %P] %l: %v");
  auto level = defaultLevel;
  if (const char* env = std::getenv("UMOSIX_LOG")) {
    level = spdlog::level::from_str(env);
  }
  logger->set_level(level);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(logger);
}

}  // namespace mos
