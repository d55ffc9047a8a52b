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
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
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
#include <functional>
#include <set>

#include <kj/debug.h>

#include "checkpoint.h"
#include "migrate.h"
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

// A recreated pipe gets its capacity back (F_SETPIPE_SZ) and the bytes that were queued in it
// (written from a temporary mapping of the process while the pipe is new, empty and blocking,
// so one write(2) takes them all). Throws kj::Exception when the pipe cannot hold them.
void refillPipe(PtraceTask& task, int readFd, int writeFd,
                const std::vector<proto::OpenFile::Reader>& ends) {
  uint32_t size = 0;
  kj::ArrayPtr<const kj::byte> data;
  for (auto end : ends) {
    size = std::max(size, end.getPipeSize());
    if (end.getPipeData().size() > 0) {
      data = end.getPipeData();
    }
  }
  if (size > 0 && size != 65536) {
    long r = task.syscall(__NR_fcntl, {uint64_t(readFd), F_SETPIPE_SZ, size});
    KJ_REQUIRE(r >= 0 || data.size() <= 65536,
               kj::str("cannot give a recreated pipe its capacity of ", size,
                       " bytes (F_SETPIPE_SZ: ", strerror(int(-r)), ") for its ", data.size(),
                       " queued bytes"));
  }
  if (data.size() == 0) {
    return;
  }
  uint64_t length = (data.size() + IMAGE_PAGE - 1) / IMAGE_PAGE * IMAGE_PAGE;
  uint64_t buffer = task.syscallOrThrow(
      "mmap(pipe buffer)", __NR_mmap,
      {0, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, ~0ull, 0});
  KJ_DEFER(task.syscall(__NR_munmap, {buffer, length}));
  task.writeMem(RemotePtr<uint8_t>(buffer), std::span<const uint8_t>(data.begin(), data.size()));
  long n = task.syscall(__NR_write, {uint64_t(writeFd), buffer, data.size()});
  KJ_REQUIRE(n == long(data.size()), "a recreated pipe did not take its queued bytes back",
             data.size(), n);
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

// The entries of /proc/PID/task (empty when it cannot be read).
std::vector<pid_t> taskIds(pid_t pid) {
  std::vector<pid_t> out;
  std::string path = "/proc/" + std::to_string(pid) + "/task";
  if (DIR* dir = ::opendir(path.c_str())) {
    while (dirent* e = ::readdir(dir)) {
      if (e->d_name[0] != '.') {
        out.push_back(static_cast<pid_t>(atoi(e->d_name)));
      }
    }
    ::closedir(dir);
  }
  return out;
}

struct KernelSigaction {
  uint64_t handler, flags, restorer, mask;
};

}  // namespace

