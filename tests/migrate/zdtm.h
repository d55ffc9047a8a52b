#pragma once
// Helpers for the migration tests (CRIU's zdtm shape). A test program sets up state, calls
// zdtm::ready(), waits in zdtm::waitGo() (it is checkpointed there, the original killed, the
// checkpoint resumed), then verifies its state and ends with zdtm::finish(): it prints PASS and
// exits 0, or prints one line per failed check and exits 1; 77 skips.
//
// Usage: PROGRAM DIR. DIR/ready appears once the state is set up; the harness (run.py) creates
// DIR/go once the process may go on.

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <string>

namespace zdtm {

inline int failures = 0;
inline std::string dir;

inline void init(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    exit(2);
  }
  dir = argv[1];
}

inline std::string path(const char* name) { return dir + "/" + name; }

// Tells the harness that the state is set up.
inline void ready() {
  std::string tmp = path("ready.tmp");
  FILE* f = fopen(tmp.c_str(), "w");
  fprintf(f, "%d\n", getpid());
  fclose(f);
  rename(tmp.c_str(), path("ready").c_str());
}

// Polls DIR/go every millisecond (a call the checkpoint may interrupt: nanosleep is restarted or
// fails with EINTR, both fine here). Exits 1 after 120 s.
inline void waitGo() {
  std::string go = path("go");
  for (int i = 0; i < 120000; ++i) {
    if (access(go.c_str(), F_OK) == 0) {
      return;
    }
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
  }
  printf("no go after 120 s\n");
  exit(1);
}

inline int finish() {
  if (failures == 0) {
    printf("PASS\n");
    fflush(stdout);
    return 0;
  }
  printf("FAIL: %d checks\n", failures);
  fflush(stdout);
  return 1;
}

}  // namespace zdtm

#define CHECK(cond)                                                                     \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      printf("%s:%d: check failed: %s (errno %d)\n", __FILE__, __LINE__, #cond, errno); \
      ++zdtm::failures;                                                                 \
    }                                                                                   \
  } while (0)

#define CHECK_EQ(a, b)                                                                         \
  do {                                                                                         \
    long long a_ = (long long)(a), b_ = (long long)(b);                                        \
    if (a_ != b_) {                                                                            \
      printf("%s:%d: check failed: %s == %s (%lld != %lld)\n", __FILE__, __LINE__, #a, #b, a_, \
             b_);                                                                              \
      ++zdtm::failures;                                                                        \
    }                                                                                          \
  } while (0)
