// restoreImage(): a migration stream into a ptrace-stopped restore stub (checkpoint.h), by
// syscall injection at the stub's one `syscall` instruction (notes/migration.md §4.3 shape A).
// Stages, in order:
//   1. checks (checkResumable, the stub's xsave size and features); every signal blocked;
//   2. everything of the stub but its own pages unmapped (stack, vDSO, vvar);
//   3. the image's mappings mapped at their addresses, files reopened by path in the process;
//      the page runs of the stream written through /proc/PID/mem as they arrive;
//   4. the vDSO moved to the image's address (ARCH_MAP_VDSO_64), mm layout and auxv;
//   5. name, personality, umask, cwd, descriptors (by path and offset);
//   6. dispositions, sigaltstack, itimers, robust list, tid address, rseq, pending signals;
//   7. the stub's pages unmapped (caught at the munmap's syscall-exit stop), /proc/PID/exe;
//   8. xsave state, registers, signal mask; PTRACE_DETACH.
#include <dirent.h>
#include <fcntl.h>
#include <linux/prctl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/user.h>
#include <unistd.h>

#include <algorithm>
#include <cpuid.h>
#include <cstring>
#include <map>
#include <set>

#include <kj/debug.h>

#include "checkpoint.h"
#include "image_internal.h"
#include "proc_maps.h"
#include "ptrace_task.h"

#ifndef ARCH_MAP_VDSO_64
#define ARCH_MAP_VDSO_64 0x2003
#endif

