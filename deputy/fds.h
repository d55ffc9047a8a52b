#pragma once
// The deputy's own descriptors (DESIGN.md, "the hard parts"): the deputy runs inside the job's
// process, so its fd table is the job's. Every descriptor the deputy keeps (the job channel, its
// log) lives at the top of the table, close-on-exec, and is *reserved*: a forwarded call that
// names one sees EBADF, dup2 onto one moves ours elsewhere first, close_range skips them,
// /proc/self/fd listings hide them (executor.h).

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <vector>

namespace mos::deputy {

class ReservedFds {
 public:
  // Called after a reserved descriptor was duplicated to `newFd`; it must start using `newFd`
  // and close the old number (for example Channel::replaceFd).
  using OnMove = std::function<void(int oldFd, int newFd)>;

  // The highest number handed out: min(RLIMIT_NOFILE soft limit, 65536) - 1. The cap keeps the
  // kernel's fd table small when the limit is huge (containers set 2^20 and more).
  static int topFd();

  // Duplicates `fd` to the highest free number at or below topFd() (F_DUPFD_CLOEXEC, counting
  // down), closes `fd`, reserves the new number and returns it. Throws kj::Exception (FAILED)
  // when no number is free (EMFILE).
  int moveHigh(int fd, OnMove onMove = nullptr);

  // Reserves `fd` as it is (already high and close-on-exec).
  void add(int fd, OnMove onMove = nullptr);
  // Forgets `fd` (the deputy closed it).
  void remove(int fd);

  // True when `fd` (as the kernel reads an fd argument: the low 32 bits) is ours.
  bool contains(int fd) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return fds_.count(fd) != 0;
  }
  bool empty() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return fds_.empty();
  }
  // Ascending.
  std::vector<int> list() const;
  // Changes with every add, remove, move and relocation (the deputy republishes the list for
  // mps -d when it changed).
  uint64_t generation() const { return generation_.load(std::memory_order_relaxed); }

  // Moves reserved `fd` out of the way (the job wants its number): duplicates it to another high
  // number, tells its owner, and reserves the new number instead. Returns the new number.
  // Throws kj::Exception (FAILED) on EMFILE.
  int relocate(int fd);

  // Every method locks this: deputy threads (one per guest thread) share the set. A fork holds
  // it across fork(2), so the child never inherits it locked by a thread it does not have.
  std::mutex& mutex() const { return mutex_; }

 private:
  // The highest free number at or below topFd(), a close-on-exec duplicate of `fd`.
  static int dupHigh(int fd);

  mutable std::mutex mutex_;
  std::map<int, OnMove> fds_;
  std::atomic<uint64_t> generation_{0};
};

}  // namespace mos::deputy
