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

#include "marshal.h"
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

// Kinds whose argument the kernel reads through (an in-buffer stands behind it) or writes
// through (an out-buffer).
bool readsThrough(ArgKind kind) {
  switch (kind) {
    case ArgKind::PATH:
    case ArgKind::PATH_OR_NULL:
    case ArgKind::STRING:
    case ArgKind::IN_BUF:
    case ArgKind::IN_STRUCT:
    case ArgKind::INOUT_STRUCT:
    case ArgKind::INOUT_ARRAY:
    case ArgKind::INOUT_BITS: return true;
    default: return false;
  }
}

bool writesThrough(ArgKind kind) {
  switch (kind) {
    case ArgKind::OUT_BUF:
    case ArgKind::OUT_STRUCT:
    case ArgKind::INOUT_STRUCT:
    case ArgKind::INOUT_ARRAY:
    case ArgKind::INOUT_BITS:
    case ArgKind::OUT_BUF_LENPTR:
    case ArgKind::OUT_ARRAY: return true;
    default: return false;
  }
}

// Whether a buffer of `size` bytes holds everything the kernel touches through argument kind
// `spec` with the request's `args` (and `request`'s in-data, for a socklen_t capacity), so the
// kernel never reads or writes past a home buffer.
bool bufferFits(const ArgSpec& spec, const uint64_t (&args)[6], size_t size,
                proto::SyscallRequest::Reader request) {
  uint64_t len = spec.lenArg < ARG_SLOTS ? args[spec.lenArg] : 0;
  switch (spec.kind) {
    case ArgKind::PATH:
    case ArgKind::PATH_OR_NULL:
    case ArgKind::STRING: return size <= PATH_MAX + 1;  // copied with a NUL after it (execute)
    case ArgKind::IN_BUF:
    case ArgKind::OUT_BUF: return len <= size;
    case ArgKind::IN_STRUCT:
    case ArgKind::OUT_STRUCT:
    case ArgKind::INOUT_STRUCT: return size >= spec.size;
    case ArgKind::INOUT_ARRAY:
      return static_cast<uint64_t>(static_cast<uint32_t>(len)) * spec.size <= size;
    case ArgKind::OUT_ARRAY: {
      int32_t count = static_cast<int32_t>(static_cast<uint32_t>(len));
      return count >= 0 && static_cast<uint64_t>(count) * spec.size <= size;
    }
    case ArgKind::INOUT_BITS: {
      int32_t nfds = static_cast<int32_t>(static_cast<uint32_t>(len));
      return nfds >= 0 && (static_cast<uint64_t>(nfds) + 63) / 64 * 8 <= size;
    }
    case ArgKind::OUT_BUF_LENPTR:
      // The capacity is the socklen_t that travels as argument lenArg's in-data.
      for (auto in : request.getIn()) {
        if (in.getArg() == spec.lenArg && in.getData().size() >= sizeof(int32_t)) {
          int32_t capacity;
          memcpy(&capacity, in.getData().begin(), sizeof(capacity));
          return capacity >= 0 && static_cast<size_t>(capacity) <= size;
        }
      }
      return false;
    default: return false;
  }
}

}  // namespace

int Executor::refuse(int nr, const SyscallEntry* row, const char* why) {
  int err = row != nullptr && row->err != 0 ? row->err : ENOSYS;
  if (refused_.insert(nr).second) {
    spdlog::warn("refusing forwarded syscall {} ({}): {}; it fails with {}", nr,
                 row != nullptr ? row->name : "no row", why, strerrorname_np(err));
  }
  return err;
}

