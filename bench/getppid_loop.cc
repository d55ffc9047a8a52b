// getppid_loop N: times N raw getppid(2) calls, one by one, and prints the median per call.
// Run natively it measures a syscall; under `mosrun -r 2` it measures one forwarded syscall end
// to end (guest trap, supervisor, job channel, deputy, reply).

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "stats.h"

int main(int argc, char** argv) {
  long n = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 10000;
  if (n <= 0) {
    std::fprintf(stderr, "usage: getppid_loop [N > 0]\n");
    return 2;
  }
  // Warm-up: first calls pay for page faults, caches, lazy setup on either side.
  for (long i = 0; i < std::min(n, 200L); i++) {
    syscall(SYS_getppid);
  }
  std::vector<uint64_t> samples(size_t(n), 0);
  long ppid = 0;
  for (long i = 0; i < n; i++) {
    uint64_t t0 = mos::bench::nowNs();
    ppid = syscall(SYS_getppid);
    samples[size_t(i)] = mos::bench::nowNs() - t0;
  }
  if (ppid <= 0) {
    std::fprintf(stderr, "getppid_loop: getppid returned %ld\n", ppid);
    return 1;
  }
  mos::bench::report("getppid", samples);
  return 0;
}
