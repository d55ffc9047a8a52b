// restore(): rebuilds a migration image in a fresh stub by ptrace syscall injection
// (notes/migration.md §4.3 shape A). Stages, in order:
//   1. validate the image and resolve its files (nothing forked yet);
//   2. fork; the child execs the embedded stub (stub.S) from a memfd under PTRACE_TRACEME;
//   3. unmap everything of the stub but its own text and scratch (stack, vDSO, vvars);
//   4. map every image mapping at its address, write the captured pages through /proc/PID/mem;
//   5. ARCH_MAP_VDSO_64 so this kernel's vDSO lands where the image had it, and check it did;
//   6. PR_SET_MM_MAP (mm layout, auxv), rseq registration, SIG_IGN dispositions;
//   7. drop privileges, re-arm PR_SET_PDEATHSIG (a credential change clears it), dumpable;
//   8. no_new_privs + seccomp filter with a listener, fetched with pidfd_getfd; the injected
//      close() of the stub's copy may itself be trapped, so its notification is answered;
//   9. munmap of the stub's own pages, caught at its syscall-exit stop; final registers, xsave,
//      signal mask; PTRACE_DETACH.
#include <fcntl.h>
#include <linux/prctl.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>

#include <kj/debug.h>

#include "image_internal.h"
#include "migrate.h"
#include "proc_maps.h"
#include "ptrace_task.h"

#ifndef ARCH_MAP_VDSO_64
#define ARCH_MAP_VDSO_64 0x2003
#endif

