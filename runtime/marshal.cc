#include "marshal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/limits.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <kj/debug.h>

#include <algorithm>
#include <cstring>

namespace mos {

// ---- GuestMemory ----

namespace {
constexpr uint64_t PAGE_BYTES = 4096;  // x86-64 base page: the granularity of a fault
}  // namespace

int GuestMemory::readString(RemotePtr<char> addr, size_t max, std::string& out) {
  out.clear();
  uint64_t at = addr.addr();
  uint8_t chunk[PAGE_BYTES];
  while (out.size() < max) {
    size_t want = PAGE_BYTES - (at % PAGE_BYTES);
    want = std::min<size_t>(want, max - out.size());
    if (int err = read(RemotePtr<void>(at), std::span<uint8_t>(chunk, want)); err != 0) {
      return EFAULT;
    }
    const void* nul = memchr(chunk, 0, want);
    if (nul != nullptr) {
      out.append(reinterpret_cast<const char*>(chunk), static_cast<const uint8_t*>(nul) - chunk);
      return 0;
    }
    out.append(reinterpret_cast<const char*>(chunk), want);
    at += want;
  }
  return ENAMETOOLONG;
}

// process_vm_readv(2) returns a partial count when the remote range runs into unmapped memory;
// one retry from the partial point tells a fault (0 or -1) from a merely short transfer.
int ProcessMemory::read(RemotePtr<void> addr, std::span<uint8_t> out) {
  size_t done = 0;
  while (done < out.size()) {
    iovec local{out.data() + done, out.size() - done};
    iovec remote{reinterpret_cast<void*>(addr.addr() + done), out.size() - done};
    ssize_t n = process_vm_readv(pid_, &local, 1, &remote, 1, 0);
    if (n <= 0) {
      return EFAULT;
    }
    done += n;
  }
  return 0;
}

int ProcessMemory::write(RemotePtr<void> addr, std::span<const uint8_t> data) {
  size_t done = 0;
  while (done < data.size()) {
    iovec local{const_cast<uint8_t*>(data.data()) + done, data.size() - done};
    iovec remote{reinterpret_cast<void*>(addr.addr() + done), data.size() - done};
    ssize_t n = process_vm_writev(pid_, &local, 1, &remote, 1, 0);
    if (n <= 0) {
      return EFAULT;
    }
    done += n;
  }
  return 0;
}

// ---- Marshalling ----

namespace {

// What travels for one argument.
struct ArgPlan {
  bool in = false;
  bool out = false;
  bool string = false;  // `in` is `str` plus its NUL, already read
  size_t inBytes = 0;
  size_t outBytes = 0;
  std::string str;
};

// The count of a sized kind: counts and nfds are C ints in every row that uses them.
int32_t countArg(const uint64_t (&args)[6], uint8_t lenArg) {
  return static_cast<int32_t>(static_cast<uint32_t>(args[lenArg]));
}

size_t capped(uint64_t len) { return std::min<uint64_t>(len, MAX_FORWARD_BYTES); }

size_t fdSetBytes(int32_t nfds) { return (static_cast<size_t>(nfds) + 63) / 64 * 8; }

// Whether argument `i` has an OutBuf. Depends on `args` alone, so marshalRequest and
// unmarshalReply agree on the out-list's order without seeing each other's state.
bool hasOut(const ArgSpec (&specs)[6], const uint64_t (&args)[6], int i) {
  const ArgSpec& s = specs[i];
  if (args[i] == 0) {
    return false;
  }
  switch (s.kind) {
    case ArgKind::OUT_BUF:
    case ArgKind::OUT_STRUCT:
    case ArgKind::INOUT_STRUCT:
    case ArgKind::INOUT_ARRAY: return true;
    case ArgKind::OUT_ARRAY: return countArg(args, s.lenArg) > 0;
    case ArgKind::INOUT_BITS: return countArg(args, s.lenArg) >= 0;
    case ArgKind::OUT_BUF_LENPTR: return args[s.lenArg] != 0;
    default: return false;
  }
}

// Plans argument `i`, reading strings and socklens from the guest. Returns 0 or an errno.
int planArg(const ArgSpec (&specs)[6], const uint64_t (&args)[6], int i, GuestMemory& mem,
            ArgPlan& p, uint64_t (&wireArgs)[6]) {
  const ArgSpec& s = specs[i];
  if (!isPointerKind(s.kind)) {
    return 0;
  }
  if (isSignalMaskKind(s.kind) || args[i] == 0) {
    // NULL travels as NULL: the home kernel gives the native answer (EFAULT for a NULL path).
    wireArgs[i] = 0;
    return 0;
  }
  switch (s.kind) {
    case ArgKind::PATH:
    case ArgKind::PATH_OR_NULL:
    case ArgKind::STRING:
      if (int err = mem.readString(RemotePtr<char>(args[i]), PATH_MAX, p.str); err != 0) {
        return err;
      }
      p.in = true;
      p.string = true;
      p.inBytes = p.str.size() + 1;
      return 0;
    case ArgKind::IN_BUF:
      p.in = true;
      p.inBytes = capped(args[s.lenArg]);
      wireArgs[s.lenArg] = p.inBytes;
      return 0;
    case ArgKind::OUT_BUF:
      p.out = true;
      p.outBytes = capped(args[s.lenArg]);
      wireArgs[s.lenArg] = p.outBytes;
      return 0;
    case ArgKind::IN_STRUCT:
      p.in = true;
      p.inBytes = s.size;
      return 0;
    case ArgKind::OUT_STRUCT:
      p.out = true;
      p.outBytes = s.size;
      return 0;
    case ArgKind::INOUT_STRUCT:
      p.in = p.out = true;
      p.inBytes = p.outBytes = s.size;
      return 0;
    case ArgKind::INOUT_ARRAY: {
      uint64_t count = static_cast<uint32_t>(args[s.lenArg]);  // poll's nfds is unsigned
      if (count * s.size > MAX_FORWARD_BYTES) {
        return EINVAL;  // poll(2): nfds exceeds RLIMIT_NOFILE long before this
      }
      p.in = p.out = true;
      p.inBytes = p.outBytes = count * s.size;
      return 0;
    }
    case ArgKind::OUT_ARRAY: {
      int32_t count = countArg(args, s.lenArg);
      if (count <= 0) {
        wireArgs[i] = 0;  // nothing is written; the home kernel checks the count
        return 0;
      }
      uint64_t fit = std::min<uint64_t>(count, MAX_FORWARD_BYTES / s.size);
      p.out = true;
      p.outBytes = fit * s.size;
      wireArgs[s.lenArg] = fit;
      return 0;
    }
    case ArgKind::INOUT_BITS: {
      int32_t nfds = countArg(args, s.lenArg);
      if (nfds < 0) {
        wireArgs[i] = 0;  // select(2) fails EINVAL at home
        return 0;
      }
      if (fdSetBytes(nfds) > MAX_FORWARD_BYTES) {
        return EINVAL;
      }
      p.in = p.out = true;
      p.inBytes = p.outBytes = fdSetBytes(nfds);
      return 0;
    }
    case ArgKind::OUT_BUF_LENPTR: {
      if (args[s.lenArg] == 0) {
        wireArgs[i] = 0;
        return 0;
      }
      int32_t capacity;
      if (mem.read(RemotePtr<void>(args[s.lenArg]),
                   std::span<uint8_t>(reinterpret_cast<uint8_t*>(&capacity), sizeof capacity)) !=
          0) {
        return EFAULT;
      }
      if (capacity < 0) {
        return EINVAL;  // accept(2), getsockname(2), getsockopt(2): negative length
      }
      p.out = true;
      p.outBytes = capped(capacity);
      return 0;
    }
    default: return 0;
  }
}

}  // namespace

int marshalRequest(int nr, const ArgSpec (&specs)[6], const uint64_t (&args)[6], GuestMemory& mem,
                   proto::SyscallRequest::Builder req) {
  ArgPlan plan[6];
  uint64_t wireArgs[6];
  std::copy(std::begin(args), std::end(args), std::begin(wireArgs));
  size_t ins = 0, outs = 0;
  for (int i = 0; i < 6; ++i) {
    if (int err = planArg(specs, args, i, mem, plan[i], wireArgs); err != 0) {
      return err;
    }
    ins += plan[i].in;
    outs += plan[i].out;
    KJ_ASSERT(plan[i].out == hasOut(specs, args, i), nr, i);
  }

  req.setNr(nr);
  auto argList = req.initArgs(6);
  for (int i = 0; i < 6; ++i) {
    argList.set(i, wireArgs[i]);
  }
  auto inList = req.initIn(ins);
  auto outList = req.initOut(outs);
  size_t in = 0, out = 0;
  for (int i = 0; i < 6; ++i) {
    const ArgPlan& p = plan[i];
    if (p.in) {
      auto b = inList[in++];
      b.setArg(i);
      auto data = b.initData(p.inBytes);
      if (p.string) {
        memcpy(data.begin(), p.str.c_str(), p.inBytes);  // with the NUL
      } else if (mem.read(RemotePtr<void>(args[i]),
                          std::span<uint8_t>(data.begin(), data.size())) != 0) {
        return EFAULT;
      }
    }
    if (p.out) {
      auto o = outList[out++];
      o.setArg(i);
      o.setSize(p.outBytes);
    }
  }
  return 0;
}

int64_t unmarshalReply(int nr, const ArgSpec (&specs)[6], const uint64_t (&args)[6],
                       proto::SyscallReply::Reader reply, GuestMemory& mem) {
  int64_t ret = reply.getRet();
  auto outs = reply.getOut();
  capnp::Data::Reader data[6];
  size_t k = 0;
  for (int i = 0; i < 6; ++i) {
    if (hasOut(specs, args, i)) {
      KJ_REQUIRE(k < outs.size(), "reply has fewer out-buffers than the request", nr, i);
      data[i] = outs[k++];
    }
  }
  bool faulted = false;
  for (int i = 0; i < 6; ++i) {
    if (!hasOut(specs, args, i)) {
      continue;
    }
    const ArgSpec& s = specs[i];
    size_t n = 0;  // bytes to write back
    switch (s.kind) {
      case ArgKind::OUT_BUF:
        n = ret > 0 ? std::min<uint64_t>(ret, capped(args[s.lenArg])) : 0;
        break;
      case ArgKind::OUT_ARRAY: {
        uint64_t fit = std::min<uint64_t>(countArg(args, s.lenArg), MAX_FORWARD_BYTES / s.size);
        n = ret > 0 ? std::min<uint64_t>(ret, fit) * s.size : 0;
        break;
      }
      case ArgKind::OUT_STRUCT:
      case ArgKind::INOUT_STRUCT: n = ret >= 0 ? s.size : 0; break;
      case ArgKind::INOUT_ARRAY:
        n = ret >= 0 ? static_cast<uint32_t>(args[s.lenArg]) * s.size : 0;
        break;
      case ArgKind::INOUT_BITS: n = ret >= 0 ? fdSetBytes(countArg(args, s.lenArg)) : 0; break;
      case ArgKind::OUT_BUF_LENPTR: {
        if (ret < 0) {
          break;
        }
        // The kernel truncates the address to the capacity and reports the full length
        // through the socklen: write what fits.
        uint32_t returned = 0;
        const auto& len = data[s.lenArg];
        if (len.size() >= sizeof returned) {
          memcpy(&returned, len.begin(), sizeof returned);
        }
        n = returned;
        break;
      }
      default: break;
    }
    n = std::min(n, data[i].size());
    if (n > 0 &&
        mem.write(RemotePtr<void>(args[i]), std::span<const uint8_t>(data[i].begin(), n)) != 0) {
      faulted = true;
    }
  }
  return faulted ? -EFAULT : ret;
}

// ---- Dynamic argument kinds ----

namespace {

constexpr uint16_t KERNEL_TERMIOS_BYTES = 36;  // include/uapi/asm-generic/termbits.h: NCCS 19
constexpr uint16_t KERNEL_TERMIO_BYTES = 18;   // struct termio: 4 shorts, c_line, c_cc[8]
constexpr uint16_t WINSIZE_BYTES = sizeof(struct winsize);
static_assert(WINSIZE_BYTES == 8);
constexpr uint16_t FLOCK_BYTES = sizeof(struct flock);
static_assert(FLOCK_BYTES == 32);
constexpr uint16_t F_OWNER_EX_BYTES = sizeof(struct f_owner_ex);
static_assert(F_OWNER_EX_BYTES == 8);

constexpr ArgSpec VAL{ArgKind::VAL};
constexpr ArgSpec FD{ArgKind::FD};

// The third ioctl argument for `request`, or false if it cannot be marshalled generically.
bool ioctlArg(uint32_t request, ArgSpec& arg) {
  auto in = [&](uint16_t size) { arg = {ArgKind::IN_STRUCT, 0, size}; };
  auto out = [&](uint16_t size) { arg = {ArgKind::OUT_STRUCT, 0, size}; };
  switch (request) {
    // ioctl_tty(2). Plain-numbered requests carry no size in their number.
    case TCGETS: out(KERNEL_TERMIOS_BYTES); return true;
    case TCSETS:
    case TCSETSW:
    case TCSETSF: in(KERNEL_TERMIOS_BYTES); return true;
    case TCGETA: out(KERNEL_TERMIO_BYTES); return true;
    case TCSETA:
    case TCSETAW:
    case TCSETAF: in(KERNEL_TERMIO_BYTES); return true;
    case TIOCGLCKTRMIOS: out(KERNEL_TERMIOS_BYTES); return true;
    case TIOCSLCKTRMIOS: in(KERNEL_TERMIOS_BYTES); return true;
    case TIOCGWINSZ: out(WINSIZE_BYTES); return true;
    case TIOCSWINSZ: in(WINSIZE_BYTES); return true;
    case TIOCGPGRP:
    case TIOCGSID: out(sizeof(pid_t)); return true;
    case TIOCSPGRP: in(sizeof(pid_t)); return true;
    case FIONREAD:
    case TIOCOUTQ:
    case TIOCMGET:
    case TIOCGETD:
    case TIOCGSOFTCAR: out(sizeof(int)); return true;
    case FIONBIO:
    case FIOASYNC:
    case TIOCMBIS:
    case TIOCMBIC:
    case TIOCMSET:
    case TIOCSETD:
    case TIOCSSOFTCAR:
    case TIOCPKT: in(sizeof(int)); return true;
    case TIOCSTI: in(1); return true;
    case FIOQSIZE: out(sizeof(loff_t)); return true;
    case TCSBRK:
    case TCSBRKP:
    case TCXONC:
    case TCFLSH:
    case TIOCSCTTY:
    case TIOCNOTTY:
    case TIOCEXCL:
    case TIOCNXCL:
    case TIOCSBRK:
    case TIOCCBRK:
    case FIOCLEX:
    case FIONCLEX:
    case TIOCCONS:
    case TIOCVHANGUP: arg = VAL; return true;
    // linux/fs.h declares these with `long` but the kernel copies an int.
    case FS_IOC_GETFLAGS: out(sizeof(int)); return true;
    case FS_IOC_SETFLAGS: in(sizeof(int)); return true;
    default: break;
  }
  // _IOC-encoded requests: direction and size are in the number. Only families whose arguments
  // hold no pointers are trusted ('T' terminals and ptys, 'f' file flags, 0x12 block sizes); a
  // pointer inside a copied struct would be dereferenced in the deputy's address space.
  uint32_t type = _IOC_TYPE(request);
  if (type != 'T' && type != 'f' && type != 0x12) {
    return false;
  }
  uint32_t size = _IOC_SIZE(request);
  switch (_IOC_DIR(request)) {
    case _IOC_NONE: arg = VAL; return true;
    case _IOC_READ: out(size); return size > 0;
    case _IOC_WRITE: in(size); return size > 0;
    case _IOC_READ | _IOC_WRITE:
      arg = {ArgKind::INOUT_STRUCT, 0, static_cast<uint16_t>(size)};
      return size > 0;
  }
  return false;
}

// The third fcntl argument for `cmd`, or false for an unknown command.
bool fcntlArg(int cmd, ArgSpec& arg) {
  switch (cmd) {
    case F_DUPFD:
    case F_DUPFD_CLOEXEC:
    case F_GETFD:
    case F_SETFD:
    case F_GETFL:
    case F_SETFL:
    case F_SETOWN:
    case F_GETOWN:
    case F_SETSIG:
    case F_GETSIG:
    case F_SETLEASE:
    case F_GETLEASE:
    case F_NOTIFY:
    case F_SETPIPE_SZ:
    case F_GETPIPE_SZ:
    case F_ADD_SEALS:
    case F_GET_SEALS: arg = VAL; return true;
    case F_GETLK:
    case F_OFD_GETLK: arg = {ArgKind::INOUT_STRUCT, 0, FLOCK_BYTES}; return true;
    case F_SETLK:
    case F_SETLKW:
    case F_OFD_SETLK:
    case F_OFD_SETLKW: arg = {ArgKind::IN_STRUCT, 0, FLOCK_BYTES}; return true;
    case F_GETOWN_EX: arg = {ArgKind::OUT_STRUCT, 0, F_OWNER_EX_BYTES}; return true;
    case F_SETOWN_EX: arg = {ArgKind::IN_STRUCT, 0, F_OWNER_EX_BYTES}; return true;
    case F_GET_RW_HINT:
    case F_GET_FILE_RW_HINT: arg = {ArgKind::OUT_STRUCT, 0, sizeof(uint64_t)}; return true;
    case F_SET_RW_HINT:
    case F_SET_FILE_RW_HINT: arg = {ArgKind::IN_STRUCT, 0, sizeof(uint64_t)}; return true;
    default: return false;
  }
}

}  // namespace

bool dynamicArgSpecs(const SyscallEntry& entry, const uint64_t (&args)[6], ArgSpec (&out)[6]) {
  std::copy(std::begin(entry.args), std::end(entry.args), std::begin(out));
  switch (entry.handler) {
    case HandlerId::NONE: return true;
    case HandlerId::IOCTL:
      // ioctl(2): the request is an unsigned int.
      out[0] = FD;
      out[1] = VAL;
      return ioctlArg(static_cast<uint32_t>(args[1]), out[2]);
    case HandlerId::FCNTL:
      out[0] = FD;
      out[1] = VAL;
      return fcntlArg(static_cast<int>(args[1]), out[2]);
    case HandlerId::PSELECT:
      // pselect6(2): the sixth argument points to {const sigset_t*, size_t}; the supervisor
      // applies the mask locally, so the deputy never needs it.
      out[0] = VAL;
      out[1] = out[2] = out[3] = {ArgKind::INOUT_BITS, 0, 0};
      out[4] = {ArgKind::INOUT_STRUCT, 0, sizeof(struct timespec)};
      out[5] = {ArgKind::SIGMASK_PAIR};
      return true;
    default: return false;
  }
}

}  // namespace mos