std::vector<std::string> checkRestorableHere(proto::ImageHeader::Reader header) {
  std::vector<std::string> problems;
  if (header.getArch() != "x86_64") {
    problems.push_back(
        kj::str("the image is of another architecture (", header.getArch(), ")").cStr());
    return problems;
  }
  if (header.getThreads().size() == 0 || header.getThreads()[0].getTid() != header.getSourcePid()) {
    problems.push_back("the image's first thread is not its process's leader");
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
  for (auto m : header.getMappings()) {
    if (m.getStart() < STUB_LIMIT && m.getEnd() > STUB_BASE) {
      problems.push_back(
          kj::str("the image maps the restore stub's address range at ", kj::hex(m.getStart()))
              .cStr());
    }
  }
  return problems;
}

std::vector<std::string> checkResumable(proto::ImageHeader::Reader header) {
  return checkResumable(header, ResumeOptions{});
}

std::vector<std::string> checkResumable(proto::ImageHeader::Reader header,
                                        const ResumeOptions& options) {
  std::vector<std::string> problems = checkRestorableHere(header);
  if (!problems.empty() && header.getThreads().size() != 1) {
    return problems;
  }
  std::set<std::string> seen;
  for (auto m : header.getMappings()) {
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
        } else if (f.getUnread() != 0 && f.getPipeData().size() != f.getUnread()) {
          problems.push_back(fd + "a pipe (" + path + ") of the process's own holds " +
                             std::to_string(f.getUnread()) +
                             " unread bytes that the image does not carry");
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
  auto threads = header.getThreads();
  for (size_t i = 1; i < threads.size(); ++i) {
    // Each thread comes back with its id (clone3 set_tid): glibc keeps it in the thread's
    // descriptor (pthread_kill, mutex owners), so another id would be a different thread.
    pid_t tid = threads[i].getTid();
    if (::kill(tid, 0) == 0 || errno != ESRCH) {
      problems.push_back("thread id " + std::to_string(tid) +
                         " of the image is in use here (its thread must get it back)");
    }
  }
  return problems;
}

namespace {

[[noreturn]] void failWith(const char* what, const std::vector<std::string>& problems) {
  std::string all;
  for (auto& p : problems) {
    all += (all.empty() ? "" : "; ") + p;
  }
  KJ_FAIL_REQUIRE(kj::str(what, all.c_str()));
}

// Fills the stub's anonymous private writable mappings through a userfaultfd of its mm:
// UFFDIO_COPY allocates each page and copies into it, without zeroing it first and without the
// page-fault path that process_vm_writev takes (ioctl_userfaultfd(2); CRIU's lazy pages restore
// the same way). 512 MiB into fresh memory here: about 140 ms instead of 210-250 ms.
// The userfaultfd is made in the stub by injection (userfaultfd(2) with UFFD_USER_MODE_ONLY, which
// needs no privilege), taken with pidfd_getfd(2), and closed in the stub at once; ranges are
// registered in MISSING mode. Nothing in the stub can fault on them meanwhile: it is stopped
// until finish() has unregistered them. Where a step fails (an older kernel, a seccomp policy),
// the filler is off and every page is written as before.
class UffdFiller {
 public:
  UffdFiller(PtraceTask& task, pid_t pid) {
    long remote = task.syscall(__NR_userfaultfd, {O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY});
    if (remote < 0) {
      return;
    }
    try {
      fd_ = takeFd(pid, int(remote));
    } catch (kj::Exception&) {
    }
    task.syscall(__NR_close, {uint64_t(remote)});
    if (fd_ == nullptr) {
      return;
    }
    uffdio_api api{};
    api.api = UFFD_API;
    if (::ioctl(fd_, UFFDIO_API, &api) != 0) {
      fd_ = nullptr;
    }
  }
  ~UffdFiller() noexcept(false) { finish(); }

  // Registers the mapping [start, end) (page aligned, anonymous, private): true when its pages
  // go through copy().
  bool add(uint64_t start, uint64_t end) {
    if (fd_ == nullptr) {
      return false;
    }
    uffdio_register reg{};
    reg.range.start = start;
    reg.range.len = end - start;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(fd_, UFFDIO_REGISTER, &reg) != 0) {
      return false;
    }
    ranges_.push_back(reg.range);
    return true;
  }

  // Copies `bytes` (whole pages) to `at`, inside a range add() took. Returns how many bytes it
  // copied; the rest (a page that exists already: EEXIST) is for the caller to write.
  size_t copy(uint64_t at, std::span<const uint8_t> bytes) {
    size_t done = 0;
    while (done < bytes.size()) {
      uffdio_copy c{};
      c.dst = at + done;
      c.src = reinterpret_cast<uint64_t>(bytes.data() + done);
      c.len = bytes.size() - done;
      c.mode = UFFDIO_COPY_MODE_DONTWAKE;
      int r = ::ioctl(fd_, UFFDIO_COPY, &c);
      if (c.copy > 0) {
        done += size_t(c.copy);
      }
      if (r == 0) {
        continue;
      }
      if (errno != EAGAIN) {
        break;
      }
    }
    return done;
  }

  // Unregisters every range and closes the userfaultfd (closing alone would also drop them).
  void finish() {
    if (fd_ == nullptr) {
      return;
    }
    for (auto& range : ranges_) {
      ::ioctl(fd_, UFFDIO_UNREGISTER, &range);
    }
    ranges_.clear();
    fd_ = nullptr;
  }

 private:
  kj::AutoCloseFd fd_;
  std::vector<uffdio_range> ranges_;
};

// Where a rebuild happens and what it takes from the image beyond memory, registers and signals.
struct Target {
  // The local path of a mapped file of the image.
  std::function<std::string(proto::FileRef::Reader)> mappedPath;
  // At home: cwd, umask, descriptors and /proc/PID/exe are the image's. A guest has none of
  // them (its files are its deputy's).
  bool atHome = true;
  // Called after every injected call of the image's state and before the stub's pages go: a
  // guest drops its privileges and enters its sandbox there.
  // `others` are the process's other threads, stopped (they get the same credentials).
  std::function<void(PtraceTask&, std::vector<PtraceTask>& others, RemotePtr<uint8_t> scratch)>
      beforeStubUnmap;
  // Not null: the other threads stay traced and stopped at the end, their tids (as the caller
  // sees them) here, the image's order (a guest thread must not run before the supervisor has a
  // task and a channel for it).
  std::vector<pid_t>* keptThreads = nullptr;
  // A live move of a remote guest back into its deputy (ResumeOptions::intoDeputy): the fd
  // table, cwd, umask, personality and credentials are already the job's; only the close-on-exec
  // flags the deputy cleared come back, and /proc/PID/exe names `exePath`.
  bool intoDeputy = false;
  std::vector<int> closeOnExec;
  std::string exePath;
};

// Stages 2 to 8 of the file comment, into the stopped restore stub `pid`; leaves it stopped with
// the image's registers and mask, still traced.
RestoreStats rebuild(ImageReader& source, pid_t pid, const Target& target) {
  auto header = source.header();
  auto thread = header.getThreads()[0];
  KJ_REQUIRE(thread.getRegs().size() == sizeof(user_regs_struct), "bad register blob in the image");
  auto started = std::chrono::steady_clock::now();
  auto since = [&] {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                                 started);
  };
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
      std::string path = target.mappedPath(m.getFile());
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
  // Anonymous private writable mappings take their pages through a userfaultfd (UffdFiller).
  UffdFiller filler(task, pid);
  std::vector<bool> filled(restored.size());
  for (size_t i = 0; i < restored.size(); ++i) {
    auto m = restored[i];
    filled[i] = m.getKind() != Kind::FILE && !m.getShared() && (m.getProt() & PROT_WRITE) &&
                filler.add(m.getStart(), m.getEnd());
  }
  std::vector<uint8_t> buffer(MAX_RUN_PAGES * IMAGE_PAGE);
  size_t mi = 0;
  RestoreStats stats;
  stats.mappingsTime = since();
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
    // Other writable mappings take process_vm_writev (batched page faults, no FOLL_FORCE walk
    // per page); read-only and PROT_NONE pages need /proc/PID/mem's forced write.
    size_t fast = filled[mi] ? filler.copy(run.start, bytes) : 0;
    if (fast < bytes.size() && (restored[mi].getProt() & PROT_WRITE)) {
      fast += task.writeMemFast(RemotePtr<uint8_t>(run.start + fast), bytes.subspan(fast));
    }
    if (fast < bytes.size()) {
      task.writeMem(RemotePtr<uint8_t>(run.start + fast), bytes.subspan(fast));
    }
    stats.pages += run.count;
  }
  filler.finish();
  stats.pagesTime = since();
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
  if (target.intoDeputy) {
    // The deputy's fd table is the job's: only the close-on-exec flags it cleared come back.
    for (int fd : target.closeOnExec) {
      task.syscallOrThrow("fcntl(F_SETFD)", __NR_fcntl, {uint64_t(fd), F_SETFD, FD_CLOEXEC});
    }
  } else {
    task.syscallOrThrow("personality", __NR_personality, {header.getPersonality()});
  }
  if (target.atHome && !target.intoDeputy) {
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
      refillPipe(task, pair[0], pair[1], ends);
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
  }  // atHome

  // 6. Signals, timers, per-thread registrations.
  {
    std::map<uint32_t, KernelSigaction> actions;
    for (auto a : header.getSigActions()) {
      actions[a.getSigno()] = {a.getHandler(), a.getFlags(), a.getRestorer(), a.getMask()};
    }
    // The stub was just exec'd: its dispositions are SIG_DFL with no flags, except the ones
    // its parent ignored (execve(2) keeps SIG_IGN). Only what differs is set.
    uint64_t stubNonDefault = nonDefaultSignals(pid);
    for (int sig = 1; sig <= 64; ++sig) {
      if (sig == SIGKILL || sig == SIGSTOP) {
        continue;
      }
      KernelSigaction act{};  // SIG_DFL
      auto it = actions.find(sig);
      if (it != actions.end()) {
        act = it->second;
      } else if (!(stubNonDefault & (uint64_t{1} << (sig - 1)))) {
        continue;  // SIG_DFL already
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
  // The process's pid as it sees itself (a guest lives in its job's pid namespace).
  uint64_t self = task.syscallOrThrow("getpid", __NR_getpid, {});
  // A thread-directed signal is queued by its thread itself (`by`, whose id as it sees itself is
  // `tid`): the kernel lets a task queue a siginfo with a kernel or kill/tgkill si_code (SI_TKILL
  // of pthread_kill) only on itself.
  auto queue = [&](proto::PendingSignal::Reader p, PtraceTask& by, uint64_t tid) {
    auto info = p.getSiginfo();
    KJ_REQUIRE(info.size() == sizeof(siginfo_t), "bad siginfo in the image");
    siginfo_t si;
    memcpy(&si, info.begin(), sizeof(si));
    if (si.si_signo == SIGKILL || si.si_signo == SIGSTOP) {
      return;
    }
    uint64_t at = writeScratch(&si, sizeof(si));
    if (p.getShared()) {
      by.syscallOrThrow("rt_sigqueueinfo", __NR_rt_sigqueueinfo, {self, uint64_t(si.si_signo), at});
    } else {
      by.syscallOrThrow("rt_tgsigqueueinfo", __NR_rt_tgsigqueueinfo,
                        {self, tid, uint64_t(si.si_signo), at});
    }
  };

  // 6b. The other threads: each made by clone3 from the leader with its own id (set_tid) and
  // clear-child-tid address, stopped at birth (PTRACE_O_TRACECLONE: an auto-attached task starts
  // in PTRACE_EVENT_STOP), then given its own registrations from inside (sigaltstack,
  // robust list, rseq are per thread); registers and mask come last, at the end.
  std::vector<PtraceTask> others;
  auto threadList = header.getThreads();
  if (threadList.size() > 1) {
    KJ_SYSCALL(::ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE),
               pid);
  }
  KJ_DEFER({
    if (!others.empty()) {
      ::ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD);
    }
  });
  for (size_t i = 1; i < threadList.size(); ++i) {
    auto t = threadList[i];
    KJ_REQUIRE(t.getRegs().size() == sizeof(user_regs_struct) &&
                   t.getXstate().size() == imageXstate.size(),
               "bad register blob in the image", t.getTid());
    struct clone_args args {};
    args.flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;
    if (t.getTidAddressKnown() && t.getTidAddress() != 0) {
      args.flags |= CLONE_CHILD_CLEARTID;
      args.child_tid = t.getTidAddress();
    }
    pid_t wantedTid = t.getTid();
    uint64_t tidAt = writeScratch(&wantedTid, sizeof(wantedTid), 512);
    args.set_tid = tidAt;
    args.set_tid_size = 1;
    long tid = task.syscall(__NR_clone3, {writeScratch(&args, sizeof(args)), sizeof(args)});
    KJ_REQUIRE(tid == wantedTid,
               kj::str("cannot give thread ", wantedTid, " its id back (clone3 with set_tid: ",
                       tid < 0 ? strerror(int(-tid)) : "another id", ")"));
    // Its id here: the clone event's (a guest's namespace is not ours).
    if (task.lastChild() > 0) {
      tid = task.lastChild();
    }
    for (;;) {
      int status = waitTask(tid);
      KJ_REQUIRE(WIFSTOPPED(status), "a restored thread ended", tid, describeStatus(status));
      // Seized tracees' new threads start in PTRACE_EVENT_STOP; a PTRACE_TRACEME tracee's (a
      // guest's stub) with a SIGSTOP, which the first injection suppresses.
      if (ptraceEvent(status) == PTRACE_EVENT_STOP ||
          (ptraceEvent(status) == 0 && WSTOPSIG(status) == SIGSTOP)) {
        break;
      }
      KJ_SYSCALL(::ptrace(PTRACE_CONT, tid, 0, 0), tid);
    }
    others.emplace_back(tid);
    PtraceTask& other = others.back();
    other.setSyscallInstruction(stubInsn);
    other.setSigmask(~0ull);
    stack_t ss{};
    ss.ss_sp = reinterpret_cast<void*>(t.getAltStackSp());
    ss.ss_size = t.getAltStackSize();
    ss.ss_flags = t.getAltStackFlags() & ~SS_ONSTACK;
    if (t.getAltStackSp() == 0 && ss.ss_size == 0) {
      ss.ss_flags = SS_DISABLE;
    }
    other.syscallOrThrow("sigaltstack", __NR_sigaltstack, {writeScratch(&ss, sizeof(ss)), 0});
    if (t.getRobustListHead() != 0) {
      other.syscallOrThrow("set_robust_list", __NR_set_robust_list,
                           {t.getRobustListHead(), t.getRobustListLen()});
    }
    if (t.getRseqAddr() != 0) {
      other.syscallOrThrow("rseq", __NR_rseq,
                           {t.getRseqAddr(), t.getRseqSize(), 0, t.getRseqSignature()});
    }
    stats.injectedSyscalls += other.injected();
  }

  for (auto p : header.getPending()) {
    queue(p, task, self);
  }
  for (auto p : thread.getPending()) {
    queue(p, task, self);
  }
  for (size_t i = 1; i < threadList.size(); ++i) {
    for (auto p : threadList[i].getPending()) {
      queue(p, others[i - 1], uint64_t(threadList[i].getTid()));
    }
  }

  if (target.beforeStubUnmap) {
    target.beforeStubUnmap(task, others, scratchPtr);
  }

  // 7. The stub's pages, the last of the stub; /proc/PID/exe names the image's program when
  // this process may change it (CAP_SYS_RESOURCE and CAP_CHECKPOINT_RESTORE).
  long exeFd = -1;
  if (target.atHome) {
    std::string exePath = target.intoDeputy && !target.exePath.empty()
                              ? target.exePath
                              : pathOf(header.getExe().getPath());
    exeFd = task.syscall(__NR_openat,
                         {uint64_t(AT_FDCWD), writePath(exePath), O_RDONLY | O_CLOEXEC, 0});
  }
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
  stats.injectedSyscalls += task.injected();
  for (size_t i = 0; i < others.size(); ++i) {
    auto t = threadList[i + 1];
    user_regs_struct r;
    memcpy(&r, t.getRegs().begin(), sizeof(r));
    r.orig_rax = static_cast<uint64_t>(-1);
    others[i].setXstate(std::span<const uint8_t>(t.getXstate().begin(), t.getXstate().size()));
    others[i].setRegs(r);
    others[i].setSigmask(t.getSigBlocked());
  }
  ::ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD);
  for (auto& other : others) {
    if (target.keptThreads != nullptr) {
      target.keptThreads->push_back(other.pid());
    } else {
      KJ_SYSCALL(::ptrace(PTRACE_DETACH, other.pid(), 0, 0), other.pid());
    }
  }
  others.clear();
  stats.totalTime = since();
  return stats;
}

}  // namespace

