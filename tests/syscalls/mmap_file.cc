// mmap(2) of files (private, read-only and copy-on-write, at an offset) and of anonymous memory,
// mprotect, mremap, madvise, mincore, msync, munmap, brk.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include <vector>

#include "check.h"

int main() {
  long page = sysconf(_SC_PAGESIZE);
  std::string path = conf::tmpPath("mapped");
  std::vector<unsigned char> bytes(3 * page + 100);
  for (size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<unsigned char>(i % 251);
  }
  int fd = open(path.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0600);
  CHECK(fd >= 0);
  CHECK(write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  close(fd);

  fd = open(path.c_str(), O_RDONLY);
  CHECK(fd >= 0);
  auto* m = static_cast<unsigned char*>(mmap(nullptr, bytes.size(), PROT_READ, MAP_PRIVATE, fd, 0));
  CHECK(m != MAP_FAILED);
  if (m != MAP_FAILED) {
    CHECK(memcmp(m, bytes.data(), bytes.size()) == 0);
    // The tail of the last page reads as zeros.
    CHECK(m[bytes.size()] == 0 && m[4 * page - 1] == 0);
    CHECK(munmap(m, bytes.size()) == 0);
  }
  auto* off =
      static_cast<unsigned char*>(mmap(nullptr, page, PROT_READ, MAP_PRIVATE, fd, 2 * page));
  CHECK(off != MAP_FAILED && memcmp(off, bytes.data() + 2 * page, page) == 0);
  munmap(off, page);
  CHECK_FAILS(mmap(nullptr, page, PROT_READ, MAP_PRIVATE, fd, 1), EINVAL);
  CHECK_FAILS(mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), EACCES);
  CHECK_FAILS(mmap(nullptr, page, PROT_READ, MAP_PRIVATE, 999, 0), EBADF);
  close(fd);

  // Copy-on-write: private writes never reach the file.
  fd = open(path.c_str(), O_RDWR);
  auto* cow =
      static_cast<unsigned char*>(mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
  CHECK(cow != MAP_FAILED);
  if (cow != MAP_FAILED) {
    cow[0] = 0xAA;
    unsigned char first = 0;
    CHECK(pread(fd, &first, 1, 0) == 1 && first == bytes[0]);
    CHECK(msync(cow, page, MS_SYNC) == 0);
    munmap(cow, page);
  }
  close(fd);

  // Anonymous memory.
  auto* anon = static_cast<char*>(
      mmap(nullptr, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  CHECK(anon != MAP_FAILED);
  memset(anon, 'x', 4 * page);
  unsigned char resident[4];
  CHECK(mincore(anon, 4 * page, resident) == 0 && (resident[0] & 1));
  CHECK(madvise(anon, page, MADV_DONTNEED) == 0 && anon[0] == 0 && anon[page] == 'x');
  CHECK(mprotect(anon, page, PROT_READ) == 0);
  CHECK(anon[page - 1] == 0);
  CHECK(mprotect(anon, page, PROT_READ | PROT_WRITE) == 0);  // one mapping again, for mremap
  auto* grown = static_cast<char*>(mremap(anon, 4 * page, 8 * page, MREMAP_MAYMOVE));
  CHECK(grown != MAP_FAILED && grown[page] == 'x' && grown[4 * page] == 0);
  CHECK(munmap(grown, 8 * page) == 0);
  auto* shared = static_cast<int*>(
      mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  CHECK(shared != MAP_FAILED && shared[0] == 0);
  munmap(shared, page);

  void* brk0 = reinterpret_cast<void*>(syscall(SYS_brk, 0));
  void* brk1 = reinterpret_cast<void*>(syscall(SYS_brk, static_cast<char*>(brk0) + 64 * page));
  CHECK(brk1 == static_cast<char*>(brk0) + 64 * page);
  static_cast<char*>(brk0)[10] = 1;
  CHECK(syscall(SYS_brk, brk0) == reinterpret_cast<long>(brk0));
  return conf::finish();
}
