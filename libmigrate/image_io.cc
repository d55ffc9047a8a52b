#include "image_io.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <capnp/serialize.h>
#include <kj/debug.h>

namespace mos::migrate {

void writeImageFile(kj::StringPtr path, capnp::MessageBuilder& message) {
  int fd;
  KJ_SYSCALL(fd = ::open(path.cStr(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600), path);
  kj::AutoCloseFd owner(fd);
  KJ_ON_SCOPE_FAILURE(::unlink(path.cStr()));
  KJ_SYSCALL(::fchmod(fd, 0600), path);
  capnp::writeMessageToFd(fd, message);
}

namespace {

// A FlatArrayMessageReader over a private read-only mapping of the file, which it owns.
class MappedImage final : public capnp::FlatArrayMessageReader {
 public:
  MappedImage(kj::ArrayPtr<const capnp::word> words, size_t bytes)
      : capnp::FlatArrayMessageReader(words, options()), base_(words.begin()), bytes_(bytes) {}
  ~MappedImage() noexcept(false) { ::munmap(const_cast<capnp::word*>(base_), bytes_); }

 private:
  static capnp::ReaderOptions options() {
    capnp::ReaderOptions o;
    o.traversalLimitInWords = kj::maxValue;
    o.nestingLimit = 64;
    return o;
  }
  const capnp::word* base_;
  size_t bytes_;
};

}  // namespace

kj::Own<capnp::MessageReader> readImageFile(kj::StringPtr path) {
  int fd;
  KJ_SYSCALL(fd = ::open(path.cStr(), O_RDONLY | O_CLOEXEC), path);
  kj::AutoCloseFd owner(fd);
  struct stat st;
  KJ_SYSCALL(::fstat(fd, &st), path);
  KJ_REQUIRE(st.st_size >= 8 && st.st_size % 8 == 0, "not a Cap'n Proto image file", path,
             st.st_size);
  void* p = ::mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) {
    KJ_FAIL_SYSCALL("mmap", errno, path);
  }
  auto words = kj::arrayPtr(reinterpret_cast<const capnp::word*>(p), st.st_size / 8);
  KJ_ON_SCOPE_FAILURE(::munmap(p, st.st_size));
  return kj::heap<MappedImage>(words, st.st_size);
}

}  // namespace mos::migrate
