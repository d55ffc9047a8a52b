#include "supervisor.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <capnp/message.h>
#include <catch2/catch.hpp>

using mos::remote::jobProcFile;

TEST_CASE("the job's own /proc files are recognised under every name of the job",
          "[remote][proc]") {
  CHECK(jobProcFile("/proc/self/maps", 4242) == "maps");
  CHECK(jobProcFile("/proc/thread-self/status", 4242) == "status");
  CHECK(jobProcFile("/proc/4242/cmdline", 4242) == "cmdline");
  CHECK(jobProcFile("/proc/4242/task/4242/stat", 4242) == "stat");
  CHECK(jobProcFile("/proc/self/task/4242/smaps", 4242) == "smaps");
}

TEST_CASE("other /proc files and other processes stay at home", "[remote][proc]") {
  // Files that are right at home: the deputy is the job's home process.
  CHECK(jobProcFile("/proc/self/fd", 4242) == "");
  CHECK(jobProcFile("/proc/self/limits", 4242) == "");
  CHECK(jobProcFile("/proc/self/mountinfo", 4242) == "");
  // Another process, a prefix of the pid, and non-/proc paths.
  CHECK(jobProcFile("/proc/1/maps", 4242) == "");
  CHECK(jobProcFile("/proc/424/maps", 4242) == "");
  CHECK(jobProcFile("/proc/42420/maps", 4242) == "");
  CHECK(jobProcFile("/srv/proc/self/maps", 4242) == "");
  CHECK(jobProcFile("/proc/self/maps/x", 4242) == "");
}

TEST_CASE("interrupted calls answer the restart code of their native counterpart",
          "[remote][signal]") {
  CHECK(mos::restartCode(__NR_read) == mos::ERESTARTSYS);
  CHECK(mos::restartCode(__NR_wait4) == mos::ERESTARTSYS);
  CHECK(mos::restartCode(__NR_poll) == mos::ERESTARTNOHAND);
  CHECK(mos::restartCode(__NR_ppoll) == mos::ERESTARTNOHAND);
  CHECK(mos::restartCode(__NR_select) == mos::ERESTARTNOHAND);
  CHECK(mos::restartCode(__NR_pselect6) == mos::ERESTARTNOHAND);
  CHECK(mos::restartCode(__NR_epoll_wait) == mos::ERESTARTNOHAND);
  CHECK(mos::restartCode(__NR_epoll_pwait2) == mos::ERESTARTNOHAND);
  CHECK(mos::remote::Answer::interrupted(__NR_read).value == -512);
  CHECK(mos::remote::Answer::interrupted(__NR_poll).value == -514);
  // A handler's own round trips answer with the row of the guest's call (mmap's F_GETFL).
  CHECK(mos::remote::Answer::interrupted(__NR_mmap).value == -512);
}

namespace {

// A marshalled open request: `path` (with its NUL) at argument `pathArg`, and for openat2 an
// open_how at argument pathArg + 1.
kj::Own<capnp::MallocMessageBuilder> openRequest(uint8_t pathArg, const std::string& path,
                                                 const std::string* how = nullptr) {
  auto message = kj::heap<capnp::MallocMessageBuilder>();
  auto request = message->initRoot<mos::proto::SyscallRequest>();
  auto in = request.initIn(how != nullptr ? 2 : 1);
  std::string withNul = path + '\0';
  in[0].setArg(pathArg);
  in[0].setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(withNul.data()), withNul.size()));
  if (how != nullptr) {
    in[1].setArg(pathArg + 1);
    in[1].setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(how->data()), how->size()));
  }
  return message;
}

std::string howBytes(uint64_t flags, uint64_t mode, uint64_t resolve) {
  struct open_how how = {flags, mode, resolve};
  return std::string(reinterpret_cast<const char*>(&how), sizeof(how));
}

}  // namespace

