// fork_wait_loop N: times N rounds of fork(2) + _exit(2) in the child + waitpid(2) in the parent,
// one by one, and prints the median per round. Run natively it measures the kernel's process
// creation and reaping; under `mosrun -r 2` it measures a guest's fork, mirrored at home.

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "stats.h"

int main(int argc, char** argv) {
  long n = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 1000;
  if (n <= 0) {
    std::fprintf(stderr, "usage: fork_wait_loop [N > 0]\n");
    return 2;
  }
  std::vector<uint64_t> samples(size_t(n), 0);
  long warmup = std::min(n / 10, 20L);
  for (long i = -warmup; i < n; i++) {
    uint64_t t0 = mos::bench::nowNs();
    pid_t child = fork();
    if (child < 0) {
      std::fprintf(stderr, "fork_wait_loop: fork: %s\n", std::strerror(errno));
      return 1;
    }
    if (child == 0) {
      _exit(7);
    }
    int status = 0;
    pid_t r;
    do {
      r = waitpid(child, &status, 0);
    } while (r < 0 && errno == EINTR);
    if (r != child || !WIFEXITED(status) || WEXITSTATUS(status) != 7) {
      std::fprintf(stderr, "fork_wait_loop: waitpid(%d) = %d, status 0x%x (%s)\n", child, r, status,
                   std::strerror(errno));
      return 1;
    }
    if (i >= 0) {
      samples[size_t(i)] = mos::bench::nowNs() - t0;
    }
  }
  mos::bench::report("fork_wait", samples);
  return 0;
}