RestoreStats restoreImage(ImageReader& source, pid_t pid) {
  return restoreImage(source, pid, ResumeOptions{});
}

RestoreStats restoreImage(ImageReader& source, pid_t pid, const ResumeOptions& options) {
  std::vector<std::string> problems = checkResumable(source.header(), options);
  if (!problems.empty()) {
    failWith("the image cannot be resumed here: ", problems);
  }
  Target target;
  target.mappedPath = [](proto::FileRef::Reader ref) { return pathOf(ref.getPath()); };
  target.intoDeputy = options.intoDeputy;
  target.closeOnExec = options.closeOnExec;
  target.exePath = options.exePath;
  RestoreStats stats = rebuild(source, pid, target);
  KJ_SYSCALL(::ptrace(PTRACE_DETACH, pid, 0, 0), pid);
  return stats;
}

void execStubChild(int memfd, pid_t parent, const RestoreOptions& options, int highFd) {
  // Only async-signal-safe calls from here on: the caller may have threads.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) {
    ::_exit(127);
  }
  // A process group of its own whose parent (the caller) is in another group of the session:
  // the group is not orphaned, so the kernel does not discard SIGTSTP/SIGTTIN/SIGTTOU sent to
  // it (job control of a guest works, signal(7), credentials(7) "orphaned process group").
  ::setpgid(0, 0);
  // Only SIG_IGN survives exec; the image sets its own dispositions later.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) {
    ::sigaction(sig, &dfl, nullptr);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  int copies[64];
  size_t n = std::min<size_t>(options.fdMap.size(), 64);
  for (size_t i = 0; i < n; ++i) {
    copies[i] = ::fcntl(options.fdMap[i].first, F_DUPFD_CLOEXEC, highFd);
    if (copies[i] < 0) {
      ::_exit(127);
    }
  }
  if (!options.keepAllFds) {
    ::syscall(SYS_close_range, 0u, ~0u, CLOSE_RANGE_CLOEXEC);
  }
  for (size_t i = 0; i < n; ++i) {
    if (::dup2(copies[i], options.fdMap[i].second) < 0) {
      ::_exit(127);
    }
  }
  if (::ptrace(PTRACE_TRACEME, 0, 0, 0) != 0) {
    ::_exit(127);
  }
  char name[] = "mos-stub";
  char* argv[] = {name, nullptr};
  char* envp[] = {nullptr};
  ::syscall(SYS_execveat, memfd, "", argv, envp, AT_EMPTY_PATH);
  ::_exit(127);
}

