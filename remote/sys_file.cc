// File-family handlers of the supervisor: file-backed mmap from the content cache, and the
// vectored I/O calls flattened into one buffer.

#include <fcntl.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "marshal.h"
#include "supervisor.h"

namespace mos::remote {

int readGuestIovecs(GuestMemory& memory, uint64_t at, size_t count, std::vector<struct iovec>& iov,
                    size_t& total) {
  iov.resize(count);
  if (count > 0 &&
      memory.read(RemotePtr<void>(at), std::span<uint8_t>(reinterpret_cast<uint8_t*>(iov.data()),
                                                          count * sizeof(struct iovec))) != 0) {
    return EFAULT;
  }
  total = 0;
  for (auto& v : iov) {
    if (v.iov_len > SSIZE_MAX - total) {
      return EINVAL;
    }
    total += v.iov_len;
  }
  total = kj::min(total, MAX_FORWARD_BYTES);
  return 0;
}

int gatherFromGuest(GuestMemory& memory, const std::vector<struct iovec>& iov,
                    kj::ArrayPtr<kj::byte> bytes) {
  size_t done = 0;
  for (auto& v : iov) {
    size_t take = kj::min(v.iov_len, bytes.size() - done);
    if (take > 0 && memory.read(RemotePtr<void>(reinterpret_cast<uint64_t>(v.iov_base)),
                                std::span<uint8_t>(bytes.begin() + done, take)) != 0) {
      return EFAULT;
    }
    done += take;
  }
  return 0;
}

int scatterToGuest(GuestMemory& memory, const std::vector<struct iovec>& iov,
                   kj::ArrayPtr<const kj::byte> bytes) {
  size_t done = 0;
  for (auto& v : iov) {
    if (done >= bytes.size()) {
      break;
    }
    size_t take = kj::min(v.iov_len, bytes.size() - done);
    if (int err = memory.write(RemotePtr<void>(reinterpret_cast<uint64_t>(v.iov_base)),
                               std::span<const uint8_t>(bytes.begin() + done, take));
        err != 0) {
      return err;
    }
    done += take;
  }
  return 0;
}

kj::Maybe<std::string> Supervisor::fetchIntoCache(int fd, kj::ArrayPtr<const kj::byte> path,
                                                  int& err, proto::FileRef::Builder expected,
                                                  bool checkExpected) {
  auto ask = [&](bool wantData) -> kj::Maybe<kj::Own<capnp::MessageReader>> {
    uint64_t id = nextFetchId_++;
    capnp::MallocMessageBuilder message;
    auto fetch = message.initRoot<proto::ToDeputy>().initFetchFile();
    fetch.setId(id);
    fetch.setFd(fd);
    fetch.setPath(path);
    fetch.setWantData(wantData);
    channel_.send(message);
    return awaitMessage([id](proto::ToRemote::Reader m) {
      return m.isFileInfo() && m.getFileInfo().getId() == id;
    });
  };
  auto same = [](proto::FileRef::Reader a, proto::FileRef::Reader b) {
    return a.getDev() == b.getDev() && a.getIno() == b.getIno() && a.getSize() == b.getSize() &&
           a.getMtimeNs() == b.getMtimeNs();
  };
  if (!checkExpected) {
    // Identity first: a cache hit costs one small round trip and no data.
    KJ_IF_MAYBE (info, ask(false)) {
      auto fi = (*info)->getRoot<proto::ToRemote>().getFileInfo();
      if (fi.getErr() != 0) {
        err = fi.getErr();
        return nullptr;
      }
      expected.setPath(fi.getRef().getPath());
      expected.setDev(fi.getRef().getDev());
      expected.setIno(fi.getRef().getIno());
      expected.setSize(fi.getRef().getSize());
      expected.setMtimeNs(fi.getRef().getMtimeNs());
      expected.setMode(fi.getRef().getMode());
      if (!S_ISREG(fi.getRef().getMode())) {
        err = ENODEV;
        return nullptr;
      }
      KJ_IF_MAYBE (hit, cache_->lookup(expected.asReader())) {
        rememberHomePath(*hit, expected.getPath());
        return *hit;
      }
    } else {
      endJob(0);
    }
  }
  KJ_IF_MAYBE (info, ask(true)) {
    auto fi = (*info)->getRoot<proto::ToRemote>().getFileInfo();
    if (fi.getErr() != 0) {
      err = fi.getErr();
      return nullptr;
    }
    uint64_t id = fi.getId();
    if (!same(fi.getRef(), expected.asReader())) {
      // The file changed at home since it was identified: its bytes are not the ones wanted.
      err = checkExpected ? ESTALE : EAGAIN;
      // Drain its data.
      for (;;) {
        KJ_IF_MAYBE (chunk, awaitMessage([id](proto::ToRemote::Reader m) {
                       return m.isFileData() && m.getFileData().getId() == id;
                     })) {
          if ((*chunk)->getRoot<proto::ToRemote>().getFileData().getLast()) {
            break;
          }
        } else {
          endJob(0);
        }
      }
      return nullptr;
    }
    std::string stored = cache_->store(fi.getRef(), [&](int out) {
      for (;;) {
        KJ_IF_MAYBE (chunk, awaitMessage([id](proto::ToRemote::Reader m) {
                       return m.isFileData() && m.getFileData().getId() == id;
                     })) {
          auto data = (*chunk)->getRoot<proto::ToRemote>().getFileData();
          auto bytes = data.getData();
          size_t done = 0;
          while (done < bytes.size()) {
            ssize_t n;
            KJ_SYSCALL(n = pwrite(out, bytes.begin() + done, bytes.size() - done,
                                  data.getOffset() + done));
            done += n;
          }
          if (data.getLast()) {
            return;
          }
        } else {
          endJob(0);
        }
      }
    });
    rememberHomePath(stored, fi.getRef().getPath());
    return stored;
  }
  endJob(0);
}

// mmap(2) of a descriptor: the descriptor lives at home, so the file is mapped from its copy in
// the content cache (design decision 6). The cached file is installed into the guest's own fd
// table at the same number (SECCOMP_IOCTL_NOTIF_ADDFD with SETFD; the guest's local table holds
// nothing else, every fd it uses is forwarded), and the kernel then runs the guest's own mmap
// (SECCOMP_USER_NOTIF_FLAG_CONTINUE: mmap's arguments are values, not pointers, so no TOCTOU).
// Shared writable file mappings cannot be coherent across nodes: the job is brought home, where
// the call is issued again (bringHome); ENODEV when it cannot move (locked, threads).
Answer Supervisor::handleMmap(const seccomp_notif& notif) {
  uint64_t flags = notif.data.args[3];
  uint64_t prot = notif.data.args[2];
  int fd = static_cast<int32_t>(notif.data.args[4]);
  if (flags & MAP_ANONYMOUS) {
    return Answer::cont();
  }
  if (fd < 0) {
    return Answer::of(-EBADF);
  }
  int mapType = flags & MAP_TYPE;
  if ((mapType == MAP_SHARED || mapType == MAP_SHARED_VALIDATE) && (prot & PROT_WRITE)) {
    // The kernel's own checks come first (mmap(2)): a descriptor not open for writing is EACCES.
    int64_t openFlags = forwardPlain(notif.id, __NR_fcntl, {static_cast<uint64_t>(fd), F_GETFL});
    if (openFlags < 0) {
      return openFlags == -EINTR ? Answer::interrupted(notif.data.nr) : Answer::of(openFlags);
    }
    if ((openFlags & O_ACCMODE) != O_RDWR) {
      return Answer::of(-EACCES);
    }
    KJ_IF_MAYBE (restart, bringHome(notif, "it maps a file shared and writable")) {
      return *restart;
    }
    if (record_.get() != nullptr) {
      setStayReason(record_.get()->stats, "a shared writable file mapping (refused here)");
    }
    return handleUnsupported(notif, ENODEV, "shared writable file mappings stay at home");
  }
  int err = 0;
  capnp::MallocMessageBuilder refMessage;
  auto ref = refMessage.initRoot<proto::FileRef>();
  std::string local;
  KJ_IF_MAYBE (path, fetchIntoCache(fd, nullptr, err, ref, false)) {
    local = *path;
  } else {
    return Answer::of(-err);
  }
  int cached = open(local.c_str(), O_RDONLY | O_CLOEXEC);
  if (cached < 0) {
    spdlog::error("cache file {} vanished: {}", local, strerror(errno));
    return Answer::of(-EIO);
  }
  kj::AutoCloseFd owned(cached);
  struct seccomp_notif_addfd addfd = {};
  addfd.id = notif.id;
  addfd.flags = SECCOMP_ADDFD_FLAG_SETFD;
  addfd.srcfd = cached;
  addfd.newfd = fd;
  addfd.newfd_flags = O_CLOEXEC;
  if (int placed = unotify_->addFd(addfd); placed < 0) {
    if (placed == -ENOENT) {
      return Answer::drop();
    }
    spdlog::warn("job {}: cannot place the cached file at guest fd {}: {}",
                 start_.getIds().getPid(), fd, strerror(-placed));
    return Answer::of(-EMFILE);
  }
  return Answer::cont();
}

// readv(2), writev(2), preadv(2), pwritev(2), preadv2(2), pwritev2(2): the iovec array is read
// here and the call forwarded as one read/write/pread64/pwrite64 of the concatenated bytes
// (the same bytes, and for pipes the same atomicity up to PIPE_BUF).
Answer Supervisor::handleIov(const seccomp_notif& notif) {
  int nr = notif.data.nr;
  bool isRead = nr == __NR_readv || nr == __NR_preadv || nr == __NR_preadv2;
  bool positioned = nr != __NR_readv && nr != __NR_writev;
  uint64_t iovAddr = notif.data.args[1];
  uint64_t count = notif.data.args[2];
  int64_t offset = static_cast<int64_t>(notif.data.args[3]);
  if (positioned && offset == -1 && (nr == __NR_preadv2 || nr == __NR_pwritev2)) {
    positioned = false;  // preadv2/pwritev2 with offset -1 use the file position
  }
  if (count > IOV_MAX) {
    return Answer::of(-EINVAL);
  }
  GuestMemory& memory = guestProcess_->memory();
  std::vector<struct iovec> iov;
  size_t total;
  if (int err = readGuestIovecs(memory, iovAddr, count, iov, total); err != 0) {
    return Answer::of(-err);
  }
  capnp::MallocMessageBuilder message;
  auto request = message.initRoot<proto::ToDeputy>().initSyscall();
  request.setSeq(notif.id);
  auto args = request.initArgs(6);
  args.set(0, notif.data.args[0]);
  args.set(2, total);
  args.set(3, positioned ? offset : 0);
  if (isRead) {
    request.setNr(positioned ? __NR_pread64 : __NR_read);
    auto out = request.initOut(1);
    out[0].setArg(1);
    out[0].setSize(total);
  } else {
    request.setNr(positioned ? __NR_pwrite64 : __NR_write);
    auto in = request.initIn(1);
    in[0].setArg(1);
    if (gatherFromGuest(memory, iov, in[0].initData(total)) != 0) {
      return Answer::of(-EFAULT);
    }
    if (!idValid(notif.id)) {
      return Answer::drop();
    }
  }
  KJ_IF_MAYBE (reply, callHome(message, notif.id)) {
    auto r = (*reply)->getRoot<proto::ToRemote>().getReply();
    int64_t ret = r.getRet();
    if (isRead && ret > 0 && r.getOut().size() == 1) {
      auto bytes = r.getOut()[0];
      size_t have = kj::min(static_cast<size_t>(ret), bytes.size());
      if (!idValid(notif.id)) {
        return Answer::drop();
      }
      if (scatterToGuest(memory, iov, bytes.slice(0, have)) != 0) {
        return Answer::of(-EFAULT);
      }
    }
    return Answer::of(ret);
  }
  return Answer::interrupted(notif.data.nr);
}

}  // namespace mos::remote
