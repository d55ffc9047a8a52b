#pragma once
// Small helpers shared by captureImage() and restoreImage(). Internal to libmigrate.

#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>

#include <kj/debug.h>
#include <kj/io.h>

#include "image.capnp.h"
#include "proc_maps.h"

namespace mos::migrate {

inline std::string procPath(pid_t pid, const char* what) {
  return "/proc/" + std::to_string(pid) + "/" + what;
}

// A "Key:\tvalue" line of a /proc status-like file, parsed with strtoull in `base`. Throws
// kj::Exception (FAILED) when the key is missing.
inline uint64_t procField(const std::string& text, const char* key, int base) {
  size_t at = text.find(key);
  KJ_REQUIRE(at != std::string::npos, "missing /proc field", key);
  return strtoull(text.c_str() + at + strlen(key), nullptr, base);
}

// A descriptor of our own for descriptor `fd` of process `pid`: the same open file
// (pidfd_open(2), pidfd_getfd(2); needs ptrace access to `pid`, kernel 5.6). Throws
// kj::Exception (FAILED) with the errno.
inline kj::AutoCloseFd takeFd(pid_t pid, int fd) {
  int pidfd;
  KJ_SYSCALL(pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)), pid);
  kj::AutoCloseFd pidfdOwner(pidfd);
  int local;
  KJ_SYSCALL(local = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, fd, 0)), pid, fd);
  return kj::AutoCloseFd(local);
}

// The signals whose disposition in process `pid` is not SIG_DFL: bit (n-1) for signal n, the
// SigIgn and SigCgt lines of /proc/PID/status (proc(5)) or'ed. Every other signal has SIG_DFL
// (with whatever flags a sigaction(SIG_DFL) left, which captureImage does not record; after an
// execve they are 0). Saves an injected rt_sigaction (about 0.1 ms here) per default signal.
// Throws kj::Exception (FAILED) if the file cannot be read or lacks the lines.
inline uint64_t nonDefaultSignals(pid_t pid) {
  std::string status = readProcFile(procPath(pid, "status"));
  return procField(status, "SigIgn:", 16) | procField(status, "SigCgt:", 16);
}

// XSAVE "software reserved" bytes 464..471 of the UABI buffer hold the xfeatures mask (XCR0)
// of the CPU that wrote it.
inline uint64_t xsaveFeatures(std::span<const uint8_t> xstate) {
  uint64_t v = 0;
  if (xstate.size() >= 472) {
    memcpy(&v, xstate.data() + 464, 8);
  }
  return v;
}

inline int64_t mtimeNs(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

inline void setFileRef(proto::FileRef::Builder ref, const std::string& path,
                       const struct stat& st) {
  ref.setPath(kj::arrayPtr(reinterpret_cast<const kj::byte*>(path.data()), path.size()));
  ref.setDev(st.st_dev);
  ref.setIno(st.st_ino);
  ref.setSize(st.st_size);
  ref.setMtimeNs(mtimeNs(st));
  ref.setMode(st.st_mode);
}

struct RestoreOptions;

// The child side of a restore on a node (restore(), restoreGuest()): PR_SET_PDEATHSIG, its own
// process group, default dispositions, an empty mask, the fds of options.fdMap (copied above
// `highFd` first) and no others unless options.keepAllFds, PTRACE_TRACEME, then execveat of the
// stub in `memfd`. `parent` is what getppid() must return (0 in another pid namespace).
// Only async-signal-safe calls: the caller may have threads. Never returns.
[[noreturn]] void execStubChild(int memfd, pid_t parent, const RestoreOptions& options, int highFd);

inline std::string pathOf(capnp::Data::Reader bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

}  // namespace mos::migrate
