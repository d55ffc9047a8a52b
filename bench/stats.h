#pragma once
// Tiny helpers shared by the latency benchmarks: a monotonic clock in nanoseconds and order
// statistics of a sample.

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace mos::bench {

// CLOCK_MONOTONIC in nanoseconds (clock_gettime(2); the vDSO makes it a local call everywhere).
inline uint64_t nowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

// The q-quantile (0..1) of `samples` in nanoseconds; reorders `samples`. Empty input gives 0.
inline double quantileNs(std::vector<uint64_t>& samples, double q) {
  if (samples.empty()) {
    return 0;
  }
  size_t i = std::min(samples.size() - 1, size_t(q * double(samples.size())));
  std::nth_element(samples.begin(), samples.begin() + i, samples.end());
  return double(samples[i]);
}

// Prints "<name>: median_us=M p10_us=A p90_us=B n=N" on stdout; the harness parses median_us.
inline void report(const char* name, std::vector<uint64_t>& samples) {
  double p10 = quantileNs(samples, 0.10);
  double p90 = quantileNs(samples, 0.90);
  double median = quantileNs(samples, 0.50);
  std::printf("%s: median_us=%.3f p10_us=%.3f p90_us=%.3f n=%zu\n", name, median / 1000, p10 / 1000,
              p90 / 1000, samples.size());
  std::fflush(stdout);
}

}  // namespace mos::bench
