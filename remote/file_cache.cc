#include "file_cache.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

#include <fmt/format.h>
#include <kj/debug.h>
#include <kj/io.h>

#include "job_registry.h"

namespace mos::remote {

FileCache::FileCache(std::string dir, uint32_t homeNode)
    : dir_(std::move(dir)), homeNode_(homeNode) {
  makeDirectories(dir_);
}

std::string FileCache::keyOf(proto::FileRef::Reader ref) const {
  return fmt::format("n{}-{:x}-{}-{}-{}", homeNode_, ref.getDev(), ref.getIno(), ref.getSize(),
                     ref.getMtimeNs());
}

kj::Maybe<std::string> FileCache::lookup(proto::FileRef::Reader ref) {
  std::string path = dir_ + "/" + keyOf(ref);
  struct stat st;
  if (stat(path.c_str(), &st) < 0) {
    return nullptr;
  }
  if (static_cast<uint64_t>(st.st_size) != ref.getSize()) {
    unlink(path.c_str());
    return nullptr;
  }
  count(1, 0, 0);
  return path;
}

void FileCache::countInto(JobStats* stats) {
  stats_ = stats;
  count(std::exchange(hits_, 0), std::exchange(misses_, 0), std::exchange(bytes_, 0));
}

void FileCache::count(uint64_t hits, uint64_t misses, uint64_t bytes) {
  if (stats_ == nullptr) {
    hits_ += hits;
    misses_ += misses;
    bytes_ += bytes;
    return;
  }
  stats_->cacheHits.fetch_add(hits, std::memory_order_relaxed);
  stats_->cacheMisses.fetch_add(misses, std::memory_order_relaxed);
  stats_->cacheBytes.fetch_add(bytes, std::memory_order_relaxed);
}

std::string FileCache::store(proto::FileRef::Reader ref, const std::function<void(int fd)>& fill) {
  std::string path = dir_ + "/" + keyOf(ref);
  std::string temp = fmt::format("{}.tmp.{}.{}", path, getpid(), gettid());
  int fd;
  KJ_SYSCALL(fd = open(temp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644), temp);
  kj::AutoCloseFd owned(fd);
  try {
    fill(fd);
    struct stat st;
    KJ_SYSCALL(fstat(fd, &st));
    KJ_REQUIRE(static_cast<uint64_t>(st.st_size) == ref.getSize(),
               "fetched file size differs from its identity", st.st_size, ref.getSize());
    KJ_SYSCALL(fchmod(fd, 0555));
    KJ_SYSCALL(rename(temp.c_str(), path.c_str()));
  } catch (...) {
    unlink(temp.c_str());
    throw;
  }
  count(0, 1, ref.getSize());
  return path;
}

}  // namespace mos::remote
