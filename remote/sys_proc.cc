// /proc/self views of the job: the files of /proc that describe a process's *user part* (its
// memory map, its command line, its environment) must describe the guest, not the deputy whose
// process holds the home pid (design brief, "the hard parts"). The supervisor reads them from
// the guest's own /proc entry on this node, puts home ids where the file shows ids, and hands
// the job a read-only snapshot: a memfd created at home in the job's fd table (so the descriptor
// number and close-on-exec are what open(2) would give).

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "marshal.h"
#include "supervisor.h"

namespace mos::remote {

namespace {

// Per-process files whose content belongs to the user part.
const std::set<std::string> GUEST_FILES = {"maps",   "smaps", "smaps_rollup", "statm", "status",
                                           "stat",   "cmdline", "comm",       "environ", "auxv",
                                           "numa_maps"};

// The first struct open_how (include/linux/fcntl.h OPEN_HOW_SIZE_VER0, kernel-internal).
constexpr size_t OPEN_HOW_SIZE_VER0_BYTES = 24;
static_assert(sizeof(struct open_how) == OPEN_HOW_SIZE_VER0_BYTES);

}  // namespace

std::string jobProcFile(const std::string& path, int32_t homePid) {
  std::string pid = std::to_string(homePid);
  // Longest first: /proc/self/ is a prefix of /proc/self/task/<pid>/.
  for (std::string prefix : {"/proc/self/task/" + pid + "/", "/proc/" + pid + "/task/" + pid + "/",
                             std::string("/proc/thread-self/"), std::string("/proc/self/"),
                             "/proc/" + pid + "/"}) {
    if (path.compare(0, prefix.size(), prefix) == 0) {
      std::string rest = path.substr(prefix.size());
      return GUEST_FILES.count(rest) ? rest : std::string();
    }
  }
  return std::string();
}

kj::Maybe<OpenCall> describeOpen(const ArgSpec (&specs)[6], const uint64_t (&args)[6],
                                 proto::SyscallRequest::Reader request) {
  int pathArg = 0;
  while (pathArg < 5 && specs[pathArg].kind != ArgKind::PATH) {
    pathArg++;
  }
  KJ_REQUIRE(specs[pathArg].kind == ArgKind::PATH, "not an open");
  OpenCall call;
  call.dirfd = pathArg > 0 && specs[pathArg - 1].kind == ArgKind::FD
                   ? static_cast<int32_t>(args[pathArg - 1])
                   : AT_FDCWD;
  bool havePath = false;
  bool haveHow = specs[pathArg + 1].kind != ArgKind::IN_BUF;
  if (haveHow) {
    call.flags = static_cast<int32_t>(args[pathArg + 1]);
  }
  for (auto in : request.getIn()) {
    auto bytes = in.getData();
    if (in.getArg() == pathArg) {
      call.path.assign(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
      call.path.resize(strnlen(call.path.c_str(), call.path.size()));  // PATH carries its NUL
      havePath = true;
    } else if (in.getArg() == pathArg + 1 && !haveHow) {
      // openat2(2): struct open_how {u64 flags, mode, resolve} and perhaps zeroed extensions.
      struct open_how how;
      if (bytes.size() < OPEN_HOW_SIZE_VER0_BYTES) {
        return nullptr;
      }
      memcpy(&how, bytes.begin(), sizeof(how));
      if (how.mode != 0 || (how.resolve & ~uint64_t(RESOLVE_NO_MAGICLINKS)) != 0 ||
          how.flags > UINT32_MAX) {
        return nullptr;
      }
      call.flags = static_cast<int>(how.flags);
      haveHow = true;
    }
  }
  if (!havePath || !haveHow) {
    return nullptr;
  }
  return kj::mv(call);
}

int64_t Supervisor::forwardPlain(uint64_t seq, int nr, std::initializer_list<uint64_t> args) {
  capnp::MallocMessageBuilder message;
  auto request = message.initRoot<proto::ToDeputy>().initSyscall();
  request.setSeq(seq);
  request.setNr(nr);
  auto list = request.initArgs(6);
  size_t i = 0;
  for (uint64_t a : args) {
    list.set(i++, a);
  }
  KJ_IF_MAYBE(reply, callHome(message, seq)) {
    return (*reply)->getRoot<proto::ToRemote>().getReply().getRet();
  }
  return -EINTR;
}

kj::Maybe<Answer> Supervisor::serveJobProcFile(const seccomp_notif& notif,
                                                const std::string& path, int dirfd, int flags) {
  if ((flags & O_ACCMODE) != O_RDONLY || (flags & (O_DIRECTORY | O_PATH | O_CREAT)) ||
      path.compare(0, 6, "/proc/") != 0 || (dirfd != AT_FDCWD && path[0] != '/')) {
    return nullptr;
  }
  auto ids = start_.getIds();
  std::string file = jobProcFile(path, ids.getPid());
  if (file.empty()) {
    return nullptr;
  }
  std::string content = guestProcess_->procFile(file);
  std::string guestPid = std::to_string(guest_);
  if (file == "maps" || file == "smaps" || file == "numa_maps") {
    // Mapped files show their home paths, not this node's cache files.
    for (auto& [cachePath, homePath] : homePaths_) {
      for (size_t at = content.find(cachePath); at != std::string::npos;
           at = content.find(cachePath, at + homePath.size())) {
        content.replace(at, cachePath.size(), homePath);
      }
    }
  } else if (file == "status") {
    // Ids are the job's home ids; the guest's tracer is none of the job's business.
    int64_t ppid = forwardPlain(notif.id, __NR_getppid, {});
    if (ppid == -EINTR) {
      return Answer::interrupted(notif.data.nr);
    }
    std::stringstream in(content), out;
    std::string line;
    while (std::getline(in, line)) {
      auto key = line.substr(0, line.find(':'));
      if (key == "Tgid" || key == "Pid" || key == "NStgid" || key == "NSpid") {
        line = fmt::format("{}:\t{}", key, ids.getPid());
      } else if (key == "PPid") {
        line = fmt::format("PPid:\t{}", ppid);
      } else if (key == "TracerPid") {
        line = "TracerPid:\t0";
      } else if (key == "Uid") {
        line = fmt::format("Uid:\t{}\t{}\t{}\t{}", ids.getUid(), ids.getEuid(), ids.getEuid(),
                           ids.getEuid());
      } else if (key == "Gid") {
        line = fmt::format("Gid:\t{}\t{}\t{}\t{}", ids.getGid(), ids.getEgid(), ids.getEgid(),
                           ids.getEgid());
      }
      out << line << '\n';
    }
    content = out.str();
  } else if (file == "stat") {
    // "pid (comm) state ppid pgrp session ...": pid and the ids after the comm are home ids.
    size_t close = content.rfind(')');
    if (close != std::string::npos) {
      std::stringstream rest(content.substr(close + 2));
      std::vector<std::string> fields;
      std::string f;
      while (rest >> f) {
        fields.push_back(f);
      }
      if (fields.size() > 3) {
        int64_t ids[3] = {forwardPlain(notif.id, __NR_getppid, {}),
                          forwardPlain(notif.id, __NR_getpgid, {0}),
                          forwardPlain(notif.id, __NR_getsid, {0})};
        for (int i = 0; i < 3; i++) {
          if (ids[i] == -EINTR) {
            return Answer::interrupted(notif.data.nr);
          }
          fields[i + 1] = std::to_string(ids[i]);
        }
      }
      std::string head = std::to_string(ids.getPid()) + content.substr(content.find(' '), close + 1 - content.find(' '));
      content = head;
      for (auto& field : fields) {
        content += " " + field;
      }
      content += "\n";
    }
  }
  // memfd_create + pwrite at home: the descriptor is the lowest free one of the job's table,
  // exactly as open(2) would have chosen.
  capnp::MallocMessageBuilder message;
  auto request = message.initRoot<proto::ToDeputy>().initSyscall();
  request.setSeq(notif.id);
  request.setNr(__NR_memfd_create);
  auto args = request.initArgs(6);
  args.set(1, (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
  auto in = request.initIn(1);
  in[0].setArg(0);
  std::string name = file + '\0';
  in[0].setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(name.data()), name.size()));
  int64_t fd;
  KJ_IF_MAYBE(reply, callHome(message, notif.id)) {
    fd = (*reply)->getRoot<proto::ToRemote>().getReply().getRet();
  } else {
    return Answer::interrupted(notif.data.nr);
  }
  if (fd < 0) {
    return Answer::of(fd);
  }
  capnp::MallocMessageBuilder writeMessage;
  auto write = writeMessage.initRoot<proto::ToDeputy>().initSyscall();
  write.setSeq(notif.id);
  write.setNr(__NR_pwrite64);
  auto wargs = write.initArgs(6);
  wargs.set(0, static_cast<uint64_t>(fd));
  wargs.set(2, content.size());
  auto win = write.initIn(1);
  win[0].setArg(1);
  win[0].setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(content.data()), content.size()));
  KJ_IF_MAYBE(reply, callHome(writeMessage, notif.id)) {
    int64_t n = (*reply)->getRoot<proto::ToRemote>().getReply().getRet();
    if (n != static_cast<int64_t>(content.size())) {
      spdlog::warn("job {}: writing the /proc/self/{} snapshot failed ({})", ids.getPid(), file, n);
    }
  }
  spdlog::debug("job {}: {} served from guest {}", ids.getPid(), path, guestPid);
  return Answer::of(fd);
}

}  // namespace mos::remote
