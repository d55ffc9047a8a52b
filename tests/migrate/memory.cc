// Heap, stack, brk, anonymous mappings of every protection, shared anonymous memory and a
// private file mapping with a written page survive a checkpoint; pages never touched read as
// zero afterwards (they are not in the image).
#include <fcntl.h>
#include <sys/mman.h>

#include <cstdint>
#include <vector>

#include "zdtm.h"

constexpr size_t PAGE = 4096;

static uint8_t valueAt(uint64_t seed, size_t i) {
  return static_cast<uint8_t>((seed * 131 + i * 7) >> 1);
}

static void fill(uint8_t* p, size_t n, uint64_t seed) {
  for (size_t i = 0; i < n; ++i) {
    p[i] = valueAt(seed, i);
  }
}

static bool same(const uint8_t* p, size_t n, uint64_t seed) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != valueAt(seed, i)) {
      printf("seed %llu: byte %zu differs\n", (unsigned long long)seed, i);
      return false;
    }
  }
  return true;
}

static bool zero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != 0) {
      return false;
    }
  }
  return true;
}

__attribute__((noinline)) static int deep(int depth, uint64_t seed) {
  // 64 KiB of stack per level, 4 levels: the checkpoint happens at the bottom.
  volatile uint8_t frame[65536];
  fill(const_cast<uint8_t*>(frame), sizeof(frame), seed + depth);
  int result = 0;
  if (depth < 4) {
    result = deep(depth + 1, seed);
  } else {
    zdtm::ready();
    zdtm::waitGo();
  }
  if (!same(const_cast<uint8_t*>(frame), sizeof(frame), seed + depth)) {
    ++zdtm::failures;
  }
  return result;
}

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  // A 32 MiB heap block with every fourth page written.
  size_t heapSize = 32 << 20;
  uint8_t* heap = static_cast<uint8_t*>(malloc(heapSize));
  for (size_t off = 0; off < heapSize; off += 4 * PAGE) {
    fill(heap + off, PAGE, off);
  }
  // Small allocations through brk.
  std::vector<uint8_t*> small;
  for (int i = 0; i < 1000; ++i) {
    small.push_back(static_cast<uint8_t*>(malloc(100 + i)));
    fill(small.back(), 100 + i, 1000 + i);
  }
  void* brkBefore = sbrk(0);
  // Anonymous mappings: read-only and no-access ones hold data written before mprotect.
  auto* ro = static_cast<uint8_t*>(
      mmap(nullptr, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  fill(ro, 8 * PAGE, 7);
  mprotect(ro, 8 * PAGE, PROT_READ);
  auto* none = static_cast<uint8_t*>(
      mmap(nullptr, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  fill(none, 4 * PAGE, 8);
  mprotect(none, 4 * PAGE, PROT_NONE);
  auto* untouched = static_cast<uint8_t*>(
      mmap(nullptr, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  untouched[10 * PAGE] = 0x5a;
  auto* shared = static_cast<uint8_t*>(
      mmap(nullptr, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  fill(shared, 4 * PAGE, 9);
  // A private mapping of a file, one page written (copy on write), the file left as it was.
  std::string filePath = zdtm::path("mapped.bin");
  int fd = open(filePath.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  std::vector<uint8_t> fileBytes(4 * PAGE);
  fill(fileBytes.data(), fileBytes.size(), 10);
  CHECK(write(fd, fileBytes.data(), fileBytes.size()) == (ssize_t)fileBytes.size());
  auto* fileMap =
      static_cast<uint8_t*>(mmap(nullptr, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
  close(fd);
  fill(fileMap + 2 * PAGE, PAGE, 11);

  CHECK(deep(0, 100) == 0);

  for (size_t off = 0; off < heapSize; off += PAGE) {
    if (off % (4 * PAGE) == 0) {
      CHECK(same(heap + off, PAGE, off));
    } else {
      CHECK(zero(heap + off, PAGE));
    }
  }
  for (int i = 0; i < 1000; ++i) {
    CHECK(same(small[i], 100 + i, 1000 + i));
  }
  CHECK(sbrk(0) == brkBefore);
  // The heap grows on from where it was.
  void* more = sbrk(1 << 20);
  CHECK(more == brkBefore);
  memset(more, 1, 1 << 20);
  CHECK(same(ro, 8 * PAGE, 7));
  mprotect(none, 4 * PAGE, PROT_READ);
  CHECK(same(none, 4 * PAGE, 8));
  CHECK(zero(untouched, 10 * PAGE));
  CHECK_EQ(untouched[10 * PAGE], 0x5a);
  CHECK(zero(untouched + 10 * PAGE + 1, 54 * PAGE - 1));
  CHECK(same(shared, 4 * PAGE, 9));
  CHECK(same(fileMap, 2 * PAGE, 10));
  CHECK(same(fileMap + 2 * PAGE, PAGE, 11));
  for (size_t i = 3 * PAGE; i < 4 * PAGE; ++i) {
    if (fileMap[i] != fileBytes[i]) {
      CHECK(fileMap[i] == fileBytes[i]);
      break;
    }
  }
  return zdtm::finish();
}