namespace mos::migrate {

extern const uint8_t STUB_IMAGE[];
extern const size_t STUB_IMAGE_SIZE;

namespace {

constexpr uint64_t PAGE = 4096;
// Where stub.S is linked (libmigrate/meson.build); images may not use this range.
constexpr uint64_t STUB_BASE = 0x3f0000000000ull;
constexpr uint64_t STUB_LIMIT = STUB_BASE + (1ull << 30);
constexpr uint64_t SCRATCH_SIZE = 131072;  // the stub's .bss

using FileKey = std::tuple<std::string, uint64_t, uint64_t>;  // path, dev, ino

FileKey keyOf(proto::FileRef::Reader ref) {
  auto p = ref.getPath();
  return {std::string(reinterpret_cast<const char*>(p.begin()), p.size()), ref.getDev(),
          ref.getIno()};
}

bool isVdsoKind(proto::Mapping::Kind k) {
  return k == proto::Mapping::Kind::VDSO || k == proto::Mapping::Kind::VVAR ||
         k == proto::Mapping::Kind::VVAR_VCLOCK;
}

VdsoLayout imageLayout(proto::MigrationImage::Reader image) {
  VdsoLayout l;
  uint64_t low = ~0ull;
  for (auto m : image.getMappings()) {
    if (m.getKind() == proto::Mapping::Kind::VDSO) {
      l.vdsoStart = m.getStart();
      l.vdsoSize = m.getEnd() - m.getStart();
    }
    if (isVdsoKind(m.getKind())) {
      low = std::min(low, m.getStart());
    }
  }
  l.areaStart = l.present() ? low : 0;
  return l;
}

// XSAVE "software reserved" bytes 464..471 of the UABI buffer hold the xfeatures mask (XCR0).
uint64_t xfeatures(std::span<const uint8_t> xstate) {
  uint64_t v = 0;
  if (xstate.size() >= 472) {
    memcpy(&v, xstate.data() + 464, 8);
  }
  return v;
}

}  // namespace

RestoredGuest restore(proto::MigrationImage::Reader image, const FileResolver& files,
                      const RestoreOptions& options) {
  // 1. Validate and resolve.
  KJ_REQUIRE(image.getArch() == "x86_64", "restore: image is not x86_64", image.getArch());
  KJ_REQUIRE(image.getThreads().size() == 1, "restore: only single-threaded images",
             image.getThreads().size());
  auto thread = image.getThreads()[0];
  KJ_REQUIRE(thread.getRegs().size() == sizeof(user_regs_struct), "restore: bad register blob",
             thread.getRegs().size());
  KJ_REQUIRE(options.fdMap.size() <= 64, "restore: too many fdMap entries");
  KJ_REQUIRE(options.seccompFilter.size() * sizeof(sock_filter) <= SCRATCH_SIZE - 4096,
             "restore: seccomp program too large", options.seccompFilter.size());

  std::map<FileKey, std::string> localPaths;
  for (auto m : image.getMappings()) {
    uint64_t start = m.getStart(), end = m.getEnd();
    KJ_REQUIRE(end <= STUB_BASE || start >= STUB_LIMIT,
               "restore: image maps the stub's address range", start, end);
    if (m.getKind() == proto::Mapping::Kind::FILE) {
      FileKey key = keyOf(m.getFile());
      if (localPaths.find(key) == localPaths.end()) {
        std::string local = files(m.getFile());
        KJ_REQUIRE(!local.empty() && local.size() < 4000, "restore: unusable local path", local);
        localPaths.emplace(key, std::move(local));
      }
    }
  }

  // 2. The stub, from a memfd.
  int memfd;
  KJ_SYSCALL(memfd = ::memfd_create("mos-stub", MFD_CLOEXEC));
  kj::AutoCloseFd memfdOwner(memfd);
  {
    size_t done = 0;
    while (done < STUB_IMAGE_SIZE) {
      ssize_t n;
      KJ_SYSCALL(n = ::write(memfd, STUB_IMAGE + done, STUB_IMAGE_SIZE - done));
      done += n;
    }
  }
  int highFd = memfd;
  for (auto& [from, to] : options.fdMap) {
    highFd = std::max({highFd, from, to});
  }
  highFd += 1;

  // The child sees its parent as getppid() returns it there: 0 when the child is born in a pid
  // namespace that the caller is not in.
  pid_t parent = options.pid > 0 ? 0 : ::getpid();
  pid_t pid;
  if (options.pid > 0) {
    // clone3(2) with set_tid: the guest gets the wanted pid in its namespace (CRIU's way).
    pid_t tid = options.pid;
    clone_args args{};
    args.exit_signal = SIGCHLD;
    args.set_tid = reinterpret_cast<uint64_t>(&tid);
    args.set_tid_size = 1;
    KJ_SYSCALL(pid = static_cast<pid_t>(::syscall(SYS_clone3, &args, sizeof(args))),
               "clone3 of the stub at its pid", options.pid);
  } else {
    KJ_SYSCALL(pid = ::fork());
  }
  if (pid == 0) {
    execStubChild(memfd, parent, options, highFd);
  }
  memfdOwner = nullptr;
  bool detached = false;
  KJ_DEFER(if (!detached) {
    ::kill(pid, SIGKILL);
    int ignored;
    while (::waitpid(pid, &ignored, __WALL) < 0 && errno == EINTR) {
    }
  });

  int status = waitTask(pid);
  KJ_REQUIRE(WIFSTOPPED(status) && WSTOPSIG(status) == SIGTRAP, "restore: stub did not start",
             describeStatus(status));
  KJ_SYSCALL(::ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL));

  PtraceTask task(pid);
  user_regs_struct entryRegs = task.getRegs();
  {
    uint8_t code[32];
    task.readMem(RemotePtr<uint8_t>(entryRegs.rip), code);
    uint64_t insn = 0;
    for (size_t i = 0; i + 1 < sizeof(code); ++i) {
      if (code[i] == 0x0f && code[i + 1] == 0x05) {
        insn = entryRegs.rip + i;
        break;
      }
    }
    KJ_REQUIRE(insn != 0, "restore: no syscall instruction in the stub");
    task.setSyscallInstruction(RemotePtr<uint8_t>(insn));
  }

  std::vector<uint8_t> localXstate = task.getXstate();
  auto imageXstate = thread.getXstate();
  KJ_REQUIRE(imageXstate.size() == localXstate.size(),
             "restore: xsave area size differs from this CPU's", imageXstate.size(),
             localXstate.size());
  uint64_t imageFeatures =
      xfeatures(std::span<const uint8_t>(imageXstate.begin(), imageXstate.size()));
  uint64_t localFeatures = xfeatures(localXstate);
  KJ_REQUIRE((imageFeatures & ~localFeatures) == 0, "restore: xsave features missing here",
             imageFeatures, localFeatures);

