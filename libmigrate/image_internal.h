#pragma once
// Small helpers shared by captureImage() and restoreImage(). Internal to libmigrate.

#include <sys/stat.h>
#include <sys/types.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "image.capnp.h"

namespace mos::migrate {

inline std::string procPath(pid_t pid, const char* what) {
  return "/proc/" + std::to_string(pid) + "/" + what;
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
