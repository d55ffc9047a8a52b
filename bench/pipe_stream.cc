// pipe_stream MIB [CHUNK_KIB]: the parent forks a child and writes MIB MiB into a pipe in
// CHUNK_KIB KiB writes (default 64); the child reads until EOF and reports the byte count back
// through a second pipe. Prints the throughput from the first write to the child's report, in
// MiB/s. Under `mosrun -r 2` both ends are guests on node 2.

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "stats.h"

namespace {

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "pipe_stream: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

// The child: reads fd until EOF, writes the byte count (uint64_t) to reply, exits.
[[noreturn]] void drain(int fd, int reply, size_t chunk) {
  std::vector<char> buf(chunk);
  uint64_t total = 0;
  while (true) {
    ssize_t r = read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) {
      continue;
    }
    if (r < 0) {
      fail("read");
    }
    if (r == 0) {
      break;
    }
    total += uint64_t(r);
  }
  if (write(reply, &total, sizeof total) != sizeof total) {
    fail("write reply");
  }
  _exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  long mib = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 256;
  long chunkKib = argc > 2 ? std::strtol(argv[2], nullptr, 10) : 64;
  if (mib <= 0 || chunkKib <= 0) {
    std::fprintf(stderr, "usage: pipe_stream [MIB > 0] [CHUNK_KIB > 0]\n");
    return 2;
  }
  size_t chunk = size_t(chunkKib) << 10;
  int data[2];
  int reply[2];
  if (pipe(data) != 0 || pipe(reply) != 0) {
    fail("pipe");
  }
  pid_t child = fork();
  if (child < 0) {
    fail("fork");
  }
  if (child == 0) {
    close(data[1]);
    close(reply[0]);
    drain(data[0], reply[1], chunk);
  }
  close(data[0]);
  close(reply[1]);
  std::vector<char> buf(chunk, 'p');
  uint64_t want = uint64_t(mib) << 20;
  uint64_t t0 = mos::bench::nowNs();
  for (uint64_t sent = 0; sent < want;) {
    ssize_t w = write(data[1], buf.data(), std::min<uint64_t>(chunk, want - sent));
    if (w < 0 && errno == EINTR) {
      continue;
    }
    if (w <= 0) {
      fail("write");
    }
    sent += uint64_t(w);
  }
  close(data[1]);
  uint64_t got = 0;
  if (read(reply[0], &got, sizeof got) != sizeof got) {
    fail("read reply");
  }
  double seconds = double(mos::bench::nowNs() - t0) / 1e9;
  int status = 0;
  if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "pipe_stream: the reader ended with status 0x%x\n", status);
    return 1;
  }
  if (got != want) {
    std::fprintf(stderr, "pipe_stream: the reader got %llu bytes of %llu\n",
                 (unsigned long long)got, (unsigned long long)want);
    return 1;
  }
  std::printf("pipe_stream: mib_per_s=%.1f mib=%ld chunk_kib=%ld seconds=%.3f\n",
              double(mib) / seconds, mib, chunkKib, seconds);
  return 0;
}