  std::vector<MapsEntry> stubMaps = readMaps(pid);
  VdsoLayout local = vdsoLayout(stubMaps);
  uint64_t stubStart = ~0ull, stubEnd = 0, scratch = 0;
  for (const MapsEntry& e : stubMaps) {
    if (e.start >= STUB_BASE && e.end <= STUB_LIMIT) {
      stubStart = std::min(stubStart, e.start);
      stubEnd = std::max(stubEnd, e.end);
      if ((e.prot & PROT_WRITE) && e.end - e.start >= SCRATCH_SIZE) {
        scratch = e.start;
      }
    }
  }
  KJ_REQUIRE(scratch != 0, "restore: stub has no scratch area");
  RemotePtr<uint8_t> scratchPtr(scratch);

  // 3. Everything of the stub except its own pages goes.
  for (const MapsEntry& e : stubMaps) {
    if ((e.start >= STUB_BASE && e.end <= STUB_LIMIT) || e.path == "[vsyscall]") {
      continue;
    }
    task.syscallOrThrow("munmap(stub mapping)", __NR_munmap, {e.start, e.end - e.start});
  }

  // 4. The image's mappings and pages.
  std::map<std::string, long> remoteFds;  // local path -> fd in the stub
  std::vector<std::pair<uint64_t, proto::Mapping::Reader>> reprotect;
  for (auto m : image.getMappings()) {
    auto kind = m.getKind();
    if (isVdsoKind(kind) || kind == proto::Mapping::Kind::VSYSCALL) {
      continue;
    }
    uint64_t start = m.getStart(), len = m.getEnd() - m.getStart();
    uint32_t prot = m.getProt();
    uint64_t flags = MAP_FIXED | (m.getShared() ? MAP_SHARED : MAP_PRIVATE);
    long fd = -1;
    uint64_t offset = 0;
    if (kind == proto::Mapping::Kind::FILE) {
      const std::string& path = localPaths.at(keyOf(m.getFile()));
      auto it = remoteFds.find(path);
      if (it == remoteFds.end()) {
        task.writeString(scratchPtr.cast<char>(), path);
        long r = task.syscall(__NR_openat,
                              {static_cast<uint64_t>(AT_FDCWD), scratch, O_RDONLY | O_CLOEXEC, 0});
        KJ_REQUIRE(r >= 0, "restore: cannot open mapped file in the stub", path,
                   strerror(static_cast<int>(-r)));
        it = remoteFds.emplace(path, r).first;
      }
      fd = it->second;
      offset = m.getOffset();
    } else {
      flags |= MAP_ANONYMOUS;
      if (kind == proto::Mapping::Kind::STACK) {
        flags |= MAP_GROWSDOWN;
      }
      if (m.getShared() && !(prot & PROT_WRITE)) {
        // /proc/PID/mem cannot force a write into a shared read-only page: map writable, write,
        // then drop PROT_WRITE.
        reprotect.emplace_back(prot, m);
        prot |= PROT_WRITE;
      }
    }
    uint64_t at = task.syscallOrThrow("mmap(image mapping)", __NR_mmap,
                                      {start, len, prot, flags, static_cast<uint64_t>(fd), offset});
    KJ_REQUIRE(at == start, "restore: mapping landed elsewhere", start, at);
  }
  for (auto run : image.getPages()) {
    auto data = run.getData();
    task.writeMem(RemotePtr<uint8_t>(run.getStart()),
                  std::span<const uint8_t>(data.begin(), data.size()));
  }
  for (auto& [prot, m] : reprotect) {
    task.syscallOrThrow("mprotect", __NR_mprotect, {m.getStart(), m.getEnd() - m.getStart(), prot});
  }
  for (auto& [path, fd] : remoteFds) {
    task.syscallOrThrow("close(mapped file)", __NR_close, {static_cast<uint64_t>(fd)});
  }

