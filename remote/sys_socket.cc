// Socket-family handlers of the supervisor: sendmsg(2) and recvmsg(2), whose msghdr holds
// pointers to the name, the iovecs and the control data. They travel as auxiliary buffers with
// Pointer fixups (protocol/job.capnp), the iovecs flattened into one data buffer (as handleIov
// does for readv/writev).

#include <limits.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <vector>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "marshal.h"
#include "supervisor.h"

namespace mos::remote {

namespace {

// Buffer slots of a forwarded sendmsg/recvmsg (job.capnp: 0..5 arguments, 6..15 auxiliary).
constexpr uint8_t SLOT_MSGHDR = 1;   // the msghdr (argument 1), msg_iovlen = 1
constexpr uint8_t SLOT_NAME = 6;     // msg_name
constexpr uint8_t SLOT_IOVEC = 7;    // the one iovec
constexpr uint8_t SLOT_DATA = 8;     // the iovecs' bytes, flattened
constexpr uint8_t SLOT_CONTROL = 9;  // msg_control

// The kernel's limits (include/linux/uio.h UIO_MAXIOV; net/socket.c clamps msg_namelen to
// sizeof(struct sockaddr_storage)).
constexpr size_t MAX_IOV = 1024;
constexpr size_t MAX_NAME = sizeof(struct sockaddr_storage);
// Control data forwarded at most (bytes). recvmsg's buffer travels back in full, so it is kept
// small; SCM_RIGHTS of the kernel's maximum 253 descriptors needs about 1 KiB.
constexpr size_t MAX_CONTROL = 64u << 10;

template <typename T>
std::span<uint8_t> bytesOf(T& value) {
  return std::span<uint8_t>(reinterpret_cast<uint8_t*>(&value), sizeof(T));
}

template <typename T>
std::span<const uint8_t> constBytesOf(const T& value) {
  return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&value), sizeof(T));
}

}  // namespace

