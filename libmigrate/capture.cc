// capture(): the source side of a migration (notes/migration.md §4.2).
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cinttypes>
#include <cstring>

#include <capnp/orphan.h>
#include <kj/debug.h>
#include <kj/io.h>

#include "migrate.h"
#include "proc_maps.h"
#include "ptrace_task.h"

namespace mos::migrate {

namespace {

constexpr uint64_t PAGE = 4096;
constexpr uint64_t PM_PRESENT = 1ull << 63;
constexpr uint64_t PM_SWAP = 1ull << 62;
constexpr uint64_t PM_FILE_OR_SHARED = 1ull << 61;
constexpr uint64_t MAX_RUN = 64ull << 20;  // bytes per PageRun: keeps each Data blob modest

std::string procPath(pid_t pid, const char* what) {
  return "/proc/" + std::to_string(pid) + "/" + what;
}

int countThreads(pid_t pid) {
  std::string path = procPath(pid, "task");
  DIR* dir = ::opendir(path.c_str());
  KJ_REQUIRE(dir != nullptr, "cannot list threads", path, strerror(errno));
  int n = 0;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') {
      ++n;
    }
  }
  ::closedir(dir);
  return n;
}

void setFileRef(proto::FileRef::Builder ref, const std::string& path, const struct stat& st) {
  ref.setPath(kj::arrayPtr(reinterpret_cast<const kj::byte*>(path.data()), path.size()));
  ref.setDev(st.st_dev);
  ref.setIno(st.st_ino);
  ref.setSize(st.st_size);
  ref.setMtimeNs(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
}

bool endsWith(const std::string& s, const char* suffix) {
  size_t n = strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// Fields of /proc/PID/stat, 1-based as in proc(5).
std::vector<uint64_t> statFields(pid_t pid) {
  std::string text = readProcFile(procPath(pid, "stat"));
  size_t close = text.rfind(')');
  KJ_REQUIRE(close != std::string::npos, "unparsable /proc/PID/stat", pid);
  std::vector<uint64_t> fields(4, 0);  // [0] unused; 1 (pid), 2 (comm), 3 (state) not needed
  const char* p = text.c_str() + close + 2;
  p = strchr(p, ' ');
  while (p != nullptr && *p) {
    ++p;
    fields.push_back(strtoull(p, nullptr, 10));
    p = strchr(p, ' ');
  }
  size_t count = fields.size();
  KJ_REQUIRE(count > 51, "short /proc/PID/stat", pid, count);
  return fields;
}

uint64_t statusMask(const std::string& status, const char* key) {
  size_t at = status.find(key);
  KJ_REQUIRE(at != std::string::npos, "no field in /proc/PID/status", key);
  return strtoull(status.c_str() + at + strlen(key), nullptr, 16);
}

// A byte range to copy and the capnp blob it goes to.
struct Run {
  uint64_t start;
  uint64_t size;
};

}  // namespace

void capture(pid_t pid, proto::MigrationImage::Builder image) {
  int threads = countThreads(pid);
  KJ_REQUIRE(threads == 1, "capture: only single-threaded processes can be captured", pid, threads);
  PtraceTask task(pid);

  // Registers, with CRIU's syscall-restart fixup (compel/arch/x86/src/lib/infect.c): a task
  // stopped on its way out of an interrupted syscall re-issues it where it is restored.
  user_regs_struct regs = task.getRegs();
  if (static_cast<int64_t>(regs.orig_rax) >= 0) {
    int64_t rax = static_cast<int64_t>(regs.rax);
    if (rax == -512 || rax == -513 || rax == -514) {  // ERESTARTSYS, NOINTR, NOHAND
      regs.rax = regs.orig_rax;
      regs.rip -= 2;
    } else if (rax == -516) {  // ERESTART_RESTARTBLOCK
      regs.rax = static_cast<uint64_t>(-EINTR);
    }
  }
  // rseq (CRIU cr-dump.c fixup_thread_rseq): a task stopped inside a restartable sequence's
  // critical section resumes at its abort handler, as the kernel would do on preemption.
  struct {
    uint64_t abiPointer;
    uint32_t abiSize;
    uint32_t signature;
    uint32_t flags;
    uint32_t pad;
  } rseq{};
  if (::ptrace(static_cast<__ptrace_request>(0x420f /* PTRACE_GET_RSEQ_CONFIGURATION */), pid,
               sizeof(rseq), &rseq) < 0) {
    rseq = {};
  }
  siginfo_t stopInfo{};
  if (::ptrace(PTRACE_GETSIGINFO, pid, 0, &stopInfo) == 0 &&
      stopInfo.si_code == (SIGTRAP | (PTRACE_EVENT_EXEC << 8))) {
    // At the exec event stop the old program's registration is still there: execve drops it
    // (rseq_execve) only after this stop. The new program has none.
    rseq = {};
  }
  if (rseq.abiPointer != 0) {
    uint64_t csPtr = 0;
    task.readMem(RemotePtr<uint8_t>(rseq.abiPointer + 8),
                 std::span<uint8_t>(reinterpret_cast<uint8_t*>(&csPtr), 8));
    if (csPtr != 0) {
      struct {
        uint32_t version, flags;
        uint64_t startIp, postCommitOffset, abortIp;
      } cs{};
      task.readMem(RemotePtr<uint8_t>(csPtr),
                   std::span<uint8_t>(reinterpret_cast<uint8_t*>(&cs), sizeof(cs)));
      if (regs.rip >= cs.startIp && regs.rip < cs.startIp + cs.postCommitOffset) {
        regs.rip = cs.abortIp;
      }
    }
  }
  std::vector<uint8_t> xstate = task.getXstate();
  uint64_t sigmask = task.getSigmask();

  auto threadList = image.initThreads(1);
  auto thread = threadList[0];
  thread.setTid(pid);
  thread.setRegs(kj::arrayPtr(reinterpret_cast<const kj::byte*>(&regs), sizeof(regs)));
  thread.setXstate(kj::arrayPtr(xstate.data(), xstate.size()));
  thread.setSigBlocked(sigmask);
  thread.setRseqAddr(rseq.abiPointer);
  thread.setRseqSize(rseq.abiSize);
  thread.setRseqSignature(rseq.signature);

  image.setArch("x86_64");
  struct utsname uts;
  KJ_SYSCALL(::uname(&uts));
  image.setKernelRelease(uts.release);

  // Mappings and which of their pages carry bytes that the image must hold.
  std::vector<MapsEntry> maps = readMaps(pid);
  std::string pagemapPath = procPath(pid, "pagemap");
  int pagemapFd;
  KJ_SYSCALL(pagemapFd = ::open(pagemapPath.c_str(), O_RDONLY | O_CLOEXEC), pagemapPath);
  kj::AutoCloseFd pagemapOwner(pagemapFd);

  std::vector<Run> runs;
  auto addPage = [&](uint64_t addr) {
    if (!runs.empty() && runs.back().start + runs.back().size == addr &&
        runs.back().size < MAX_RUN) {
      runs.back().size += PAGE;
    } else {
      runs.push_back({addr, PAGE});
    }
  };

  auto mappingList = image.initMappings(maps.size());
  for (size_t i = 0; i < maps.size(); ++i) {
    const MapsEntry& e = maps[i];
    auto m = mappingList[i];
    m.setStart(e.start);
    m.setEnd(e.end);
    m.setProt(e.prot);
    m.setShared(e.shared);
    m.setName(e.path);

    enum { NONE, ALL_PRESENT, COWED_ONLY, EVERY_PAGE } copy = NONE;
    if (e.path == "[vdso]") {
      m.setKind(proto::Mapping::Kind::VDSO);
    } else if (e.path == "[vvar]") {
      m.setKind(proto::Mapping::Kind::VVAR);
    } else if (e.path == "[vvar_vclock]") {
      m.setKind(proto::Mapping::Kind::VVAR_VCLOCK);
    } else if (e.path == "[vsyscall]") {
      m.setKind(proto::Mapping::Kind::VSYSCALL);
    } else if (e.path == "[stack]") {
      m.setKind(proto::Mapping::Kind::STACK);
      copy = ALL_PRESENT;
    } else if (e.path == "[heap]") {
      m.setKind(proto::Mapping::Kind::HEAP);
      copy = ALL_PRESENT;
    } else if (e.inode == 0 || e.path.empty()) {
      m.setKind(proto::Mapping::Kind::ANONYMOUS);
      copy = ALL_PRESENT;
    } else if (e.shared && e.devMajor == 0 && e.devMinor == 1) {
      // Shared anonymous memory (shmem: "/dev/zero (deleted)", "/SYSV..."): its bytes travel.
      m.setKind(proto::Mapping::Kind::ANONYMOUS);
      copy = ALL_PRESENT;
    } else if (endsWith(e.path, " (deleted)") || e.path[0] != '/') {
      // No file on any node has this content any more (deleted file, memfd): ship every page.
      KJ_REQUIRE(!(e.shared && (e.prot & PROT_WRITE)),
                 "capture: shared writable mapping of a deleted file", e.path);
      m.setKind(proto::Mapping::Kind::ANONYMOUS);
      copy = EVERY_PAGE;
    } else {
      KJ_REQUIRE(!(e.shared && (e.prot & PROT_WRITE)),
                 "capture: shared writable file mappings cannot migrate", e.path);
      m.setKind(proto::Mapping::Kind::FILE);
      m.setOffset(e.offset);
      char range[64];
      snprintf(range, sizeof(range), "map_files/%" PRIx64 "-%" PRIx64, e.start, e.end);
      struct stat st;
      if (::stat(procPath(pid, range).c_str(), &st) != 0) {
        KJ_SYSCALL(::stat(e.path.c_str(), &st), e.path);
      }
      KJ_REQUIRE(st.st_ino == e.inode, "capture: mapped file changed under its path", e.path);
      setFileRef(m.initFile(), e.path, st);
      copy = e.shared ? NONE : COWED_ONLY;
    }
    if (copy == NONE) {
      continue;
    }
    if (copy == EVERY_PAGE) {
      for (uint64_t a = e.start; a < e.end; a += PAGE) {
        addPage(a);
      }
      continue;
    }
    // pagemap(5): one 64-bit entry per page; read it in chunks.
    constexpr size_t CHUNK = 8192;
    std::vector<uint64_t> entries(CHUNK);
    for (uint64_t a = e.start; a < e.end; a += CHUNK * PAGE) {
      size_t pages = std::min<uint64_t>(CHUNK, (e.end - a) / PAGE);
      ssize_t n;
      KJ_SYSCALL(n = ::pread(pagemapFd, entries.data(), pages * 8, (a / PAGE) * 8), pagemapPath);
      KJ_REQUIRE(static_cast<size_t>(n) == pages * 8, "short pagemap read", pid, a);
      for (size_t p = 0; p < pages; ++p) {
        uint64_t pm = entries[p];
        bool take = copy == ALL_PRESENT
                        ? (pm & (PM_PRESENT | PM_SWAP)) != 0
                        : ((pm & PM_PRESENT) && !(pm & PM_FILE_OR_SHARED)) || (pm & PM_SWAP);
        if (take) {
          addPage(a + p * PAGE);
        }
      }
    }
  }

  // Page contents, read straight into the message's blobs.
  auto orphanage = capnp::Orphanage::getForMessageContaining(image);
  auto pageList = image.initPages(runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    auto orphan = orphanage.newOrphan<capnp::Data>(runs[i].size);
    auto bytes = orphan.get();
    std::span<uint8_t> out(bytes.begin(), bytes.size());
    size_t fast = task.readMemFast(RemotePtr<uint8_t>(runs[i].start), out);
    if (fast < out.size()) {
      // Unreadable pages (PROT_NONE) or a partial copy: /proc/PID/mem forces its way.
      task.readMem(RemotePtr<uint8_t>(runs[i].start + fast), out.subspan(fast));
    }
    pageList[i].setStart(runs[i].start);
    pageList[i].adoptData(kj::mv(orphan));
  }

  // mm layout: /proc/PID/stat fields 26-28 and 45-51 (proc(5)). The current brk is not in
  // /proc; it is the end of [heap] when there is one, else the heap is still empty.
  std::vector<uint64_t> f = statFields(pid);
  auto mm = image.initMm();
  mm.setStartCode(f[26]);
  mm.setEndCode(f[27]);
  mm.setStartStack(f[28]);
  mm.setStartData(f[45]);
  mm.setEndData(f[46]);
  mm.setStartBrk(f[47]);
  mm.setArgStart(f[48]);
  mm.setArgEnd(f[49]);
  mm.setEnvStart(f[50]);
  mm.setEnvEnd(f[51]);
  uint64_t brk = f[47];
  for (const MapsEntry& e : maps) {
    if (e.path == "[heap]") {
      brk = e.end;
    }
  }
  mm.setBrk(brk);

  std::string auxv = readProcFile(procPath(pid, "auxv"));
  image.setAuxv(kj::arrayPtr(reinterpret_cast<const kj::byte*>(auxv.data()), auxv.size()));

  std::string status = readProcFile(procPath(pid, "status"));
  image.setSigIgnored(statusMask(status, "SigIgn:"));

  char exePath[PATH_MAX];
  ssize_t len;
  KJ_SYSCALL(len = ::readlink(procPath(pid, "exe").c_str(), exePath, sizeof(exePath) - 1), pid);
  exePath[len] = 0;
  struct stat exeStat;
  KJ_SYSCALL(::stat(procPath(pid, "exe").c_str(), &exeStat), pid);
  setFileRef(image.initExe(), exePath, exeStat);

  std::string comm = readProcFile(procPath(pid, "comm"));
  while (!comm.empty() && comm.back() == '\n') {
    comm.pop_back();
  }
  image.setCommand(comm);

  std::string cmdline = readProcFile(procPath(pid, "cmdline"));
  std::vector<std::string> args;
  size_t start = 0;
  while (start < cmdline.size()) {
    size_t nul = cmdline.find('\0', start);
    if (nul == std::string::npos) {
      nul = cmdline.size();
    }
    args.push_back(cmdline.substr(start, nul - start));
    start = nul + 1;
  }
  auto argv = image.initArgv(args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    argv.set(i, kj::arrayPtr(reinterpret_cast<const kj::byte*>(args[i].data()), args[i].size()));
  }
}

}  // namespace mos::migrate