  // 5. The vDSO where the image had it (it caches vDSO pointers: glibc, AT_SYSINFO_EHDR).
  VdsoLayout wanted = imageLayout(image);
  if (wanted.present()) {
    KJ_REQUIRE(local.present(), "restore: this kernel gives no vDSO");
    KJ_REQUIRE(wanted.vdsoSize == local.vdsoSize &&
                   wanted.vdsoStart - wanted.areaStart == local.vdsoStart - local.areaStart,
               "restore: vDSO layout of the image differs from this kernel's", wanted.vdsoSize,
               local.vdsoSize, wanted.vdsoStart - wanted.areaStart,
               local.vdsoStart - local.areaStart);
    uint64_t base = wanted.vdsoStart - (local.vdsoStart - local.areaStart);
    task.syscallOrThrow("arch_prctl(ARCH_MAP_VDSO_64)", __NR_arch_prctl, {ARCH_MAP_VDSO_64, base});
    VdsoLayout now = vdsoLayout(readMaps(pid));
    KJ_REQUIRE(now.vdsoStart == wanted.vdsoStart && now.vdsoSize == wanted.vdsoSize,
               "restore: vDSO did not land at the image's address", now.vdsoStart,
               wanted.vdsoStart);
  }

  // 6. mm layout and auxv (prctl(2) PR_SET_MM_MAP), SIG_IGN dispositions.
  {
    auto mm = image.getMm();
    auto auxv = image.getAuxv();
    RemotePtr<uint8_t> auxvAt = scratchPtr + 4096;
    task.writeMem(auxvAt, std::span<const uint8_t>(auxv.begin(), auxv.size()));
    prctl_mm_map map{};
    map.start_code = mm.getStartCode();
    map.end_code = mm.getEndCode();
    map.start_data = mm.getStartData();
    map.end_data = mm.getEndData();
    map.start_brk = mm.getStartBrk();
    map.brk = mm.getBrk();
    map.start_stack = mm.getStartStack();
    map.arg_start = mm.getArgStart();
    map.arg_end = mm.getArgEnd();
    map.env_start = mm.getEnvStart();
    map.env_end = mm.getEnvEnd();
    map.auxv = reinterpret_cast<__u64*>(auxvAt.addr());
    map.auxv_size = auxv.size();
    map.exe_fd = static_cast<__u32>(-1);  // the stub's memfd stays mapped until the end: EBUSY
    task.writeValue(scratchPtr.cast<prctl_mm_map>(), map);
    long r = task.syscall(__NR_prctl, {PR_SET_MM, PR_SET_MM_MAP, scratch, sizeof(map), 0});
    if (r == -EINVAL && map.auxv_size != 0) {
      // An auxv longer than this kernel's saved_auxv: keep the layout, skip the auxv.
      map.auxv_size = 0;
      map.auxv = nullptr;
      task.writeValue(scratchPtr.cast<prctl_mm_map>(), map);
      r = task.syscall(__NR_prctl, {PR_SET_MM, PR_SET_MM_MAP, scratch, sizeof(map), 0});
    }
    KJ_REQUIRE(r == 0, "restore: PR_SET_MM_MAP failed", strerror(static_cast<int>(-r)));
  }
  if (thread.getRseqAddr() != 0) {
    // rseq(2) registration is per thread and kernel-side: register the image's area again.
    task.syscallOrThrow("rseq", __NR_rseq,
                        {thread.getRseqAddr(), thread.getRseqSize(), 0, thread.getRseqSignature()});
  }
  // The task name (/proc/PID/comm, ps, top on this node): the image's, not the stub's.
  if (image.hasCommand() && image.getCommand().size() > 0) {
    std::string comm(image.getCommand().cStr());
    comm.resize(kj::min(comm.size(), size_t(15)));
    task.writeString(scratchPtr.cast<char>(), comm);
    task.syscallOrThrow("prctl(PR_SET_NAME)", __NR_prctl, {PR_SET_NAME, scratch, 0, 0, 0});
  }
  uint64_t ignored = image.getSigIgnored();
  if (ignored != 0) {
    struct KernelSigaction {
      uint64_t handler, flags, restorer, mask;
    } ign{reinterpret_cast<uint64_t>(SIG_IGN), 0, 0, 0};
    task.writeValue(scratchPtr.cast<KernelSigaction>(), ign);
    for (int sig = 1; sig <= 64; ++sig) {
      if ((ignored & (1ull << (sig - 1))) && sig != SIGKILL && sig != SIGSTOP) {
        task.syscallOrThrow("rt_sigaction(SIG_IGN)", __NR_rt_sigaction,
                            {static_cast<uint64_t>(sig), scratch, 0, 8});
      }
    }
  }

