#include "executor.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <string_view>
#include <vector>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "signals.h"
#include "syscall_table.h"

namespace mos::deputy {

namespace {

// Larger out-buffers are refused (ENOMEM): the supervisor cuts transfers to MAX_FORWARD_BYTES.
constexpr size_t MAX_OUT_BYTES = 64u << 20;

bool isDigits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

int toInt(std::string_view s) {
  long v = 0;
  for (char c : s) {
    v = v * 10 + (c - '0');
    if (v > INT_MAX) {
      return -1;
    }
  }
  return static_cast<int>(v);
}

// The fd argument as the kernel reads it (an unsigned int).
int fdArg(uint64_t value) { return static_cast<int>(static_cast<uint32_t>(value)); }

// readlink(2) into a std::string; empty on failure.
std::string readLink(const std::string& path) {
  char buffer[PATH_MAX + 1];
  ssize_t n = readlink(path.c_str(), buffer, PATH_MAX);
  if (n < 0) {
    return std::string();
  }
  return std::string(buffer, n);
}

// Splits an absolute path into components, resolving "." and ".." lexically.
std::vector<std::string_view> normalize(std::string_view path) {
  std::vector<std::string_view> parts;
  size_t at = 0;
  while (at < path.size()) {
    size_t end = path.find('/', at);
    if (end == std::string_view::npos) {
      end = path.size();
    }
    std::string_view part = path.substr(at, end - at);
    if (part == "..") {
      if (!parts.empty()) {
        parts.pop_back();
      }
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
    at = end + 1;
  }
  return parts;
}

// Calls that would change the deputy itself rather than the job's home state. The supervisor
// runs them locally or through their own messages (fork mirroring, ExecRequest, GuestExit);
// executing one here would break the deputy (unmap its memory, replace its signal handler).
bool changesTheDeputy(int nr, const uint64_t (&args)[6]) {
  switch (nr) {
    case __NR_fork:
    case __NR_vfork:
    case __NR_clone:
    case __NR_clone3:
    case __NR_execve:
    case __NR_execveat:
    case __NR_exit:
    case __NR_exit_group:
    case __NR_rt_sigreturn:
    case __NR_rt_sigaction:
    case __NR_rt_sigprocmask:
    case __NR_sigaltstack:
    case __NR_set_tid_address:
    case __NR_set_robust_list:
    case __NR_rseq:
    case __NR_arch_prctl:
    case __NR_modify_ldt:
    case __NR_mmap:
    case __NR_munmap:
    case __NR_mprotect:
    case __NR_pkey_mprotect:
    case __NR_mremap:
    case __NR_brk:
    case __NR_madvise:
    case __NR_mlock:
    case __NR_mlock2:
    case __NR_munlock:
    case __NR_mlockall:
    case __NR_munlockall:
    case __NR_shmat:
    case __NR_shmdt:
    case __NR_seccomp:
    case __NR_ptrace:
      return true;
    case __NR_prctl:
      return args[0] == PR_SET_MM || args[0] == PR_SET_SECCOMP;
    default:
      return false;
  }
}

}  // namespace

Executor::Executor(ReservedFds& fds, std::string jobExe, pid_t pid)
    : fds_(fds), jobExe_(std::move(jobExe)), pid_(pid) {}

namespace {

// One slot's home buffer, when the request supplied one (slots 0..5 are the arguments, 6..15
// auxiliary buffers reached through Pointers).
struct HomeBuffer {
  kj::byte* ptr = nullptr;
  size_t size = 0;
  bool present = false;
};

constexpr uint SLOTS = 16;
constexpr uint ARG_SLOTS = 6;

// The buffers of the call being executed (one call at a time per deputy thread).
thread_local HomeBuffer currentBuffers[SLOTS];

}  // namespace

void Executor::execute(proto::SyscallRequest::Reader request,
                       capnp::MessageBuilder& replyMessage) {
  auto reply = replyMessage.initRoot<proto::ToRemote>().initReply();
  reply.setSeq(request.getSeq());
  int nr = request.getNr();
  uint64_t args[6] = {};
  auto argList = request.getArgs();
  for (uint i = 0; i < argList.size() && i < 6; i++) {
    args[i] = argList[i];
  }
  const SyscallEntry* row = nr >= 0 ? findSyscall(nr) : nullptr;
  HomeBuffer* buffers = currentBuffers;
  for (auto& b : currentBuffers) {
    b = HomeBuffer{};
  }
  KJ_DEFER(for (auto& b : currentBuffers) { b = HomeBuffer{}; });
  auto inList = request.getIn();
  auto outList = request.getOut();
  auto pointers = request.getPointers();

  // Slots a Pointer writes into or names: their in-data must be a private, writable copy.
  bool pointerSlot[SLOTS] = {};
  for (auto p : pointers) {
    KJ_REQUIRE(p.getInto() < SLOTS && p.getTarget() < SLOTS, "pointer names no slot",
               p.getInto(), p.getTarget());
    pointerSlot[p.getInto()] = true;
    pointerSlot[p.getTarget()] = true;
  }

  // In-buffers: small ones (paths) and pointer slots copied with a NUL after them, large ones
  // used in place.
  std::vector<kj::Array<kj::byte>> copies;
  for (auto in : inList) {
    uint8_t slot = in.getArg();
    KJ_REQUIRE(slot < SLOTS, "in-buffer names no slot", slot);
    auto data = in.getData();
    kj::byte* ptr;
    if (data.size() <= PATH_MAX + 1 || pointerSlot[slot]) {
      auto copy = kj::heapArray<kj::byte>(data.size() + 1);
      memcpy(copy.begin(), data.begin(), data.size());
      copy[data.size()] = 0;
      ptr = copy.begin();
      copies.push_back(kj::mv(copy));
    } else {
      // The kernel only reads it.
      ptr = const_cast<kj::byte*>(data.begin());
    }
    if (slot < ARG_SLOTS) {
      args[slot] = reinterpret_cast<uint64_t>(ptr);
    }
    buffers[slot] = HomeBuffer{ptr, data.size(), true};
  }

  // Out-buffers live in the reply itself: no copy after the call.
  auto out = reply.initOut(outList.size());
  bool tooLarge = false;
  for (uint i = 0; i < outList.size(); i++) {
    uint8_t slot = outList[i].getArg();
    KJ_REQUIRE(slot < SLOTS, "out-buffer names no slot", slot);
    size_t size = outList[i].getSize();
    if (size > MAX_OUT_BYTES) {
      tooLarge = true;
      continue;
    }
    auto blob = out.init(i, size);
    for (auto in : inList) {
      if (in.getArg() == slot) {
        memcpy(blob.begin(), in.getData().begin(), kj::min(size, in.getData().size()));
      }
    }
    if (slot < ARG_SLOTS) {
      args[slot] = reinterpret_cast<uint64_t>(blob.begin());
    }
    buffers[slot] = HomeBuffer{blob.begin(), size, true};
  }

  // Pointer fixups, now that every buffer has its home address.
  if (!tooLarge) {
    for (auto p : pointers) {
      const HomeBuffer& into = buffers[p.getInto()];
      const HomeBuffer& target = buffers[p.getTarget()];
      KJ_REQUIRE(into.present && target.present, "pointer names a slot without a buffer",
                 p.getInto(), p.getTarget());
      KJ_REQUIRE(into.size >= sizeof(uint64_t) && p.getOffset() <= into.size - sizeof(uint64_t),
                 "pointer outside its buffer", p.getInto(), p.getOffset(), into.size);
      uint64_t address = reinterpret_cast<uint64_t>(target.ptr);
      memcpy(into.ptr + p.getOffset(), &address, sizeof(address));
    }
  }

  int64_t ret;
  if (tooLarge) {
    ret = -ENOMEM;
  } else {
    ret = run(nr, args, row);
  }

  for (uint i = 0; i < outList.size(); i++) {
    uint8_t slot = outList[i].getArg();
    size_t size = out[i].size();
    // What the supervisor writes back (marshal.h, unmarshalReply): nothing on failure,
    // ret bytes of an OUT_BUF or a trimToRet buffer, ret elements of an OUT_ARRAY, the rest in
    // full.
    ArgKind kind = row != nullptr && slot < ARG_SLOTS ? row->args[slot].kind : ArgKind::NONE;
    size_t keep = size;
    if (ret < 0) {
      keep = 0;
    } else if (kind == ArgKind::OUT_BUF || outList[i].getTrimToRet()) {
      keep = kj::min(static_cast<size_t>(ret), size);
    } else if (kind == ArgKind::OUT_ARRAY && row->args[slot].size > 0) {
      keep = kj::min(static_cast<size_t>(ret) * row->args[slot].size, size);
    }
    if (keep < size) {
      auto orphan = out.disown(i);
      orphan.truncate(keep);
      out.adopt(i, kj::mv(orphan));
    }
  }
  reply.setRet(ret);
}

int64_t Executor::run(int nr, uint64_t (&args)[6], const SyscallEntry* row) {
  HomeBuffer* buffers = currentBuffers;
  if (changesTheDeputy(nr, args)) {
    static std::set<int> reported;
    if (reported.insert(nr).second) {
      spdlog::warn("refusing forwarded syscall {} ({}): it would change the deputy itself", nr,
                   row != nullptr ? row->name : "?");
    }
    return -ENOSYS;
  }
  bool isDup2 = nr == __NR_dup2 || nr == __NR_dup3;
  bool fdFirst = nr == __NR_close || nr == __NR_dup || isDup2 || nr == __NR_fcntl ||
                 nr == __NR_ioctl;
  for (int i = 0; i < 6; i++) {
    ArgKind kind = row != nullptr ? row->args[i].kind : ArgKind::NONE;
    bool isFd = kind == ArgKind::FD || (fdFirst && i == 0);
    if (isDup2 && i == 1) {
      continue;  // the target: handled below
    }
    if (isFd && fds_.contains(fdArg(args[i]))) {
      return -EBADF;
    }
    if (kind == ArgKind::IGNORED_PTR) {
      args[i] = 0;
    } else if (isPointerKind(kind) && !buffers[i].present && args[i] != 0) {
      // A guest address that was not marshalled: never let the kernel use it in our memory.
      return -EFAULT;
    }
  }
  if (isDup2 && fds_.contains(fdArg(args[1])) && fdArg(args[0]) != fdArg(args[1])) {
    try {
      fds_.relocate(fdArg(args[1]));
    } catch (kj::Exception& e) {
      spdlog::warn("cannot move a deputy descriptor out of the job's way: {}",
                   e.getDescription().cStr());
      return -EMFILE;
    }
  }
  // Paths that mean the job's /proc entries.
  for (int i = 0; i < 6 && row != nullptr; i++) {
    ArgKind kind = row->args[i].kind;
    if ((kind != ArgKind::PATH && kind != ArgKind::PATH_OR_NULL) || !buffers[i].present) {
      continue;
    }
    if ((nr == __NR_symlink || nr == __NR_symlinkat) && i == 0) {
      continue;  // the link's content, not a path looked up now
    }
    int dirfd = (i > 0 && row->args[i - 1].kind == ArgKind::FD) ? fdArg(args[i - 1]) : AT_FDCWD;
    switch (classifyPath(dirfd, reinterpret_cast<const char*>(buffers[i].ptr))) {
      case ProcPath::OTHER:
        break;
      case ProcPath::RESERVED_FD:
        return -ENOENT;
      case ProcPath::EXE: {
        if (jobExe_.empty()) {
          break;
        }
        if (nr == __NR_readlink || nr == __NR_readlinkat) {
          int bufArg = nr == __NR_readlink ? 1 : 2;
          int64_t size = static_cast<int64_t>(args[bufArg + 1]);
          if (size <= 0) {
            return -EINVAL;
          }
          if (!buffers[bufArg].present) {
            return -EFAULT;
          }
          size_t n = kj::min(kj::min(static_cast<size_t>(size), buffers[bufArg].size),
                             jobExe_.size());
          memcpy(buffers[bufArg].ptr, jobExe_.data(), n);
          return static_cast<int64_t>(n);
        }
        args[i] = reinterpret_cast<uint64_t>(jobExe_.c_str());
        break;
      }
    }
  }
  switch (nr) {
    case __NR_close_range:
      return closeRange(args);
    case __NR_poll:
    case __NR_ppoll:
      return pollAroundReserved(nr, args);
    case __NR_select:
    case __NR_pselect6:
      if (setsNameReserved(args)) {
        return -EBADF;
      }
      break;
    case __NR_sendmsg:
    case __NR_recvmsg:
    case __NR_sendmmsg:
    case __NR_recvmmsg:
      // The msghdr holds pointers: only a home copy (with its fixups) may reach the kernel.
      if (!buffers[1].present) {
        return -EFAULT;
      }
      if (nr == __NR_sendmsg && rightsNameReserved()) {
        return -EBADF;
      }
      break;
    default:
      break;
  }
  int64_t ret = interruptibleSyscall(nr, args);
  if (nr == __NR_getdents64 && ret > 0) {
    ret = filterProcFdListing(fdArg(args[0]), args, ret);
  }
  return ret;
}

// close_range(2): the job's range minus our descriptors, as the ranges between them.
int64_t Executor::closeRange(uint64_t (&args)[6]) {
  uint64_t first = static_cast<uint32_t>(args[0]);
  uint64_t last = static_cast<uint32_t>(args[1]);
  unsigned flags = static_cast<unsigned>(args[2]);
  if (first > last) {
    return -EINVAL;
  }
  auto closeSome = [&](uint64_t a, uint64_t b) -> int64_t {
    long r = ::syscall(__NR_close_range, static_cast<unsigned>(a), static_cast<unsigned>(b),
                       flags);
    return r < 0 ? -errno : r;
  };
  uint64_t from = first;
  for (int fd : fds_.list()) {
    uint64_t r = static_cast<uint64_t>(fd);
    if (r < from) {
      continue;
    }
    if (r > last) {
      break;
    }
    if (r > from) {
      int64_t ret = closeSome(from, r - 1);
      if (ret < 0) {
        return ret;
      }
    }
    from = r + 1;
  }
  if (from <= last) {
    return closeSome(from, last);
  }
  return 0;
}

// poll(2), ppoll(2): an entry naming one of our descriptors reports POLLNVAL, as for a closed
// descriptor, and (like the kernel) makes the call return at once.
int64_t Executor::pollAroundReserved(int nr, uint64_t (&args)[6]) {
  HomeBuffer& fdsBuf = currentBuffers[0];
  size_t count = static_cast<size_t>(args[1]);
  std::vector<std::pair<size_t, int>> hidden;
  if (fdsBuf.present && !fds_.empty()) {
    auto* entries = reinterpret_cast<struct pollfd*>(fdsBuf.ptr);
    size_t n = kj::min(count, fdsBuf.size / sizeof(struct pollfd));
    for (size_t i = 0; i < n; i++) {
      if (entries[i].fd >= 0 && fds_.contains(entries[i].fd)) {
        hidden.emplace_back(i, entries[i].fd);
        entries[i].fd = -1;
      }
    }
  }
  static const struct timespec zero = {0, 0};
  if (!hidden.empty()) {
    if (nr == __NR_poll) {
      args[2] = 0;
    } else {
      args[2] = reinterpret_cast<uint64_t>(&zero);
    }
  }
  int64_t ret = interruptibleSyscall(nr, args);
  if (!hidden.empty()) {
    auto* entries = reinterpret_cast<struct pollfd*>(fdsBuf.ptr);
    for (auto [index, fd] : hidden) {
      entries[index].fd = fd;
      entries[index].revents = POLLNVAL;
    }
    if (ret >= 0) {
      ret += static_cast<int64_t>(hidden.size());
    }
  }
  return ret;
}

// select(2), pselect6(2): a set naming one of our descriptors is EBADF, as for a closed one.
bool Executor::setsNameReserved(uint64_t (&args)[6]) {
  int64_t nfds = static_cast<int32_t>(args[0]);
  for (int i = 1; i <= 3; i++) {
    HomeBuffer& set = currentBuffers[i];
    if (!set.present) {
      continue;
    }
    for (int fd : fds_.list()) {
      if (fd >= nfds || static_cast<size_t>(fd / 8) >= set.size) {
        continue;
      }
      if (set.ptr[fd / 8] & (1u << (fd % 8))) {
        return true;
      }
    }
  }
  return false;
}

// sendmsg(2) whose SCM_RIGHTS control data names one of our descriptors: EBADF, as for a
// closed one (the job must never obtain the channel). Only control data in a home buffer of this
// request is read.
bool Executor::rightsNameReserved() {
  const HomeBuffer& header = currentBuffers[1];
  if (fds_.empty() || header.size < sizeof(struct msghdr)) {
    return false;
  }
  struct msghdr msg;
  memcpy(&msg, header.ptr, sizeof(msg));
  if (msg.msg_control == nullptr || msg.msg_controllen == 0) {
    return false;
  }
  bool inBuffer = false;
  for (auto& b : currentBuffers) {
    if (b.present && b.ptr == msg.msg_control && msg.msg_controllen <= b.size) {
      inBuffer = true;
    }
  }
  if (!inBuffer) {
    return false;  // the kernel will find nothing of ours to send there
  }
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) {
      continue;
    }
    size_t room = static_cast<size_t>(static_cast<kj::byte*>(msg.msg_control) +
                                      msg.msg_controllen - reinterpret_cast<kj::byte*>(c));
    size_t count = (kj::min(static_cast<size_t>(c->cmsg_len), room) - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(fd));
      if (fds_.contains(fd)) {
        return true;
      }
    }
  }
  return false;
}