int Executor::admit(int nr, const SyscallEntry* row, const uint64_t (&args)[6],
                    proto::SyscallRequest::Reader request, ArgSpec (&specs)[6]) {
  if (row == nullptr) {
    return refuse(nr, row, "the syscall table has no row for it");
  }
  switch (row->atHome) {
    case AtHome::NEVER: return refuse(nr, row, "the syscall table does not route it home");
    case AtHome::ARGS:
    case AtHome::HELPER:
    case AtHome::MSGHDR: break;
  }
  if (row->handler == HandlerId::IOCTL || row->handler == HandlerId::FCNTL ||
      row->handler == HandlerId::PSELECT) {
    if (!dynamicArgSpecs(*row, args, specs)) {
      return refuse(nr, row, "its arguments name a request or command the table does not know");
    }
  } else {
    std::copy(std::begin(row->args), std::end(row->args), std::begin(specs));
  }
  bool msghdr = row->atHome == AtHome::MSGHDR;
  if (request.getPointers().size() > 0 && !msghdr) {
    return refuse(nr, row, "pointer fixups for a call whose row has no msghdr");
  }
  // Each buffer stands behind an argument whose kind the kernel reads or writes through, or is
  // a msghdr call's header (argument 1) or auxiliary buffer; and it holds what the call touches.
  auto allowed = [&](uint8_t slot, bool in, size_t size) {
    if (slot >= ARG_SLOTS || (msghdr && slot == 1)) {
      return msghdr && slot < SLOTS;
    }
    ArgKind kind = specs[slot].kind;
    return (in ? readsThrough(kind) : writesThrough(kind)) &&
           bufferFits(specs[slot], args, size, request);
  };
  for (auto in : request.getIn()) {
    if (!allowed(in.getArg(), true, in.getData().size())) {
      return refuse(nr, row, "an in-buffer for an argument the row does not declare as one");
    }
  }
  for (auto out : request.getOut()) {
    if (!allowed(out.getArg(), false, out.getSize())) {
      return refuse(nr, row, "an out-buffer for an argument the row does not declare as one");
    }
  }
  return 0;
}

void Executor::execute(proto::SyscallRequest::Reader request, capnp::MessageBuilder& replyMessage) {
  auto reply = replyMessage.initRoot<proto::ToRemote>().initReply();
  reply.setSeq(request.getSeq());
  int nr = request.getNr();
  uint64_t args[6] = {};
  auto argList = request.getArgs();
  for (uint i = 0; i < argList.size() && i < 6; i++) {
    args[i] = argList[i];
  }
  const SyscallEntry* row = nr >= 0 ? findSyscall(nr) : nullptr;
  auto inList = request.getIn();
  auto outList = request.getOut();
  auto pointers = request.getPointers();
  ArgSpec specs[6];
  if (int err = admit(nr, row, args, request, specs); err != 0) {
    // Refused: nothing reaches the kernel; the out-buffers travel back empty.
    auto out = reply.initOut(outList.size());
    for (uint i = 0; i < outList.size(); i++) {
      out.init(i, 0);
    }
    reply.setRet(-err);
    return;
  }
  HomeBuffer* buffers = currentBuffers;
  for (auto& b : currentBuffers) {
    b = HomeBuffer{};
  }
  KJ_DEFER(for (auto& b : currentBuffers) { b = HomeBuffer{}; });

  // Slots a Pointer writes into or names: their in-data must be a private, writable copy.
  bool pointerSlot[SLOTS] = {};
  for (auto p : pointers) {
    KJ_REQUIRE(p.getInto() < SLOTS && p.getTarget() < SLOTS, "pointer names no slot", p.getInto(),
               p.getTarget());
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
    // The time at home that tracing reports (SyscallReply.homeNs): the call alone.
    timespec before, after;
    clock_gettime(CLOCK_MONOTONIC, &before);
    ret = run(nr, args, row, specs);
    clock_gettime(CLOCK_MONOTONIC, &after);
    reply.setHomeNs(uint64_t(after.tv_sec - before.tv_sec) * 1000000000u + uint64_t(after.tv_nsec) -
                    uint64_t(before.tv_nsec));
  }

  for (uint i = 0; i < outList.size(); i++) {
    uint8_t slot = outList[i].getArg();
    size_t size = out[i].size();
    // What the supervisor writes back (marshal.h, unmarshalReply): nothing on failure,
    // ret bytes of an OUT_BUF or a trimToRet buffer, ret elements of an OUT_ARRAY, the rest in
    // full.
    ArgKind kind = slot < ARG_SLOTS ? specs[slot].kind : ArgKind::NONE;
    size_t keep = size;
    if (ret < 0) {
      keep = 0;
    } else if (kind == ArgKind::OUT_BUF || outList[i].getTrimToRet()) {
      keep = kj::min(static_cast<size_t>(ret), size);
    } else if (kind == ArgKind::OUT_ARRAY && specs[slot].size > 0) {
      keep = kj::min(static_cast<size_t>(ret) * specs[slot].size, size);
    }
    if (keep < size) {
      auto orphan = out.disown(i);
      orphan.truncate(keep);
      out.adopt(i, kj::mv(orphan));
    }
  }
  reply.setRet(ret);
}

