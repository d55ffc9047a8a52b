// Memory shared between the processes of a job, on the node where they run (docs/design.md,
// "Memory shared between job processes"): the job's /dev/shm is a directory of the job on this
// node, memfds are made here, and their descriptors are node-local (runtime/syscall_table.h,
// OnNode): the guest's own fd table holds the file, the home fd table a placeholder memfd at the
// same number. System V IPC needs nothing here: it runs in the guest's kernel, in the job's IPC
// namespace (pid_namespace.cc).

#include <fcntl.h>
#include <linux/seccomp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <map>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "marshal.h"
#include "supervisor.h"

namespace mos::remote {

std::string jobShmName(std::string_view path) {
  constexpr std::string_view PREFIX = "/dev/shm/";
  if (path.substr(0, PREFIX.size()) != PREFIX) {
    return "";
  }
  std::string_view name = path.substr(PREFIX.size());
  if (name.empty() || name.find('/') != std::string_view::npos || name == "." || name == "..") {
    return "";
  }
  return std::string(name);
}

const std::string& Supervisor::jobShmDir() {
  if (!options_.shmDir.empty() && !shmDirMade_) {
    makeDirectories(options_.shmDir);
    chmod(options_.shmDir.c_str(), 0700);
    shmDirMade_ = true;
  }
  return options_.shmDir;
}

int Supervisor::copyGuestFd(int fd) {
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, guestProcess_->pid(), 0));
  if (pidfd < 0) {
    return -errno;
  }
  int copy = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, fd, 0));
  int err = errno;
  close(pidfd);
  return copy < 0 ? -err : copy;
}

int64_t Supervisor::placeholderAtHome(uint64_t seq, const std::string& name, bool cloexec) {
  capnp::MallocMessageBuilder message;
  auto request = message.initRoot<proto::ToDeputy>().initSyscall();
  request.setSeq(seq);
  request.setNr(__NR_memfd_create);
  auto args = request.initArgs(6);
  args.set(1, cloexec ? MFD_CLOEXEC : 0);
  auto in = request.initIn(1);
  in[0].setArg(0);
  std::string bytes = name.substr(0, 249) + '\0';  // memfd names: at most 249 bytes
  in[0].setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
  KJ_IF_MAYBE (reply, callHome(message, seq)) {
    return (*reply)->getRoot<proto::ToRemote>().getReply().getRet();
  }
  return -EINTR;
}

Answer Supervisor::installNodeFd(const seccomp_notif& notif, int local, const std::string& name,
                                 bool cloexec) {
  kj::AutoCloseFd owned(local);
  int64_t number = placeholderAtHome(notif.id, name, cloexec);
  if (number == -EINTR) {
    return Answer::interrupted(notif.data.nr);
  }
  if (number < 0) {
    return Answer::of(number);
  }
  struct seccomp_notif_addfd addfd = {};
  addfd.id = notif.id;
  addfd.flags = SECCOMP_ADDFD_FLAG_SETFD;
  addfd.srcfd = local;
  addfd.newfd = static_cast<uint32_t>(number);
  addfd.newfd_flags = cloexec ? O_CLOEXEC : 0;
  if (int placed = unotify_->addFd(addfd); placed < 0) {
    // The guest is gone or interrupted: the placeholder must not outlive the attempt.
    (void)forwardPlain(notif.id, __NR_close, {static_cast<uint64_t>(number)});
    if (placed == -ENOENT) {
      return Answer::drop();
    }
    return Answer::of(-EMFILE);
  }
  nodeFds_.insert(static_cast<int>(number));
  return Answer::of(number);
}