bool Executor::isOwnFdDirectory(int fd) {
  std::string link = readLink("/proc/self/fd/" + std::to_string(fd));
  auto parts = normalize(link);
  if (parts.size() < 3 || parts[0] != "proc" || parts[1] != std::to_string(pid_)) {
    return false;
  }
  size_t k = 2;
  if (parts.size() == 5 && parts[2] == "task" && isDigits(parts[3])) {
    k = 4;
  }
  return parts.size() == k + 1 && (parts[k] == "fd" || parts[k] == "fdinfo");
}

// getdents64(2) of one of the job's fd directories: our entries removed. A buffer that held only
// ours is refilled, so the job never mistakes it for the end of the directory.
int64_t Executor::filterProcFdListing(int fd, uint64_t (&args)[6], int64_t ret) {
  HomeBuffer& buf = currentBuffers[1];
  if (!buf.present || fds_.empty()) {
    return ret;
  }
  struct Dirent64 {
    uint64_t ino;
    int64_t off;
    uint16_t reclen;
    uint8_t type;
    char name[1];
  };
  auto namesReserved = [&](int64_t length) {
    for (int64_t at = 0; at < length;) {
      auto* d = reinterpret_cast<Dirent64*>(buf.ptr + at);
      std::string_view name(d->name);
      if (isDigits(name) && fds_.contains(toInt(name))) {
        return true;
      }
      at += d->reclen;
    }
    return false;
  };
  bool checked = false;
  for (;;) {
    if (!namesReserved(ret)) {
      return ret;
    }
    if (!checked) {
      if (!isOwnFdDirectory(fd)) {
        return ret;
      }
      checked = true;
    }
    int64_t kept = 0;
    for (int64_t at = 0; at < ret;) {
      auto* d = reinterpret_cast<Dirent64*>(buf.ptr + at);
      uint16_t reclen = d->reclen;
      std::string_view name(d->name);
      if (!(isDigits(name) && fds_.contains(toInt(name)))) {
        if (kept != at) {
          memmove(buf.ptr + kept, buf.ptr + at, reclen);
        }
        kept += reclen;
      }
      at += reclen;
    }
    if (kept > 0) {
      return kept;
    }
    ret = interruptibleSyscall(__NR_getdents64, args);
    if (ret <= 0) {
      return ret;
    }
  }
}