int64_t Executor::run(int nr, uint64_t (&args)[6], const SyscallEntry* row,
                      const ArgSpec (&specs)[6]) {
  HomeBuffer* buffers = currentBuffers;
  int newFdArg = -1;
  for (int i = 0; i < 6; i++) {
    ArgKind kind = specs[i].kind;
    if (kind == ArgKind::FD && fds_.contains(fdArg(args[i]))) {
      return -EBADF;
    }
    if (kind == ArgKind::NEW_FD) {
      newFdArg = i;
    } else if (isSignalMaskKind(kind)) {
      args[i] = 0;
    } else if (isPointerKind(kind) && !buffers[i].present && args[i] != 0) {
      // A guest address that was not marshalled: never let the kernel use it in our memory.
      return -EFAULT;
    }
  }
  if (newFdArg >= 0 && fds_.contains(fdArg(args[newFdArg])) &&
      !(specs[0].kind == ArgKind::FD && fdArg(args[0]) == fdArg(args[newFdArg]))) {
    // The job wants a number we hold (dup2 onto it): ours moves elsewhere first.
    try {
      fds_.relocate(fdArg(args[newFdArg]));
    } catch (kj::Exception& e) {
      spdlog::warn("cannot move a deputy descriptor out of the job's way: {}",
                   e.getDescription().cStr());
      return -EMFILE;
    }
  }
  if (row->atHome == AtHome::MSGHDR) {
    // The msghdr holds pointers: only a home copy whose every pointer names a buffer of this
    // request may reach the kernel.
    if (!buffers[1].present) {
      return -EFAULT;
    }
    if (!msghdrIsHome()) {
      return -refuse(nr, row, "its msghdr points outside the request's buffers");
    }
  }
  // Paths that mean the job's /proc entries.
  for (int i = 0; i < 6; i++) {
    ArgKind kind = specs[i].kind;
    if ((kind != ArgKind::PATH && kind != ArgKind::PATH_OR_NULL) || !buffers[i].present) {
      continue;  // STRING arguments (a symlink's content, an xattr name) are not looked up
    }
    int dirfd = (i > 0 && specs[i - 1].kind == ArgKind::FD) ? fdArg(args[i - 1]) : AT_FDCWD;
    switch (classifyPath(dirfd, reinterpret_cast<const char*>(buffers[i].ptr))) {
      case ProcPath::OTHER: break;
      case ProcPath::RESERVED_FD: return -ENOENT;
      case ProcPath::EXE: {
        if (jobExe_.empty()) {
          break;
        }
        if (row->view == HomeView::EXE_LINK) {
          int bufArg = i + 1;  // the OUT_BUF after the PATH (the table checks the layout)
          int64_t size = static_cast<int64_t>(args[bufArg + 1]);
          if (size <= 0) {
            return -EINVAL;
          }
          if (!buffers[bufArg].present) {
            return -EFAULT;
          }
          size_t n =
              kj::min(kj::min(static_cast<size_t>(size), buffers[bufArg].size), jobExe_.size());
          memcpy(buffers[bufArg].ptr, jobExe_.data(), n);
          return static_cast<int64_t>(n);
        }
        args[i] = reinterpret_cast<uint64_t>(jobExe_.c_str());
        break;
      }
    }
  }
  switch (row->view) {
    case HomeView::CLOSE_RANGE: return closeRange(args);
    case HomeView::POLL: return pollAroundReserved(nr, args, specs[2].kind == ArgKind::VAL);
    case HomeView::SELECT:
      if (setsNameReserved(args)) {
        return -EBADF;
      }
      break;
    case HomeView::SCM_RIGHTS:
      if (rightsNameReserved()) {
        return -EBADF;
      }
      break;
    case HomeView::NONE:
    case HomeView::FD_LISTING:
    case HomeView::EXE_LINK: break;
  }
  int64_t ret;
  if (row->restart == NEVER_INTERRUPTED) {
    // close, dup2, pipe...: a native call never looks at signals, so it runs with ours blocked
    // (they stay pending and are sent after it); a close must never be cut short and left
    // undone (docs/design.md, "Signals").
    long r = ::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]);
    ret = r < 0 ? -errno : r;
  } else {
    ret = interruptibleSyscall(nr, args);
  }
  if (row->view == HomeView::FD_LISTING && ret > 0) {
    ret = filterProcFdListing(nr, fdArg(args[0]), args, ret);
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
    long r = ::syscall(__NR_close_range, static_cast<unsigned>(a), static_cast<unsigned>(b), flags);
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
int64_t Executor::pollAroundReserved(int nr, uint64_t (&args)[6], bool timeoutIsValue) {
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
    if (timeoutIsValue) {
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

namespace {

// Whether [p, p + length) lies within one buffer of the call being executed.
bool withinABuffer(const void* p, size_t length) {
  auto* at = static_cast<const kj::byte*>(p);
  for (auto& b : currentBuffers) {
    if (b.present && at >= b.ptr && at <= b.ptr + b.size && length <= b.size - (at - b.ptr)) {
      return true;
    }
  }
  return false;
}

}  // namespace

// sendmsg(2), recvmsg(2): every pointer of the home msghdr (argument 1) — the name, the iovec
// array, each iovec's base and the control data — is NULL or lies, with its length, inside a
// buffer of this request (the supervisor's Pointer fixups put them there).
bool Executor::msghdrIsHome() {
  const HomeBuffer& header = currentBuffers[1];
  if (header.size < sizeof(struct msghdr)) {
    return false;
  }
  struct msghdr msg;
  memcpy(&msg, header.ptr, sizeof(msg));
  if (msg.msg_name != nullptr && !withinABuffer(msg.msg_name, msg.msg_namelen)) {
    return false;
  }
  if (msg.msg_control != nullptr && !withinABuffer(msg.msg_control, msg.msg_controllen)) {
    return false;
  }
  if (msg.msg_iovlen == 0) {
    return true;
  }
  if (msg.msg_iov == nullptr || msg.msg_iovlen > IOV_MAX ||
      !withinABuffer(msg.msg_iov, msg.msg_iovlen * sizeof(struct iovec))) {
    return false;
  }
  for (size_t i = 0; i < msg.msg_iovlen; i++) {
    struct iovec v;
    memcpy(&v, reinterpret_cast<const kj::byte*>(msg.msg_iov) + i * sizeof(v), sizeof(v));
    if (v.iov_len > 0 && (v.iov_base == nullptr || !withinABuffer(v.iov_base, v.iov_len))) {
      return false;
    }
  }
  return true;
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
    size_t room = static_cast<size_t>(static_cast<kj::byte*>(msg.msg_control) + msg.msg_controllen -
                                      reinterpret_cast<kj::byte*>(c));
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
int64_t Executor::filterProcFdListing(int nr, int fd, uint64_t (&args)[6], int64_t ret) {
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
    ret = interruptibleSyscall(nr, args);
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

std::string readLink(const std::string& path) {
  char buffer[PATH_MAX + 1];
  ssize_t n = readlink(path.c_str(), buffer, PATH_MAX);
  return n < 0 ? std::string() : std::string(buffer, n);
}

}  // namespace mos::deputy
