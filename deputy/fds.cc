#include "fds.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>

#include <kj/debug.h>

namespace mos::deputy {

namespace {
constexpr rlim_t FD_CAP = 65536;
}  // namespace

int ReservedFds::topFd() {
  struct rlimit limit;
  rlim_t soft = 1024;
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    soft = limit.rlim_cur;
  }
  if (soft == RLIM_INFINITY || soft > FD_CAP) {
    soft = FD_CAP;
  }
  return soft > 4 ? static_cast<int>(soft) - 1 : 3;
}

int ReservedFds::dupHigh(int fd) {
  // F_DUPFD_CLOEXEC returns the lowest free number >= its argument, so trying from the top down
  // finds the highest free one; the job's own descriptors are normally all far below.
  for (int at = topFd(); at >= 3; at--) {
    int got = fcntl(fd, F_DUPFD_CLOEXEC, at);
    if (got >= 0) {
      return got;
    }
    if (errno != EMFILE && errno != EINVAL) {
      KJ_FAIL_SYSCALL("fcntl(F_DUPFD_CLOEXEC)", errno, fd, at);
    }
  }
  KJ_FAIL_SYSCALL("fcntl(F_DUPFD_CLOEXEC)", EMFILE, fd);
}

int ReservedFds::moveHigh(int fd, OnMove onMove) {
  std::lock_guard<std::mutex> lock(mutex_);
  int high = dupHigh(fd);
  close(fd);
  fds_[high] = kj::mv(onMove);
  generation_++;
  return high;
}

void ReservedFds::add(int fd, OnMove onMove) {
  std::lock_guard<std::mutex> lock(mutex_);
  fds_[fd] = kj::mv(onMove);
  generation_++;
}

void ReservedFds::remove(int fd) {
  std::lock_guard<std::mutex> lock(mutex_);
  fds_.erase(fd);
  generation_++;
}

std::vector<int> ReservedFds::list() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int> result;
  for (auto& entry : fds_) {
    result.push_back(entry.first);
  }
  return result;
}

int ReservedFds::relocate(int fd) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = fds_.find(fd);
  KJ_REQUIRE(it != fds_.end(), "not a reserved descriptor", fd);
  int high = dupHigh(fd);
  OnMove onMove = kj::mv(it->second);
  fds_.erase(it);
  if (onMove) {
    onMove(fd, high);
  } else {
    close(fd);
  }
  fds_[high] = kj::mv(onMove);
  generation_++;
  return high;
}

}  // namespace mos::deputy
