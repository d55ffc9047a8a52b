#include "seccomp_unotify.h"

#include <signal.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <kj/debug.h>

namespace mos::remote {

namespace {
// Room for the kernel's structures, which may outgrow our headers' (checked at construction).
constexpr size_t NOTIF_BUFFER = 512;
constexpr size_t RESP_BUFFER = 128;
}  // namespace

KernelUnotify::KernelUnotify(kj::AutoCloseFd listener) : listener_(kj::mv(listener)) {
  struct seccomp_notif_sizes sizes;
  KJ_SYSCALL(syscall(__NR_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes));
  notifSize_ = kj::max(sizes.seccomp_notif, sizeof(seccomp_notif));
  respSize_ = kj::max(sizes.seccomp_notif_resp, sizeof(seccomp_notif_resp));
  KJ_REQUIRE(notifSize_ <= NOTIF_BUFFER && respSize_ <= RESP_BUFFER,
             "the kernel's notification structures outgrew our buffers", notifSize_, respSize_);
}

int KernelUnotify::receive(seccomp_notif& notif) {
  // The structure must be zeroed before the call (EINVAL otherwise, since Linux 5.5).
  alignas(seccomp_notif) kj::byte buffer[NOTIF_BUFFER];
  memset(buffer, 0, notifSize_);
  if (ioctl(listener_.get(), SECCOMP_IOCTL_NOTIF_RECV, buffer) < 0) {
    if (errno == EINTR || errno == ENOENT) {
      return errno;
    }
    KJ_FAIL_SYSCALL("SECCOMP_IOCTL_NOTIF_RECV", errno);
  }
  memcpy(&notif, buffer, sizeof(notif));
  return 0;
}

int KernelUnotify::send(const seccomp_notif_resp& resp) {
  alignas(seccomp_notif_resp) kj::byte buffer[RESP_BUFFER];
  memset(buffer, 0, respSize_);
  memcpy(buffer, &resp, sizeof(resp));
  if (ioctl(listener_.get(), SECCOMP_IOCTL_NOTIF_SEND, buffer) < 0) {
    if (errno == ENOENT) {
      return ENOENT;
    }
    KJ_FAIL_SYSCALL("SECCOMP_IOCTL_NOTIF_SEND", errno, resp.id);
  }
  return 0;
}

bool KernelUnotify::idValid(uint64_t id) {
  return ioctl(listener_.get(), SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0;
}

int KernelUnotify::addFd(const seccomp_notif_addfd& addfd) {
  int fd = ioctl(listener_.get(), SECCOMP_IOCTL_NOTIF_ADDFD, &addfd);
  return fd < 0 ? -errno : fd;
}

void queueSignalOnNode(pid_t pid, int sig, const siginfo_t* info) {
  if (info == nullptr) {
    syscall(SYS_tgkill, pid, pid, sig);
  } else {
    syscall(SYS_rt_tgsigqueueinfo, pid, pid, sig, info);
  }
}

std::string readNodeProcFile(pid_t pid, const std::string& name) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/" + name, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void ChildGuest::queueSignal(int sig, const siginfo_t* info) { queueSignalOnNode(pid_, sig, info); }

std::string ChildGuest::procFile(const std::string& name) { return readNodeProcFile(pid_, name); }

kj::Maybe<int> ChildGuest::nextEvent() {
  struct signalfd_siginfo info;
  while (read(sigchld_.get(), &info, sizeof(info)) == sizeof(info)) {
  }
  for (;;) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG | WUNTRACED | WCONTINUED | __WALL);
    if (pid <= 0) {
      return nullptr;
    }
    if (pid == pid_) {
      return status;
    }
    KJ_IF_MAYBE (handler, otherChild_) {
      (*handler)(pid, status);
    }
  }
}

void ChildGuest::kill() {
  ::kill(pid_, SIGKILL);
  int ignored;
  waitpid(pid_, &ignored, __WALL);
}

}  // namespace mos::remote
