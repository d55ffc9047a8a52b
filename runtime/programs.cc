#include "programs.h"

#include <limits.h>
#include <unistd.h>

#include <cstdlib>

#include <kj/debug.h>

namespace mos {

std::string programPath(const std::string& name) {
  std::string candidates[6];
  size_t count = 0;
  if (const char* libexec = std::getenv("UMOSIX_LIBEXEC")) {
    candidates[count++] = std::string(libexec) + "/" + name;
  }
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    self[n] = '\0';
    std::string dir(self);
    dir.resize(dir.rfind('/'));
    candidates[count++] = dir + "/" + name;
    for (const char* sibling : {"tools", "deputy", "remote", "libmigrate"}) {
      if (count < 6) {
        candidates[count++] = dir + "/../" + sibling + "/" + name;
      }
    }
  }
  for (size_t i = 0; i < count; i++) {
    if (access(candidates[i].c_str(), X_OK) == 0) {
      char resolved[PATH_MAX];
      if (realpath(candidates[i].c_str(), resolved) != nullptr) {
        return resolved;
      }
      return candidates[i];
    }
  }
  KJ_FAIL_REQUIRE("umosix program not found; set UMOSIX_LIBEXEC", name);
}

}  // namespace mos