Executor::ProcPath Executor::classifyPath(int dirfd, const char* path) {
  std::string_view p(path);
  if (p.empty()) {
    return ProcPath::OTHER;
  }
  std::string_view trimmed = p;
  while (trimmed.size() > 1 && trimmed.back() == '/') {
    trimmed.remove_suffix(1);
  }
  size_t slash = trimmed.rfind('/');
  std::string_view last = slash == std::string_view::npos ? trimmed : trimmed.substr(slash + 1);
  if (last != "exe" && !isDigits(last)) {
    return ProcPath::OTHER;  // the cheap test that keeps this off the common path
  }
  std::string absolute;
  if (p[0] == '/') {
    absolute = std::string(p);
  } else {
    std::string base;
    if (dirfd == AT_FDCWD) {
      char cwd[PATH_MAX];
      if (getcwd(cwd, sizeof(cwd)) == nullptr) {
        return ProcPath::OTHER;
      }
      base = cwd;
    } else {
      if (fds_.contains(dirfd)) {
        return ProcPath::OTHER;
      }
      base = readLink("/proc/self/fd/" + std::to_string(dirfd));
      if (base.empty() || base[0] != '/') {
        return ProcPath::OTHER;
      }
    }
    absolute = base + "/" + std::string(p);
  }
  auto parts = normalize(absolute);
  std::vector<std::string_view> rest;
  if (parts.size() >= 2 && parts[0] == "dev" && parts[1] == "fd") {
    // /dev/fd is a link to /proc/self/fd.
    rest.assign(parts.begin() + 1, parts.end());
  } else {
    if (parts.size() < 3 || parts[0] != "proc") {
      return ProcPath::OTHER;
    }
    size_t k;
    if (parts[1] == "self" || parts[1] == std::to_string(pid_)) {
      k = 2;
      if (parts.size() > k + 2 && parts[k] == "task" && isDigits(parts[k + 1])) {
        k += 2;
      }
    } else if (parts[1] == "thread-self") {
      k = 2;
    } else {
      return ProcPath::OTHER;
    }
    rest.assign(parts.begin() + k, parts.end());
  }
  if (rest.size() == 1 && rest[0] == "exe") {
    return ProcPath::EXE;
  }
  if (rest.size() >= 2 && (rest[0] == "fd" || rest[0] == "fdinfo") && isDigits(rest[1]) &&
      fds_.contains(toInt(rest[1]))) {
    return ProcPath::RESERVED_FD;
  }
  return ProcPath::OTHER;
}

}  // namespace mos::deputy