// memfd_create(2): made here, so the guest's mappings of it are shared with its forks on this
// node; a memfd of the same name at home holds the descriptor number.
Answer Supervisor::handleMemfd(const seccomp_notif& notif) {
  std::string name;
  if (int err = guestProcess_->memory().readString(RemotePtr<char>(notif.data.args[0]), 250, name);
      err != 0) {
    return Answer::of(err == ENAMETOOLONG ? -EINVAL : -err);
  }
  unsigned flags = static_cast<unsigned>(notif.data.args[1]);
  if (!idValid(notif.id)) {
    return Answer::drop();
  }
  int local = static_cast<int>(syscall(SYS_memfd_create, name.c_str(), flags | MFD_CLOEXEC));
  if (local < 0) {
    return Answer::of(-errno);
  }
  // The guest's stat shows the job's owner, as at home.
  (void)fchown(local, start_.getIds().getEuid(), start_.getIds().getEgid());
  return installNodeFd(notif, local, name, (flags & MFD_CLOEXEC) != 0);
}

kj::Maybe<Answer> Supervisor::routeNodeFd(const seccomp_notif& notif, const SyscallEntry& entry) {
  auto isNodeFd = [&](uint64_t value) {
    int fd = static_cast<int32_t>(value);
    return fd >= 0 && nodeFds_.count(fd) > 0;
  };
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = notif.data.args[i];
  }
  int nr = notif.data.nr;
  switch (entry.onNode) {
    case OnNode::NONE: return nullptr;
    case OnNode::CLOSE: {
      bool mine = nr == __NR_close ? isNodeFd(args[0]) : false;
      uint64_t last = nr == __NR_close ? args[0] : args[1];
      if (nr == __NR_close_range) {
        for (int fd : nodeFds_) {
          mine =
              mine || (static_cast<uint64_t>(fd) >= args[0] && static_cast<uint64_t>(fd) <= last);
        }
      }
      if (!mine) {
        return nullptr;
      }
      // The placeholder first; then the guest's kernel closes its file (CONTINUE).
      int64_t ret = nr == __NR_close ? forwardPlain(notif.id, nr, {args[0]})
                                     : forwardPlain(notif.id, nr, {args[0], args[1], args[2]});
      if (ret == -EINTR) {
        return Answer::interrupted(nr);
      }
      if (ret < 0) {
        return Answer::of(ret);
      }
      if (nr == __NR_close_range && (args[2] & CLOSE_RANGE_CLOEXEC) == 0) {
        for (auto it = nodeFds_.begin(); it != nodeFds_.end();) {
          bool closed = static_cast<uint64_t>(*it) >= args[0] && static_cast<uint64_t>(*it) <= last;
          it = closed ? nodeFds_.erase(it) : std::next(it);
        }
      } else if (nr == __NR_close) {
        nodeFds_.erase(static_cast<int>(args[0]));
      }
      return Answer::cont();
    }
    case OnNode::DUP: {
      bool dupCommand = nr != __NR_fcntl || args[1] == F_DUPFD || args[1] == F_DUPFD_CLOEXEC;
      if (!isNodeFd(args[0])) {
        if ((nr == __NR_dup2 || nr == __NR_dup3) && isNodeFd(args[1])) {
          // A home descriptor over a node-local one: the node's file is simply forgotten (its
          // number in the guest's table is a shadow nothing uses, like the mmap cache files).
          Answer answer = forwardRegular(notif, entry.args);
          if (answer.kind == Answer::VALUE && answer.value >= 0) {
            nodeFds_.erase(static_cast<int>(args[1]));
          }
          return answer;
        }
        return nullptr;
      }
      if (!dupCommand) {
        return Answer::cont();  // fcntl's other commands: the guest's kernel, on its file
      }
      if ((nr == __NR_dup2 || nr == __NR_dup3) && args[0] == args[1]) {
        return nr == __NR_dup3 ? Answer::of(-EINVAL) : Answer::of(static_cast<int64_t>(args[0]));
      }
      int64_t number = nr == __NR_dup ? forwardPlain(notif.id, nr, {args[0]})
                                      : forwardPlain(notif.id, nr, {args[0], args[1], args[2]});
      if (number == -EINTR) {
        return Answer::interrupted(nr);
      }
      if (number < 0) {
        return Answer::of(number);
      }
      bool cloexec = (nr == __NR_fcntl && args[1] == F_DUPFD_CLOEXEC) ||
                     (nr == __NR_dup3 && (args[2] & O_CLOEXEC) != 0);
      int copy = copyGuestFd(static_cast<int>(args[0]));
      if (copy < 0) {
        (void)forwardPlain(notif.id, __NR_close, {static_cast<uint64_t>(number)});
        return Answer::of(copy);
      }
      kj::AutoCloseFd owned(copy);
      struct seccomp_notif_addfd addfd = {};
      addfd.id = notif.id;
      addfd.flags = SECCOMP_ADDFD_FLAG_SETFD;
      addfd.srcfd = copy;
      addfd.newfd = static_cast<uint32_t>(number);
      addfd.newfd_flags = cloexec ? O_CLOEXEC : 0;
      if (int placed = unotify_->addFd(addfd); placed < 0) {
        (void)forwardPlain(notif.id, __NR_close, {static_cast<uint64_t>(number)});
        return placed == -ENOENT ? Answer::drop() : Answer::of(-EMFILE);
      }
      nodeFds_.insert(static_cast<int>(number));
      return Answer::of(number);
    }
    case OnNode::KERNEL: {
      int local = 0, home = 0;
      for (int i = 0; i < 6; i++) {
        if (entry.args[i].kind == ArgKind::FD) {
          (isNodeFd(args[i]) ? local : home)++;
        }
      }
      if (local == 0) {
        return nullptr;
      }
      if (home > 0) {
        return handleUnsupported(notif, EXDEV, "a node-local descriptor with a home one");
      }
      return Answer::cont();
    }
    case OnNode::RELATIVE_REFUSED:
    case OnNode::SHM_PATH:
    case OnNode::SHM_OPEN: {
      // A path relative to a node-local descriptor (the FD right before a PATH): absolute paths
      // ignore it and are routed as usual.
      for (int i = 0; i + 1 < 6; i++) {
        if (entry.args[i].kind != ArgKind::FD || entry.args[i + 1].kind != ArgKind::PATH ||
            !isNodeFd(args[i])) {
          continue;
        }
        std::string path;
        if (int err =
                guestProcess_->memory().readString(RemotePtr<char>(args[i + 1]), PATH_MAX, path);
            err != 0) {
          return Answer::of(-err);
        }
        if (!path.empty() && path[0] == '/') {
          continue;
        }
        if (!path.empty()) {
          return Answer::of(-ENOTDIR);
        }
        if (nr != __NR_newfstatat && nr != __NR_statx) {
          return Answer::of(-ENOENT);
        }
        return nullptr;  // fstat through AT_EMPTY_PATH: runJobShmCall below, on our copy
      }
      return nullptr;
    }
  }
  return nullptr;
}