TEST_CASE("opens of the job's /proc files are recognised from the row's kinds, openat2 too",
          "[remote][proc]") {
  using mos::remote::describeOpen;
  const auto* open = mos::findSyscall(__NR_open);
  const auto* openat = mos::findSyscall(__NR_openat);
  const auto* openat2 = mos::findSyscall(__NR_openat2);
  REQUIRE(open->handler == mos::HandlerId::OPEN);
  REQUIRE(openat->handler == mos::HandlerId::OPEN);
  REQUIRE(openat2->handler == mos::HandlerId::OPEN);

  uint64_t a1[6] = {0x1000, O_RDONLY | O_CLOEXEC, 0};
  auto m1 = openRequest(0, "/proc/self/maps");
  KJ_IF_MAYBE (call, describeOpen(open->args, a1, m1->getRoot<mos::proto::SyscallRequest>())) {
    CHECK(call->path == "/proc/self/maps");
    CHECK(call->dirfd == AT_FDCWD);
    CHECK(call->flags == (O_RDONLY | O_CLOEXEC));
  } else {
    FAIL("open not described");
  }

  uint64_t a2[6] = {7, 0x1000, O_RDONLY, 0};
  auto m2 = openRequest(1, "/proc/self/status");
  KJ_IF_MAYBE (call, describeOpen(openat->args, a2, m2->getRoot<mos::proto::SyscallRequest>())) {
    CHECK(call->path == "/proc/self/status");
    CHECK(call->dirfd == 7);
    CHECK(call->flags == O_RDONLY);
  } else {
    FAIL("openat not described");
  }

  std::string how = howBytes(O_RDONLY | O_CLOEXEC, 0, 0);
  uint64_t a3[6] = {uint64_t(AT_FDCWD), 0x1000, 0x2000, how.size()};
  auto m3 = openRequest(1, "/proc/self/maps", &how);
  KJ_IF_MAYBE (call, describeOpen(openat2->args, a3, m3->getRoot<mos::proto::SyscallRequest>())) {
    CHECK(call->path == "/proc/self/maps");
    CHECK(call->dirfd == AT_FDCWD);
    CHECK(call->flags == (O_RDONLY | O_CLOEXEC));
  } else {
    FAIL("openat2 not described");
  }

  // An open_how that asks for more than flags travels home as it is.
  for (auto other : {howBytes(O_RDONLY, 0600, 0), howBytes(O_RDONLY, 0, RESOLVE_BENEATH),
                     howBytes(uint64_t(1) << 40, 0, 0), how.substr(0, 16)}) {
    auto m = openRequest(1, "/proc/self/maps", &other);
    CHECK(describeOpen(openat2->args, a3, m->getRoot<mos::proto::SyscallRequest>()) == nullptr);
  }
}

TEST_CASE("signal masks are read from /proc status lines", "[remote][signal]") {
  sigset_t set, old;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  REQUIRE(sigprocmask(SIG_BLOCK, &set, &old) == 0);
  std::string status = mos::remote::readStatus(getpid());
  uint64_t blocked = mos::remote::statusMask(status, "SigBlk:");
  REQUIRE(sigprocmask(SIG_SETMASK, &old, nullptr) == 0);
  CHECK((blocked & (uint64_t{1} << (SIGUSR1 - 1))) != 0);
  CHECK(mos::remote::statusMask(status, "NoSuchKey:") == 0);
  CHECK(mos::remote::readStatus(-5) == "");
}

TEST_CASE("names of the job's /dev/shm are flat names right under /dev/shm/", "[remote][shm]") {
  using mos::remote::jobShmName;
  CHECK(jobShmName("/dev/shm/sem.mp-x1") == "sem.mp-x1");
  CHECK(jobShmName("/dev/shm/umosix-sc-shm-42") == "umosix-sc-shm-42");
  // Not the job's: /dev/shm itself, subdirectories, dot names, other places, relative paths.
  CHECK(jobShmName("/dev/shm") == "");
  CHECK(jobShmName("/dev/shm/") == "");
  CHECK(jobShmName("/dev/shm/a/b") == "");
  CHECK(jobShmName("/dev/shm/.") == "");
  CHECK(jobShmName("/dev/shm/..") == "");
  CHECK(jobShmName("/dev/shmx/a") == "");
  CHECK(jobShmName("/tmp/dev/shm/a") == "");
  CHECK(jobShmName("dev/shm/a") == "");
}
