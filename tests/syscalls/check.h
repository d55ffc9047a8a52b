#pragma once
// Helpers for the syscall conformance programs. Each program is plain C++: it prints one line per
// failed check and exits 0 on success, 77 to skip, 1 on failure. No threads; only the fork_*
// programs fork (family.h). Files go into a fresh directory under $TEST_TMPDIR or /tmp.

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <filesystem>
#include <string>

namespace conf {

inline int failures = 0;

inline const char* errnoName(int e) {
  const char* n = strerrorname_np(e);
  return n ? n : "?";
}

}  // namespace conf

// CHECK(cond): records a failure with the errno at that moment.
#define CHECK(cond)                                                                           \
  do {                                                                                        \
    int checkErrno_ = errno;                                                                  \
    if (!(cond)) {                                                                            \
      printf("%s:%d: check failed: %s (errno %s)\n", __FILE__, __LINE__, #cond,               \
             conf::errnoName(checkErrno_));                                                   \
      ++conf::failures;                                                                       \
    }                                                                                         \
  } while (0)

// CHECK_FAILS(expr, err): expr returns -1 (or MAP_FAILED) with errno `err`.
#define CHECK_FAILS(expr, err)                                                                \
  do {                                                                                        \
    errno = 0;                                                                                \
    long checkRet_ = (long)(expr);                                                            \
    int checkErrno_ = errno;                                                                  \
    if (checkRet_ != -1 || checkErrno_ != (err)) {                                            \
      printf("%s:%d: %s: expected -1/%s, got %ld/%s\n", __FILE__, __LINE__, #expr,            \
             conf::errnoName(err), checkRet_, conf::errnoName(checkErrno_));                  \
      ++conf::failures;                                                                       \
    }                                                                                         \
  } while (0)

namespace conf {

// A fresh directory for this program's files, removed by finish().
inline std::string& tmpDirStorage() {
  static std::string dir;
  return dir;
}

inline const std::string& tmpDir() {
  std::string& dir = tmpDirStorage();
  if (dir.empty()) {
    const char* base = getenv("TEST_TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/umosix-sc-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      printf("mkdtemp %s: %s\n", tmpl.c_str(), strerror(errno));
      exit(1);
    }
    dir = tmpl;
  }
  return dir;
}

inline std::string tmpPath(const char* name) { return tmpDir() + "/" + name; }

// Removes the directory and returns the exit status.
inline int finish() {
  if (!tmpDirStorage().empty()) {
    std::error_code ec;
    std::filesystem::remove_all(tmpDirStorage(), ec);
  }
  if (failures > 0) {
    printf("%d check(s) failed\n", failures);
    return 1;
  }
  return 0;
}

}  // namespace conf