kj::Maybe<Answer> Supervisor::runJobShmCall(const seccomp_notif& notif, const SyscallEntry& entry,
                                            const ArgSpec (&specs)[6],
                                            proto::SyscallRequest::Reader request) {
  if (options_.shmDir.empty()) {
    return nullptr;
  }
  // The common case first, without allocating: no path of the job's /dev/shm, no empty path.
  bool mine = false;
  for (auto in : request.getIn()) {
    auto data = in.getData();
    mine = mine ||
           (in.getArg() < 6 && specs[in.getArg()].kind == ArgKind::PATH &&
            (data.size() <= 1 || (data.size() > 9 && memcmp(data.begin(), "/dev/shm/", 9) == 0)));
  }
  if (!mine) {
    return nullptr;
  }
  int nr = notif.data.nr;
  uint64_t guestArgs[6];
  for (int i = 0; i < 6; i++) {
    guestArgs[i] = notif.data.args[i];
  }
  // Which paths are the job's /dev/shm, which are home paths; which descriptors are ours.
  std::map<int, uint64_t> replace;
  std::vector<std::string> paths;
  paths.reserve(6);
  std::vector<kj::AutoCloseFd> copies;
  int shm = 0, home = 0;
  for (auto in : request.getIn()) {
    int arg = in.getArg();
    if (arg >= 6 || specs[arg].kind != ArgKind::PATH) {
      continue;
    }
    auto data = in.getData();
    std::string path(reinterpret_cast<const char*>(data.begin()), data.size());
    path.resize(strnlen(path.c_str(), path.size()));
    bool dirIsNode = arg > 0 && specs[arg - 1].kind == ArgKind::FD &&
                     nodeFds_.count(static_cast<int32_t>(guestArgs[arg - 1])) > 0;
    if (path.empty() && dirIsNode) {
      int copy = copyGuestFd(static_cast<int32_t>(guestArgs[arg - 1]));
      if (copy < 0) {
        return Answer::of(copy);
      }
      copies.emplace_back(copy);
      replace[arg - 1] = static_cast<uint64_t>(copy);
      shm++;
      continue;
    }
    std::string name = jobShmName(path);
    if (name.empty()) {
      home++;
      continue;
    }
    shm++;
    paths.push_back(jobShmDir() + "/" + name);
    replace[arg] = reinterpret_cast<uint64_t>(paths.back().c_str());
    if (arg > 0 && specs[arg - 1].kind == ArgKind::FD) {
      replace[arg - 1] = static_cast<uint64_t>(AT_FDCWD);
    }
  }
  if (shm == 0) {
    return nullptr;
  }
  if (home > 0) {
    return Answer::of(-EXDEV);  // /dev/shm is a file system of its own at home too
  }
  if (entry.onNode == OnNode::SHM_OPEN) {
    KJ_IF_MAYBE (open, describeOpen(specs, guestArgs, request)) {
      int mode = nr == __NR_open     ? static_cast<int>(guestArgs[2])
                 : nr == __NR_openat ? static_cast<int>(guestArgs[3])
                                     : 0;
      std::string name = jobShmName(open->path);
      if (name.empty()) {
        return Answer::of(-ENOENT);  // an empty path on a node-local descriptor
      }
      int local = ::open(paths.front().c_str(), open->flags | O_CLOEXEC | O_NOFOLLOW, mode & 07777);
      if (local < 0) {
        return Answer::of(-errno);
      }
      // Files of the job's /dev/shm are the job owner's, as at home (not the root that made them
      // here), so stat and fstat show the owner's ids.
      struct stat st;
      auto ids = start_.getIds();
      if (fstat(local, &st) == 0 && st.st_uid != ids.getEuid()) {
        (void)fchown(local, ids.getEuid(), ids.getEgid());  // created now, by us
      }
      return installNodeFd(notif, local, open->path, (open->flags & O_CLOEXEC) != 0);
    }
    return nullptr;  // openat2 with more than flags: home
  }
  // The call itself, here, with the request's buffers in place of the guest's memory.
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = request.getArgs()[i];
  }
  std::vector<std::vector<uint8_t>> ins, outs;
  ins.reserve(request.getIn().size());
  outs.reserve(request.getOut().size());
  for (auto in : request.getIn()) {
    if (in.getArg() >= 6) {
      return Answer::of(-EINVAL);
    }
    ins.emplace_back(in.getData().begin(), in.getData().end());
    ins.back().push_back(0);
    args[in.getArg()] = reinterpret_cast<uint64_t>(ins.back().data());
  }
  for (auto out : request.getOut()) {
    if (out.getArg() >= 6) {
      return Answer::of(-EINVAL);
    }
    outs.emplace_back(out.getSize(), 0);
    args[out.getArg()] = reinterpret_cast<uint64_t>(outs.back().data());
  }
  for (auto [arg, value] : replace) {
    args[arg] = value;
  }
  int64_t ret = syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]);
  if (ret < 0) {
    ret = -errno;
  }
  capnp::MallocMessageBuilder replyMessage;
  auto reply = replyMessage.initRoot<proto::SyscallReply>();
  reply.setSeq(notif.id);
  reply.setRet(ret);
  auto outList = reply.initOut(outs.size());
  for (size_t k = 0; k < outs.size(); k++) {
    if (ret >= 0) {
      outList.set(k, kj::arrayPtr(outs[k].data(), outs[k].size()));
    }
  }
  if (outs.size() > 0 && !idValid(notif.id)) {
    return Answer::drop();
  }
  return Answer::of(
      unmarshalReply(nr, specs, guestArgs, reply.asReader(), guestProcess_->memory()));
}

}  // namespace mos::remote