  // 7. Credentials.
  if (options.dropPrivileges) {
    task.syscallOrThrow("setgroups", __NR_setgroups, {0, 0});
    task.syscallOrThrow("setresgid", __NR_setresgid, {options.gid, options.gid, options.gid});
    task.syscallOrThrow("setresuid", __NR_setresuid, {options.uid, options.uid, options.uid});
    task.syscallOrThrow("prctl(PR_SET_PDEATHSIG)", __NR_prctl, {PR_SET_PDEATHSIG, SIGKILL});
    task.syscallOrThrow("prctl(PR_SET_DUMPABLE)", __NR_prctl, {PR_SET_DUMPABLE, 1});
  }

  // 8. The sandbox, last of all the calls that the filter might refuse.
  kj::AutoCloseFd listener;
  if (!options.seccompFilter.empty()) {
    task.syscallOrThrow("prctl(PR_SET_NO_NEW_PRIVS)", __NR_prctl,
                        {PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0});
    RemotePtr<uint8_t> progAt = scratchPtr + 4096;
    task.writeMem(progAt, std::span<const uint8_t>(
                              reinterpret_cast<const uint8_t*>(options.seccompFilter.data()),
                              options.seccompFilter.size() * sizeof(sock_filter)));
    struct {
      uint16_t len;
      uint16_t pad[3];
      uint64_t filter;
    } fprog{static_cast<uint16_t>(options.seccompFilter.size()), {}, progAt.addr()};
    task.writeValue(scratchPtr.cast<decltype(fprog)>(), fprog);
    uint64_t remoteListener = task.syscallOrThrow(
        "seccomp(SECCOMP_SET_MODE_FILTER)", __NR_seccomp,
        {SECCOMP_SET_MODE_FILTER,
         SECCOMP_FILTER_FLAG_NEW_LISTENER | static_cast<uint64_t>(options.seccompExtraFlags),
         scratch});
    int pidfd;
    KJ_SYSCALL(pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)), pid);
    kj::AutoCloseFd pidfdOwner(pidfd);
    int fd;
    KJ_SYSCALL(fd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, remoteListener, 0)), pid);
    listener = kj::AutoCloseFd(fd);
    // From now on the filter applies to what we inject: answer its notifications with CONTINUE
    // (our own calls, no pointer argument is judged).
    task.setWhileInSyscall([fd, pid]() {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 0) <= 0 || !(p.revents & POLLIN)) {
        return;
      }
      seccomp_notif req{};
      if (::ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0) {
        return;
      }
      seccomp_notif_resp resp{};
      resp.id = req.id;
      resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
      KJ_REQUIRE(static_cast<pid_t>(req.pid) == pid, "notification from a stranger", req.pid);
      ::ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    });
    task.syscallOrThrow("close(listener)", __NR_close, {remoteListener});
  }

  // 9. The stub's own pages, then the image's registers.
  task.syscallOrThrow("munmap(stub)", __NR_munmap, {stubStart, stubEnd - stubStart});
  user_regs_struct regs;
  memcpy(&regs, thread.getRegs().begin(), sizeof(regs));
  regs.orig_rax = static_cast<uint64_t>(-1);
  task.setXstate(std::span<const uint8_t>(imageXstate.begin(), imageXstate.size()));
  task.setRegs(regs);
  task.setSigmask(thread.getSigBlocked());
  KJ_SYSCALL(::ptrace(PTRACE_DETACH, pid, 0, 0), pid);
  detached = true;

  RestoredGuest guest;
  guest.pid = pid;
  guest.listener = kj::mv(listener);
  return guest;
}

}  // namespace mos::migrate