namespace mos::migrate {

extern const uint8_t STUB_IMAGE[];
extern const size_t STUB_IMAGE_SIZE;

namespace {

// Where stub.S is linked (libmigrate/meson.build); images may not use this range.
constexpr uint64_t STUB_BASE = 0x3f0000000000ull;
constexpr uint64_t STUB_LIMIT = STUB_BASE + (1ull << 30);
constexpr uint64_t SCRATCH_SIZE = 131072;  // the stub's .bss

using Kind = proto::Mapping::Kind;

bool isVdsoKind(Kind k) { return k == Kind::VDSO || k == Kind::VVAR || k == Kind::VVAR_VCLOCK; }

// XCR0 of this CPU (xgetbv(0)): the xsave features the kernel enabled for user space.
uint64_t localXcr0() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) {
    return 0;
  }
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

VdsoLayout layoutOf(proto::ImageHeader::Reader header) {
  VdsoLayout l;
  uint64_t low = ~0ull;
  for (auto m : header.getMappings()) {
    if (m.getKind() == Kind::VDSO) {
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

// Descriptors 0..2 that the resumed process takes from the process it is restored into.
bool inherited(proto::OpenFile::Reader f) {
  return f.getFd() <= 2 && f.getKind() != proto::OpenFile::Kind::REGULAR &&
         f.getKind() != proto::OpenFile::Kind::DIRECTORY;
}

// The pipes whose both ends are among the resumed descriptors: recreated by restoreImage.
// Key: the pipe's inode; value: its descriptors.
std::map<uint64_t, std::vector<proto::OpenFile::Reader>> internalPipes(
    proto::ImageHeader::Reader header) {
  std::map<uint64_t, std::vector<proto::OpenFile::Reader>> all;
  for (auto f : header.getFiles()) {
    if (f.getKind() == proto::OpenFile::Kind::PIPE && !inherited(f) && f.getIno() != 0) {
      all[f.getIno()].push_back(f);
    }
  }
  std::map<uint64_t, std::vector<proto::OpenFile::Reader>> out;
  for (auto& [ino, ends] : all) {
    bool reader = false, writer = false;
    for (auto f : ends) {
      (f.getFlags() & O_ACCMODE) == O_WRONLY ? writer = true : reader = true;
    }
    if (reader && writer) {
      out.emplace(ino, ends);
    }
  }
  return out;
}

struct KernelSigaction {
  uint64_t handler, flags, restorer, mask;
};

}  // namespace

std::vector<std::string> checkResumable(proto::ImageHeader::Reader header) {
  return checkResumable(header, ResumeOptions{});
}

std::vector<std::string> checkResumable(proto::ImageHeader::Reader header,
                                        const ResumeOptions& options) {
  std::vector<std::string> problems;
  if (header.getArch() != "x86_64") {
    problems.push_back(
        kj::str("the image is of another architecture (", header.getArch(), ")").cStr());
    return problems;
  }
  if (header.getThreads().size() != 1) {
    problems.push_back(kj::str("the image has ", header.getThreads().size(),
                               " threads: only single-threaded processes resume yet")
                           .cStr());
    return problems;
  }
  uint64_t want = header.getCpu().getXsaveFeatures(), have = localXcr0();
  if ((want & ~have) != 0) {
    problems.push_back(kj::str("this CPU's xsave state does not cover the image's (features ",
                               kj::hex(want), ", this CPU has ", kj::hex(have), ")")
                           .cStr());
  }
  VdsoLayout image = layoutOf(header);
  VdsoLayout local = vdsoLayout(readMaps(::getpid()));
  if (image.present() && (!local.present() || image.vdsoSize != local.vdsoSize ||
                          image.vdsoStart - image.areaStart != local.vdsoStart - local.areaStart)) {
    problems.push_back(kj::str("this kernel's vDSO differs from the image's (", image.vdsoSize,
                               " bytes, ", local.vdsoSize, " here)")
                           .cStr());
  }
  std::set<std::string> seen;
  for (auto m : header.getMappings()) {
    if (m.getStart() < STUB_LIMIT && m.getEnd() > STUB_BASE) {
      problems.push_back(
          kj::str("the image maps the restore stub's address range at ", kj::hex(m.getStart()))
              .cStr());
    }
    if (m.getKind() != Kind::FILE) {
      continue;
    }
    auto ref = m.getFile();
    std::string path = pathOf(ref.getPath());
    if (!seen.insert(path).second) {
      continue;
    }
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      problems.push_back("mapped file " + path + " is gone (" + strerror(errno) + ")");
    } else if (st.st_dev != ref.getDev() || st.st_ino != ref.getIno() ||
               uint64_t(st.st_size) != ref.getSize() || mtimeNs(st) != ref.getMtimeNs()) {
      problems.push_back("mapped file " + path + " changed since the image was taken");
    }
  }
  if (options.intoDeputy) {
    // The fd table and the cwd are the deputy's, which are the job's.
    return problems;
  }
  std::string cwd = pathOf(header.getCwd());
  struct stat st;
  if (::stat(cwd.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    problems.push_back("the working directory " + cwd + " is gone");
  }
  auto pipes = internalPipes(header);
  for (auto f : header.getFiles()) {
    if (inherited(f)) {
      continue;
    }
    std::string path = pathOf(f.getPath());
    std::string fd = "fd " + std::to_string(f.getFd()) + ": ";
    switch (f.getKind()) {
      case proto::OpenFile::Kind::PIPE:
        if (!pipes.count(f.getIno())) {
          problems.push_back(fd + "a pipe (" + path +
                             ") cannot be resumed: the process at its other end is gone");
        } else if (f.getUnread() != 0) {
          problems.push_back(fd + "a pipe (" + path + ") of the process's own holds " +
                             std::to_string(f.getUnread()) + " unread bytes (not kept yet)");
        }
        break;
      case proto::OpenFile::Kind::SOCKET:
        problems.push_back(fd + "a socket (" + path + ") cannot be resumed");
        break;
      case proto::OpenFile::Kind::OTHER:
        problems.push_back(fd + path + " cannot be reopened by path");
        break;
      case proto::OpenFile::Kind::REGULAR:
      case proto::OpenFile::Kind::DIRECTORY:
      case proto::OpenFile::Kind::DEVICE:
        if (::stat(path.c_str(), &st) != 0) {
          problems.push_back(fd + path + " is gone (" + strerror(errno) + ")");
        } else if (f.getKind() != proto::OpenFile::Kind::DEVICE &&
                   (st.st_dev != f.getDev() || st.st_ino != f.getIno())) {
          problems.push_back(fd + path + " was replaced by another file since the image was taken");
        }
        break;
    }
  }
  return problems;
}

RestoreStats restoreImage(ImageReader& source, pid_t pid) {
  return restoreImage(source, pid, ResumeOptions{});
}

RestoreStats restoreImage(ImageReader& source, pid_t pid, const ResumeOptions& options) {
  // 1. Checks.
  auto header = source.header();
  std::vector<std::string> problems = checkResumable(header, options);
  if (!problems.empty()) {
    std::string all;
    for (auto& p : problems) {
      all += (all.empty() ? "" : "; ") + p;
    }
    KJ_FAIL_REQUIRE(kj::str("the image cannot be resumed here: ", all.c_str()));
  }
  auto thread = header.getThreads()[0];
  KJ_REQUIRE(thread.getRegs().size() == sizeof(user_regs_struct), "bad register blob in the image");
  PtraceTask task(pid);
  std::vector<uint8_t> localXstate = task.getXstate();
  auto imageXstate = thread.getXstate();
  KJ_REQUIRE(imageXstate.size() == localXstate.size(),
             "the xsave area of this CPU has another size than the image's", imageXstate.size(),
             localXstate.size());

  std::vector<MapsEntry> stubMaps = readMaps(pid);
  VdsoLayout local = vdsoLayout(stubMaps);
  uint64_t stubStart = ~0ull, stubEnd = 0, scratch = 0;
  RemotePtr<uint8_t> stubInsn;
  for (const MapsEntry& e : stubMaps) {
    if (e.start >= STUB_BASE && e.end <= STUB_LIMIT) {
      stubStart = std::min(stubStart, e.start);
      stubEnd = std::max(stubEnd, e.end);
      if ((e.prot & PROT_WRITE) && e.end - e.start >= SCRATCH_SIZE) {
        scratch = e.start;
      }
      if ((e.prot & PROT_EXEC) && stubInsn.isNull()) {
        stubInsn = task.findSyscallInstruction(e.start, e.end);
      }
    }
  }
  KJ_REQUIRE(scratch != 0 && !stubInsn.isNull(), "the process is not the restore stub", pid);
  task.setSyscallInstruction(stubInsn);
  RemotePtr<uint8_t> scratchPtr(scratch);
  auto writeScratch = [&](const void* data, size_t size, size_t at = 0) {
    KJ_REQUIRE(at + size <= SCRATCH_SIZE);
    task.writeMem(scratchPtr + at,
                  std::span<const uint8_t>(static_cast<const uint8_t*>(data), size));
    return scratch + at;
  };
  auto writePath = [&](const std::string& path) {
    KJ_REQUIRE(path.size() < 4096, "path too long", path);
    return writeScratch(path.c_str(), path.size() + 1);
  };
  task.setSigmask(~0ull);

  // 2. The stub's own stack, vDSO and vvar go.
  for (const MapsEntry& e : stubMaps) {
    if ((e.start >= STUB_BASE && e.end <= STUB_LIMIT) || e.path == "[vsyscall]") {
      continue;
    }
    task.syscallOrThrow("munmap(stub mapping)", __NR_munmap, {e.start, e.end - e.start});
  }

  // 3. Mappings, then the pages as the stream brings them.
  std::map<std::string, long> mappedFds;  // path -> fd in the process
  std::vector<std::pair<uint32_t, proto::Mapping::Reader>> reprotect;
  std::vector<proto::Mapping::Reader> restored;
  for (auto m : header.getMappings()) {
    auto kind = m.getKind();
    if (isVdsoKind(kind) || kind == Kind::VSYSCALL) {
      continue;
    }
    uint64_t start = m.getStart(), len = m.getEnd() - m.getStart();
    uint32_t prot = m.getProt();
    uint64_t flags = MAP_FIXED | (m.getShared() ? MAP_SHARED : MAP_PRIVATE);
    long fd = -1;
    uint64_t offset = 0;
    if (kind == Kind::FILE) {
      std::string path = pathOf(m.getFile().getPath());
      auto it = mappedFds.find(path);
      if (it == mappedFds.end()) {
        long r = task.syscall(__NR_openat,
                              {uint64_t(AT_FDCWD), writePath(path), O_RDONLY | O_CLOEXEC, 0});
        KJ_REQUIRE(r >= 0, "cannot reopen a mapped file", path, strerror(int(-r)));
        it = mappedFds.emplace(path, r).first;
      }
      fd = it->second;
      offset = m.getOffset();
    } else {
      flags |= MAP_ANONYMOUS;
      if (kind == Kind::STACK) {
        flags |= MAP_GROWSDOWN;
      }
      if (m.getShared() && !(prot & PROT_WRITE)) {
        // /proc/PID/mem cannot force a write into a shared read-only page: map it writable,
        // write, then drop PROT_WRITE.
        reprotect.emplace_back(prot, m);
        prot |= PROT_WRITE;
      }
    }
    uint64_t at = task.syscallOrThrow("mmap(image mapping)", __NR_mmap,
                                      {start, len, prot, flags, uint64_t(fd), offset});
    KJ_REQUIRE(at == start, "a mapping landed elsewhere", start, at);
    restored.push_back(m);
  }
  std::vector<uint8_t> buffer(MAX_RUN_PAGES * IMAGE_PAGE);
  size_t mi = 0;
  RestoreStats stats;
  for (;;) {
    ImageReader::Run run;
    KJ_IF_MAYBE (r, source.nextRun()) {
      run = *r;
    } else {
      break;
    }
    uint64_t end = run.start + uint64_t(run.count) * IMAGE_PAGE;
    while (mi < restored.size() && restored[mi].getEnd() <= run.start) {
      ++mi;
    }
    KJ_REQUIRE(mi < restored.size() && restored[mi].getStart() <= run.start &&
                   end <= restored[mi].getEnd(),
               kj::str("migration image corrupt: a page run at ", kj::hex(run.start),
                       " lies outside the image's mappings"));
    std::span<uint8_t> bytes(buffer.data(), end - run.start);
    source.readPages(bytes);
    task.writeMem(RemotePtr<uint8_t>(run.start), bytes);
    stats.pages += run.count;
  }
  for (auto& [prot, m] : reprotect) {
    task.syscallOrThrow("mprotect", __NR_mprotect, {m.getStart(), m.getEnd() - m.getStart(), prot});
  }
  for (auto& [path, fd] : mappedFds) {
    task.syscallOrThrow("close(mapped file)", __NR_close, {uint64_t(fd)});
  }

  // 4. The vDSO where the image had it (glibc and AT_SYSINFO_EHDR point into it), mm layout.
  VdsoLayout wanted = layoutOf(header);
  if (wanted.present()) {
    uint64_t base = wanted.vdsoStart - (local.vdsoStart - local.areaStart);
    task.syscallOrThrow("arch_prctl(ARCH_MAP_VDSO_64)", __NR_arch_prctl, {ARCH_MAP_VDSO_64, base});
    VdsoLayout now = vdsoLayout(readMaps(pid));
    KJ_REQUIRE(now.vdsoStart == wanted.vdsoStart, "the vDSO did not land at the image's address",
               now.vdsoStart, wanted.vdsoStart);
  }
  prctl_mm_map map{};
  {
    auto mm = header.getMm();
    auto auxv = header.getAuxv();
    uint64_t auxvAt = writeScratch(auxv.begin(), auxv.size(), 4096);
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
    map.auxv = reinterpret_cast<__u64*>(auxvAt);
    map.auxv_size = auxv.size();
    map.exe_fd = static_cast<__u32>(-1);
    writeScratch(&map, sizeof(map));
    long r = task.syscall(__NR_prctl, {PR_SET_MM, PR_SET_MM_MAP, scratch, sizeof(map), 0});
    KJ_REQUIRE(r == 0, "PR_SET_MM_MAP failed", strerror(int(-r)));
  }

  // 5. Name, personality, umask, cwd, descriptors.
  {
    std::string comm(header.getCommand().cStr());
    comm.resize(std::min<size_t>(comm.size(), 15));
    task.syscallOrThrow("prctl(PR_SET_NAME)", __NR_prctl, {PR_SET_NAME, writePath(comm), 0, 0, 0});
  }
  if (options.intoDeputy) {
    // The deputy's fd table is the job's: only the close-on-exec flags it cleared come back.
    for (int fd : options.closeOnExec) {
      task.syscallOrThrow("fcntl(F_SETFD)", __NR_fcntl, {uint64_t(fd), F_SETFD, FD_CLOEXEC});
    }
  } else {
    task.syscallOrThrow("personality", __NR_personality, {header.getPersonality()});
    task.syscallOrThrow("umask", __NR_umask, {header.getUmask()});
    task.syscallOrThrow("chdir", __NR_chdir, {writePath(pathOf(header.getCwd()))});
    // Every descriptor of the stub goes but the inherited 0..2; then the image's come back.
    std::set<int> keep;
    for (auto f : header.getFiles()) {
      if (inherited(f)) {
        keep.insert(f.getFd());
      }
    }
    for (int fd = 0; fd <= 2; ++fd) {
      if (!keep.count(fd)) {
        task.syscall(__NR_close, {uint64_t(fd)});
      }
    }
    task.syscall(__NR_close_range, {3, ~0u, 0});
    // Pipes of the process's own: a new pipe each, its ends moved above every image descriptor
    // first so that placing one end never closes the other.
    uint64_t above = 3;
    for (auto file : header.getFiles()) {
      above = std::max<uint64_t>(above, file.getFd() + 1);
    }
    for (auto& [ino, ends] : internalPipes(header)) {
      task.syscallOrThrow("pipe2", __NR_pipe2, {scratch, 0});
      int pair[2];
      task.readMem(scratchPtr, std::span<uint8_t>(reinterpret_cast<uint8_t*>(pair), sizeof(pair)));
      uint64_t high[2];
      for (int i = 0; i < 2; ++i) {
        high[i] =
            task.syscallOrThrow("fcntl(F_DUPFD)", __NR_fcntl, {uint64_t(pair[i]), F_DUPFD, above});
        task.syscallOrThrow("close", __NR_close, {uint64_t(pair[i])});
      }
      for (auto file : ends) {
        uint64_t from = high[(file.getFlags() & O_ACCMODE) == O_WRONLY ? 1 : 0];
        uint64_t fd = file.getFd();
        task.syscallOrThrow("dup3", __NR_dup3,
                            {from, fd, file.getCloseOnExec() ? uint64_t(O_CLOEXEC) : 0});
        task.syscallOrThrow("fcntl(F_SETFL)", __NR_fcntl,
                            {fd, F_SETFL, file.getFlags() & uint64_t(O_NONBLOCK)});
      }
      task.syscallOrThrow("close", __NR_close, {high[0]});
      task.syscallOrThrow("close", __NR_close, {high[1]});
    }
    for (auto file : header.getFiles()) {
      if (inherited(file) || file.getKind() == proto::OpenFile::Kind::PIPE) {
        continue;
      }
      std::string path = pathOf(file.getPath());
      uint32_t flags = file.getFlags() & ~uint32_t(O_CREAT | O_EXCL | O_TRUNC);
      long tmp = task.syscall(__NR_openat, {uint64_t(AT_FDCWD), writePath(path), flags, 0});
      KJ_REQUIRE(tmp >= 0, kj::str("cannot reopen fd ", file.getFd(), " (", path.c_str(),
                                   "): ", strerror(int(-tmp))));
      uint64_t fd = file.getFd();
      if (uint64_t(tmp) != fd) {
        task.syscallOrThrow("dup3", __NR_dup3,
                            {uint64_t(tmp), fd, file.getCloseOnExec() ? uint64_t(O_CLOEXEC) : 0});
        task.syscallOrThrow("close", __NR_close, {uint64_t(tmp)});
      } else if (file.getCloseOnExec()) {
        task.syscallOrThrow("fcntl(F_SETFD)", __NR_fcntl, {fd, F_SETFD, FD_CLOEXEC});
      }
      if (file.getKind() == proto::OpenFile::Kind::REGULAR) {
        task.syscallOrThrow("lseek", __NR_lseek, {fd, uint64_t(file.getOffset()), SEEK_SET});
      }
    }
  }

  // 6. Signals, timers, per-thread registrations.
  {
    std::map<uint32_t, KernelSigaction> actions;
    for (auto a : header.getSigActions()) {
      actions[a.getSigno()] = {a.getHandler(), a.getFlags(), a.getRestorer(), a.getMask()};
    }
    for (int sig = 1; sig <= 64; ++sig) {
      if (sig == SIGKILL || sig == SIGSTOP) {
        continue;
      }
      KernelSigaction act{};  // SIG_DFL
      auto it = actions.find(sig);
      if (it != actions.end()) {
        act = it->second;
      }
      task.syscallOrThrow("rt_sigaction", __NR_rt_sigaction,
                          {uint64_t(sig), writeScratch(&act, sizeof(act)), 0, 8});
    }
  }
  {
    stack_t ss{};
    ss.ss_sp = reinterpret_cast<void*>(thread.getAltStackSp());
    ss.ss_size = thread.getAltStackSize();
    ss.ss_flags = thread.getAltStackFlags() & ~SS_ONSTACK;
    if (thread.getAltStackSp() == 0 && ss.ss_size == 0) {
      ss.ss_flags = SS_DISABLE;
    }
    task.syscallOrThrow("sigaltstack", __NR_sigaltstack, {writeScratch(&ss, sizeof(ss)), 0});
  }
  {
    proto::TimerValue::Reader timers[3] = {header.getTimerReal(), header.getTimerVirtual(),
                                           header.getTimerProf()};
    for (int which = 0; which < 3; ++which) {
      auto us = [](uint64_t v) {
        return timeval{static_cast<time_t>(v / 1000000), static_cast<suseconds_t>(v % 1000000)};
      };
      itimerval value{us(timers[which].getIntervalUs()), us(timers[which].getValueUs())};
      task.syscallOrThrow("setitimer", __NR_setitimer,
                          {uint64_t(which), writeScratch(&value, sizeof(value)), 0});
    }
  }
  if (thread.getRobustListHead() != 0) {
    task.syscallOrThrow("set_robust_list", __NR_set_robust_list,
                        {thread.getRobustListHead(), thread.getRobustListLen()});
  }
  if (thread.getTidAddressKnown()) {
    task.syscallOrThrow("set_tid_address", __NR_set_tid_address, {thread.getTidAddress()});
  }
  if (thread.getRseqAddr() != 0) {
    task.syscallOrThrow("rseq", __NR_rseq,
                        {thread.getRseqAddr(), thread.getRseqSize(), 0, thread.getRseqSignature()});
  }
  auto queue = [&](proto::PendingSignal::Reader p) {
    auto info = p.getSiginfo();
    KJ_REQUIRE(info.size() == sizeof(siginfo_t), "bad siginfo in the image");
    siginfo_t si;
    memcpy(&si, info.begin(), sizeof(si));
    if (si.si_signo == SIGKILL || si.si_signo == SIGSTOP) {
      return;
    }
    uint64_t at = writeScratch(&si, sizeof(si));
    if (p.getShared()) {
      task.syscallOrThrow("rt_sigqueueinfo", __NR_rt_sigqueueinfo,
                          {uint64_t(pid), uint64_t(si.si_signo), at});
    } else {
      task.syscallOrThrow("rt_tgsigqueueinfo", __NR_rt_tgsigqueueinfo,
                          {uint64_t(pid), uint64_t(pid), uint64_t(si.si_signo), at});
    }
  };
  for (auto p : header.getPending()) {
    queue(p);
  }
  for (auto p : thread.getPending()) {
    queue(p);
  }

  // 7. The stub's pages, the last of the stub; /proc/PID/exe names the image's program when
  // this process may change it (CAP_SYS_RESOURCE and CAP_CHECKPOINT_RESTORE).
  std::string exePath = options.intoDeputy && !options.exePath.empty()
                            ? options.exePath
                            : pathOf(header.getExe().getPath());
  long exeFd =
      task.syscall(__NR_openat, {uint64_t(AT_FDCWD), writePath(exePath), O_RDONLY | O_CLOEXEC, 0});
  task.syscallOrThrow("munmap(stub)", __NR_munmap, {stubStart, stubEnd - stubStart});
  if (exeFd >= 0 && wanted.present()) {
    RemotePtr<uint8_t> vdsoInsn =
        task.findSyscallInstruction(wanted.vdsoStart, wanted.vdsoStart + wanted.vdsoSize);
    if (!vdsoInsn.isNull()) {
      task.setSyscallInstruction(vdsoInsn);
      long r = task.syscall(__NR_prctl, {PR_SET_MM, PR_SET_MM_EXE_FILE, uint64_t(exeFd), 0, 0});
      if (r == -EPERM) {
        // PR_SET_MM_EXE_FILE wants CAP_SYS_RESOURCE in the initial user namespace;
        // PR_SET_MM_MAP's exe_fd only CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) in the
        // process's own. The same map again, without auxv, from below the image's stack
        // pointer (the stub's scratch is gone); those bytes are put back afterwards.
        try {
          user_regs_struct imageRegs;
          memcpy(&imageRegs, thread.getRegs().begin(), sizeof(imageRegs));
          uint64_t at = (imageRegs.rsp - 128 - sizeof(map)) & ~uint64_t{15};
          std::vector<uint8_t> saved(sizeof(map));
          task.readMem(RemotePtr<uint8_t>(at), std::span<uint8_t>(saved.data(), saved.size()));
          prctl_mm_map withExe = map;
          withExe.auxv = nullptr;
          withExe.auxv_size = 0;
          withExe.exe_fd = static_cast<__u32>(exeFd);
          task.writeMem(RemotePtr<uint8_t>(at),
                        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&withExe),
                                                 sizeof(withExe)));
          task.syscall(__NR_prctl, {PR_SET_MM, PR_SET_MM_MAP, at, sizeof(withExe), 0});
          task.writeMem(RemotePtr<uint8_t>(at),
                        std::span<const uint8_t>(saved.data(), saved.size()));
        } catch (kj::Exception&) {
          // No room below the stack pointer: /proc/PID/exe keeps naming the stub.
        }
      }
      task.syscall(__NR_close, {uint64_t(exeFd)});
    }
  }

  // 8. Registers last.
  user_regs_struct regs;
  memcpy(&regs, thread.getRegs().begin(), sizeof(regs));
  regs.orig_rax = static_cast<uint64_t>(-1);
  task.setXstate(std::span<const uint8_t>(imageXstate.begin(), imageXstate.size()));
  task.setRegs(regs);
  task.setSigmask(thread.getSigBlocked());
  stats.injectedSyscalls = task.injected();
  KJ_SYSCALL(::ptrace(PTRACE_DETACH, pid, 0, 0), pid);
  return stats;
}

void execRestoreStub() {
  int memfd = ::memfd_create("mos-stub", MFD_CLOEXEC);
  if (memfd < 0) {
    return;
  }
  size_t done = 0;
  while (done < STUB_IMAGE_SIZE) {
    ssize_t n = ::write(memfd, STUB_IMAGE + done, STUB_IMAGE_SIZE - done);
    if (n <= 0) {
      int err = errno;
      ::close(memfd);
      errno = err;
      return;
    }
    done += n;
  }
  char name[] = "mos-stub";
  char* argv[] = {name, nullptr};
  char* envp[] = {nullptr};
  ::syscall(SYS_execveat, memfd, "", argv, envp, AT_EMPTY_PATH);
  int err = errno;
  ::close(memfd);
  errno = err;
}

}  // namespace mos::migrate