// sendmsg(2), recvmsg(2) (man 2 sendmsg, man 2 recvmsg; net/socket.c ____sys_sendmsg,
// ____sys_recvmsg). The guest's msghdr and iovecs are read here; the deputy gets a copy of the
// msghdr with msg_iovlen = 1 and home pointers (Pointer fixups) to the name, one iovec, the
// flattened data and the control bytes. Descriptor numbers in SCM_RIGHTS control data are home
// numbers on both sides, so control bytes travel unchanged. For recvmsg the data is scattered
// back over the guest's iovecs, the name (at most the guest's msg_namelen bytes) and the control
// bytes (at most its msg_controllen) written back, and msg_namelen (when msg_name is not NULL),
// msg_controllen and msg_flags updated as the kernel does.
// Errors without a round trip: EFAULT (unreadable msghdr, iovecs, name or control data),
// EMSGSIZE (more than 1024 iovecs), EINVAL (a negative msg_namelen or iov_len), ENOBUFS
// (sendmsg control data over 64 KiB). Data beyond MAX_FORWARD_BYTES is cut (a short send or
// receive); recvmsg control space is cut to 64 KiB. (sendmmsg and recvmmsg are DENY rows.)
Answer Supervisor::handleSockmsg(const seccomp_notif& notif) {
  int nr = notif.data.nr;
  KJ_REQUIRE(nr == __NR_sendmsg || nr == __NR_recvmsg, "SOCKMSG row of another call", nr);
  bool isRecv = nr == __NR_recvmsg;
  uint64_t msgAddr = notif.data.args[1];
  GuestMemory& memory = guestProcess_->memory();

  struct msghdr guestMsg;
  if (memory.read(RemotePtr<void>(msgAddr), bytesOf(guestMsg)) != 0) {
    return Answer::of(-EFAULT);
  }
  // The name: the kernel ignores msg_namelen when msg_name is NULL, refuses a negative one and
  // clamps it to a sockaddr_storage.
  bool hasName = guestMsg.msg_name != nullptr;
  int32_t guestNamelen = hasName ? static_cast<int32_t>(guestMsg.msg_namelen) : 0;
  if (guestNamelen < 0) {
    return Answer::of(-EINVAL);
  }
  size_t namelen = kj::min(static_cast<size_t>(guestNamelen), MAX_NAME);
  if (guestMsg.msg_iovlen > MAX_IOV) {
    return Answer::of(-EMSGSIZE);
  }
  std::vector<struct iovec> iov;
  size_t total;
  if (int err = readGuestIovecs(memory, reinterpret_cast<uint64_t>(guestMsg.msg_iov),
                                guestMsg.msg_iovlen, iov, total);
      err != 0) {
    return Answer::of(-err);
  }
  size_t controllen = guestMsg.msg_controllen;
  if (!isRecv && controllen > MAX_CONTROL) {
    return Answer::of(-ENOBUFS);
  }
  controllen = kj::min(controllen, MAX_CONTROL);
  bool hasControl = controllen > 0 && (!isRecv || guestMsg.msg_control != nullptr);

  capnp::MallocMessageBuilder message;
  auto request = message.initRoot<proto::ToDeputy>().initSyscall();
  request.setSeq(notif.id);
  request.setNr(nr);
  auto args = request.initArgs(6);
  args.set(0, notif.data.args[0]);
  args.set(2, notif.data.args[2]);

  // The home msghdr: every pointer NULL until a fixup names its buffer.
  struct msghdr homeMsg = {};
  homeMsg.msg_namelen = static_cast<socklen_t>(namelen);
  homeMsg.msg_iovlen = 1;
  homeMsg.msg_controllen = hasControl ? controllen : 0;
  homeMsg.msg_flags = guestMsg.msg_flags;
  struct iovec homeIov = {nullptr, total};

  auto in = request.initIn(isRecv ? 2 : 3 + (hasName ? 1 : 0) + (hasControl ? 1 : 0));
  uint inAt = 0;
  auto addIn = [&](uint8_t slot, std::span<const uint8_t> bytes) {
    in[inAt].setArg(slot);
    in[inAt].setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
    inAt++;
  };
  auto initIn = [&](uint8_t slot, size_t size) {
    in[inAt].setArg(slot);
    return in[inAt++].initData(size);
  };
  addIn(SLOT_MSGHDR, constBytesOf(homeMsg));
  addIn(SLOT_IOVEC, constBytesOf(homeIov));
  if (!isRecv) {
    if (hasName) {
      auto name = initIn(SLOT_NAME, namelen);
      if (namelen > 0 && memory.read(RemotePtr<void>(reinterpret_cast<uint64_t>(
                                         guestMsg.msg_name)),
                                     std::span<uint8_t>(name.begin(), namelen)) != 0) {
        return Answer::of(-EFAULT);
      }
    }
    if (gatherFromGuest(memory, iov, initIn(SLOT_DATA, total)) != 0) {
      return Answer::of(-EFAULT);
    }
    if (hasControl) {
      auto control = initIn(SLOT_CONTROL, controllen);
      if (memory.read(RemotePtr<void>(reinterpret_cast<uint64_t>(guestMsg.msg_control)),
                      std::span<uint8_t>(control.begin(), controllen)) != 0) {
        return Answer::of(-EFAULT);
      }
    }
  }
  KJ_ASSERT(inAt == in.size());

  // Out-buffers of recvmsg: the msghdr (for msg_namelen, msg_controllen, msg_flags), the name
  // (at least one byte, so a zero msg_namelen still has a non-NULL msg_name and gets the real
  // length back), the data trimmed to what was received, the control bytes.
  int outMsghdr = -1, outName = -1, outData = -1, outControl = -1;
  if (isRecv) {
    auto out = request.initOut(2 + (hasName ? 1 : 0) + (hasControl ? 1 : 0));
    uint at = 0;
    auto addOut = [&](uint8_t slot, size_t size, bool trim) {
      out[at].setArg(slot);
      out[at].setSize(static_cast<uint32_t>(size));
      out[at].setTrimToRet(trim);
      return static_cast<int>(at++);
    };
    outMsghdr = addOut(SLOT_MSGHDR, sizeof(struct msghdr), false);
    if (hasName) {
      outName = addOut(SLOT_NAME, kj::max(namelen, size_t(1)), false);
    }
    outData = addOut(SLOT_DATA, total, true);
    if (hasControl) {
      outControl = addOut(SLOT_CONTROL, controllen, false);
    }
  }

  auto pointers = request.initPointers(2 + (hasName ? 1 : 0) + (hasControl ? 1 : 0));
  uint pAt = 0;
  auto addPointer = [&](uint8_t into, size_t offset, uint8_t target) {
    pointers[pAt].setInto(into);
    pointers[pAt].setOffset(static_cast<uint32_t>(offset));
    pointers[pAt].setTarget(target);
    pAt++;
  };
  addPointer(SLOT_MSGHDR, offsetof(struct msghdr, msg_iov), SLOT_IOVEC);
  addPointer(SLOT_IOVEC, offsetof(struct iovec, iov_base), SLOT_DATA);
  if (hasName) {
    addPointer(SLOT_MSGHDR, offsetof(struct msghdr, msg_name), SLOT_NAME);
  }
  if (hasControl) {
    addPointer(SLOT_MSGHDR, offsetof(struct msghdr, msg_control), SLOT_CONTROL);
  }

  if (!idValid(notif.id)) {
    // The memory we read may belong to a task that is no longer the one that trapped.
    return Answer::drop();
  }
  KJ_IF_MAYBE(reply, callHome(message, notif.id)) {
    auto r = (*reply)->getRoot<proto::ToRemote>().getReply();
    int64_t ret = r.getRet();
    if (!isRecv || ret < 0) {
      return Answer::of(ret);
    }
    auto out = r.getOut();
    KJ_REQUIRE(out.size() == request.getOut().size(), "recvmsg reply lacks out-buffers",
               out.size(), request.getOut().size());
    if (!idValid(notif.id)) {
      return Answer::drop();
    }
    // The data, scattered over the guest's iovecs.
    auto bytes = out[outData];
    size_t have = kj::min(static_cast<size_t>(ret), bytes.size());
    if (scatterToGuest(memory, iov, bytes.slice(0, have)) != 0) {
      return Answer::of(-EFAULT);
    }
    struct msghdr result = {};
    auto resultBytes = out[outMsghdr];
    KJ_REQUIRE(resultBytes.size() == sizeof(result), "recvmsg reply has no msghdr",
               resultBytes.size());
    memcpy(&result, resultBytes.begin(), sizeof(result));
    auto field = [&](size_t offset, std::span<const uint8_t> value) {
      return memory.write(RemotePtr<void>(msgAddr + offset), value);
    };
    if (hasName) {
      // move_addr_to_user: min(the caller's length, the address's) bytes, then the real length.
      auto name = out[outName];
      size_t n = kj::min(kj::min(static_cast<size_t>(result.msg_namelen),
                                 static_cast<size_t>(guestNamelen)),
                         name.size());
      if (n > 0 && memory.write(RemotePtr<void>(reinterpret_cast<uint64_t>(guestMsg.msg_name)),
                                std::span<const uint8_t>(name.begin(), n)) != 0) {
        return Answer::of(-EFAULT);
      }
      socklen_t realLength = result.msg_namelen;
      if (field(offsetof(struct msghdr, msg_namelen), constBytesOf(realLength)) != 0) {
        return Answer::of(-EFAULT);
      }
    }
    size_t written = 0;
    if (hasControl) {
      auto control = out[outControl];
      written = kj::min(kj::min(result.msg_controllen, controllen), control.size());
      if (written > 0 &&
          memory.write(RemotePtr<void>(reinterpret_cast<uint64_t>(guestMsg.msg_control)),
                       std::span<const uint8_t>(control.begin(), written)) != 0) {
        return Answer::of(-EFAULT);
      }
    }
    int flags = result.msg_flags;
    if (field(offsetof(struct msghdr, msg_flags), constBytesOf(flags)) != 0 ||
        field(offsetof(struct msghdr, msg_controllen), constBytesOf(written)) != 0) {
      return Answer::of(-EFAULT);
    }
    return Answer::of(ret);
  }
  return Answer::interrupted(notif.data.nr);
}

}  // namespace mos::remote