RestoredGuest restoreGuest(ImageReader& source, const FileResolver& files,
                           const RestoreOptions& options) {
  // 1. Checks and files, before anything is forked.
  auto header = source.header();
  std::vector<std::string> problems = checkRestorableHere(header);
  if (!problems.empty()) {
    failWith("the image cannot run on this node: ", problems);
  }
  KJ_REQUIRE(options.fdMap.size() <= 64, "restoreGuest: too many fdMap entries");
  KJ_REQUIRE(options.seccompFilter.size() * sizeof(sock_filter) <= SCRATCH_SIZE - 4096,
             "restoreGuest: seccomp program too large", options.seccompFilter.size());
  std::map<std::string, std::string> localPaths;  // home path -> local path
  for (auto m : header.getMappings()) {
    if (m.getKind() == Kind::FILE) {
      std::string home = pathOf(m.getFile().getPath());
      if (localPaths.find(home) == localPaths.end()) {
        std::string local = files(m.getFile());
        KJ_REQUIRE(!local.empty() && local.size() < 4000, "restoreGuest: unusable local path",
                   local);
        localPaths.emplace(home, std::move(local));
      }
    }
  }

  // 2. The stub, from a memfd, at the wanted pid.
  auto stubStarted = std::chrono::steady_clock::now();
  int memfd;
  KJ_SYSCALL(memfd = ::memfd_create("mos-stub", MFD_CLOEXEC));
  kj::AutoCloseFd memfdOwner(memfd);
  for (size_t done = 0; done < STUB_IMAGE_SIZE;) {
    ssize_t n;
    KJ_SYSCALL(n = ::write(memfd, STUB_IMAGE + done, STUB_IMAGE_SIZE - done));
    done += n;
  }
  int highFd = memfd;
  for (auto& [from, to] : options.fdMap) {
    highFd = std::max({highFd, from, to});
  }
  highFd += 1;
  pid_t parent = options.pid > 0 ? 0 : ::getpid();
  pid_t pid;
  if (options.pid > 0) {
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
    // Its threads made so far are traced by us: reaped by us, before the leader can be.
    std::vector<pid_t> tids;
    try {
      tids = taskIds(pid);
    } catch (...) {
    }
    ::kill(pid, SIGKILL);
    int ignored;
    for (pid_t tid : tids) {
      while (tid != pid && ::waitpid(tid, &ignored, __WALL) < 0 && errno == EINTR) {
      }
    }
    while (::waitpid(pid, &ignored, __WALL) < 0 && errno == EINTR) {
    }
  });
  int status = waitTask(pid);
  KJ_REQUIRE(WIFSTOPPED(status) && WSTOPSIG(status) == SIGTRAP, "restoreGuest: stub did not start",
             describeStatus(status));
  KJ_SYSCALL(::ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL));

  // 3. The image, then credentials and the sandbox before the stub's pages go.
  kj::AutoCloseFd listener;
  Target target;
  target.atHome = false;
  target.mappedPath = [&](proto::FileRef::Reader ref) {
    return localPaths.at(pathOf(ref.getPath()));
  };
  std::vector<pid_t> threads;
  target.keptThreads = &threads;
  target.beforeStubUnmap = [&](PtraceTask& task, std::vector<PtraceTask>& others,
                               RemotePtr<uint8_t> scratchPtr) {
    uint64_t scratch = scratchPtr.addr();
    // Credentials and no_new_privs are per thread: each of the others drops them itself
    // (its clone3 at its home tid needed the privileges first).
    for (PtraceTask& other : others) {
      if (options.dropPrivileges) {
        other.syscallOrThrow("setgroups", __NR_setgroups, {0, 0});
        other.syscallOrThrow("setresgid", __NR_setresgid, {options.gid, options.gid, options.gid});
        other.syscallOrThrow("setresuid", __NR_setresuid, {options.uid, options.uid, options.uid});
      }
      if (!options.seccompFilter.empty()) {
        other.syscallOrThrow("prctl(PR_SET_NO_NEW_PRIVS)", __NR_prctl,
                             {PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0});
      }
    }
    if (options.dropPrivileges) {
      task.syscallOrThrow("setgroups", __NR_setgroups, {0, 0});
      task.syscallOrThrow("setresgid", __NR_setresgid, {options.gid, options.gid, options.gid});
      task.syscallOrThrow("setresuid", __NR_setresuid, {options.uid, options.uid, options.uid});
      task.syscallOrThrow("prctl(PR_SET_PDEATHSIG)", __NR_prctl, {PR_SET_PDEATHSIG, SIGKILL});
      task.syscallOrThrow("prctl(PR_SET_DUMPABLE)", __NR_prctl, {PR_SET_DUMPABLE, 1});
    }
    if (options.seccompFilter.empty()) {
      return;
    }
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
    // The other threads get the same filter (TSYNC; with a listener the kernel wants
    // TSYNC_ESRCH), so every thread's calls reach the one listener.
    uint64_t sync =
        others.empty() ? 0 : SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
    uint64_t remoteListener = task.syscallOrThrow(
        "seccomp(SECCOMP_SET_MODE_FILTER)", __NR_seccomp,
        {SECCOMP_SET_MODE_FILTER,
         SECCOMP_FILTER_FLAG_NEW_LISTENER | sync | static_cast<uint64_t>(options.seccompExtraFlags),
         scratch});
    listener = takeFd(pid, int(remoteListener));
    int fd = listener.get();
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
  };
  auto stubTime = std::chrono::duration_cast<std::chrono::microseconds>(
      std::chrono::steady_clock::now() - stubStarted);
  RestoreStats stats = rebuild(source, pid, target);
  KJ_SYSCALL(::ptrace(PTRACE_DETACH, pid, 0, 0), pid);
  detached = true;
  RestoredGuest guest;
  guest.pid = pid;
  guest.listener = kj::mv(listener);
  guest.threads = kj::mv(threads);
  guest.pages = stats.pages;
  guest.stubTime = stubTime;
  guest.mappingsTime = stats.mappingsTime;
  guest.pagesTime = stats.pagesTime;
  guest.totalTime = stats.totalTime;
  return guest;
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
