#pragma once
// Logging for every umosix process: spdlog, one logger named after the program, to stderr by
// default. Levels come from the UMOSIX_LOG environment variable ("debug", "info", "warn",
// "error", "off"; default "warn" for tools, "info" for daemons).

#include <spdlog/spdlog.h>

namespace mos {

// Sets up the default spdlog logger named `program` with a "[program pid] level: msg" pattern.
// `defaultLevel` applies when UMOSIX_LOG is unset. Call once at the top of main().
void initLogging(const char* program, spdlog::level::level_enum defaultLevel);

}  // namespace mos
