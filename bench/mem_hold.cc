// mem_hold: a process holding M MiB of written heap, for bench/checkpoint.
//
//   mem_hold MIB DIR            fills MIB MiB with a pseudo-random pattern, creates DIR/ready
//                               (holding its pid),
//                               then waits for a line on stdin, checks every byte, prints
//                               `ok` and exits 0 (1 if a byte differs: a bad restore)
//   mem_hold MIB DIR --floor F  the floor: writes the same MIB MiB from its own memory to file F
//                               in 1 MiB writes, fsyncs, prints `floor_ms=T` and exits
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

uint64_t patternAt(size_t i) { return (i * 0x9e3779b97f4a7c15ULL) ^ (i >> 7); }

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: mem_hold MIB DIR [--floor FILE]\n");
    return 2;
  }
  size_t words = static_cast<size_t>(atol(argv[1])) << 17;  // 8-byte words in MIB MiB
  std::vector<uint64_t> heap(words);
  for (size_t i = 0; i < words; i++) {
    heap[i] = patternAt(i);
  }
  if (argc == 5 && strcmp(argv[3], "--floor") == 0) {
    auto start = std::chrono::steady_clock::now();
    int fd = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    const char* p = reinterpret_cast<const char*>(heap.data());
    size_t left = words * 8;
    while (left > 0) {
      ssize_t n = write(fd, p, left < (1 << 20) ? left : (1 << 20));
      if (n <= 0) {
        perror("write");
        return 1;
      }
      p += n;
      left -= n;
    }
    fsync(fd);
    close(fd);
    std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    printf("floor_ms=%.3f\n", took.count());
    return 0;
  }
  // DIR/ready holds this process's pid, written whole before it appears (rename).
  std::string ready = std::string(argv[2]) + "/ready";
  std::string tmp = ready + ".tmp";
  FILE* f = fopen(tmp.c_str(), "w");
  fprintf(f, "%d\n", getpid());
  fclose(f);
  rename(tmp.c_str(), ready.c_str());
  char line[16];
  if (fgets(line, sizeof(line), stdin) == nullptr) {
    return 1;
  }
  for (size_t i = 0; i < words; i++) {
    if (heap[i] != patternAt(i)) {
      printf("word %zu differs\n", i);
      return 1;
    }
  }
  printf("ok\n");
  return 0;
}
