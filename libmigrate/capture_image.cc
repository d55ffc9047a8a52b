// captureImage(): a stopped, running process to a migration stream (checkpoint.h).
// Steps: registers with the restart and rseq fixups, xsave state, signal mask and queues
// (ptrace); dispositions, sigaltstack, itimers, tid address (injected syscalls, every signal
// blocked, one scratch page mapped and unmapped again); mappings and process state (/proc);
// then the header and the touched pages, streamed one run at a time.
#include <dirent.h>
#include <elf.h>
#include <fcntl.h>
#include <linux/prctl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <functional>
#include <map>

#include <kj/debug.h>

#include "checkpoint.h"
#include "image_internal.h"
#include "proc_maps.h"
#include "ptrace_task.h"
#include "syscall_table.h"

namespace mos::migrate {

namespace {

constexpr uint64_t PM_PRESENT = 1ull << 63;
constexpr uint64_t PM_SWAP = 1ull << 62;
constexpr uint64_t PM_FILE_OR_SHARED = 1ull << 61;

struct ptrace_rseq_configuration {
  uint64_t rseqAbiPointer;
  uint32_t rseqAbiSize;
  uint32_t signature;
  uint32_t flags;
  uint32_t pad;
};
constexpr int PTRACE_GET_RSEQ_CONFIGURATION_REQUEST = 0x420f;

struct KernelSigaction {
  uint64_t handler, flags, restorer, mask;
};

// A reason why this process cannot be captured, worded for the user (no KJ condition text).
[[noreturn]] void refuse(kj::String why) {
  throw kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::mv(why));
}

// The tasks of `pid` (/proc/PID/task), the thread group leader first, the others in tid order.
std::vector<pid_t> listThreads(pid_t pid) {
  std::string path = procPath(pid, "task");
  DIR* dir = ::opendir(path.c_str());
  KJ_REQUIRE(dir != nullptr, "cannot list threads", path, strerror(errno));
  std::vector<pid_t> out;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.' && atoi(e->d_name) != pid) {
      out.push_back(atoi(e->d_name));
    }
  }
  ::closedir(dir);
  std::sort(out.begin(), out.end());
  out.insert(out.begin(), pid);
  return out;
}

}  // namespace

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

namespace {

// Fields of /proc/PID/stat, 1-based as in proc(5).
std::vector<uint64_t> statFields(pid_t pid) {
  std::string text = readProcFile(procPath(pid, "stat"));
  size_t close = text.rfind(')');
  KJ_REQUIRE(close != std::string::npos, "unparsable /proc/PID/stat", pid);
  std::vector<uint64_t> fields(4, 0);
  const char* p = text.c_str() + close + 2;
  p = strchr(p, ' ');
  while (p != nullptr && *p) {
    ++p;
    fields.push_back(strtoull(p, nullptr, 10));
    p = strchr(p, ' ');
  }
  KJ_REQUIRE(fields.size() > 51, "short /proc/PID/stat", pid, fields.size());
  return fields;
}

// Whether this process is the tracer of task `tid` (TracerPid of /proc/TID/status).
bool tracedByUs(pid_t tid) {
  std::string status = readProcFile("/proc/" + std::to_string(tid) + "/status");
  return static_cast<pid_t>(procField(status, "TracerPid:", 10)) == ::getpid();
}

std::string readLink(const std::string& path) {
  char buf[PATH_MAX];
  ssize_t n;
  KJ_SYSCALL(n = ::readlink(path.c_str(), buf, sizeof(buf) - 1), path);
  return std::string(buf, n);
}

kj::ArrayPtr<const kj::byte> bytesOf(const std::string& s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

// Which pages of a mapping the stream carries.
enum class Copy { NONE, PRESENT, WRITTEN, EVERY };

// Fills `m` from a maps line; returns which pages to copy.
Copy describeMapping(pid_t pid, const MapsEntry& e, proto::Mapping::Builder m) {
  m.setStart(e.start);
  m.setEnd(e.end);
  m.setProt(e.prot);
  m.setShared(e.shared);
  m.setName(e.path);
  auto endsWith = [&](const char* suffix) {
    size_t n = strlen(suffix);
    return e.path.size() >= n && e.path.compare(e.path.size() - n, n, suffix) == 0;
  };
  if (e.path == "[vdso]") {
    m.setKind(proto::Mapping::Kind::VDSO);
    return Copy::NONE;
  }
  if (e.path == "[vvar]") {
    m.setKind(proto::Mapping::Kind::VVAR);
    return Copy::NONE;
  }
  if (e.path == "[vvar_vclock]") {
    m.setKind(proto::Mapping::Kind::VVAR_VCLOCK);
    return Copy::NONE;
  }
  if (e.path == "[vsyscall]") {
    m.setKind(proto::Mapping::Kind::VSYSCALL);
    return Copy::NONE;
  }
  if (e.path == "[stack]") {
    m.setKind(proto::Mapping::Kind::STACK);
    return Copy::PRESENT;
  }
  if (e.path == "[heap]") {
    m.setKind(proto::Mapping::Kind::HEAP);
    return Copy::PRESENT;
  }
  if (e.inode == 0 || e.path.empty() || (e.shared && e.devMajor == 0 && e.devMinor == 1)) {
    // Anonymous memory, private or shared (shmem shows as "/dev/zero (deleted)"): the sharing
    // with other processes does not survive a move, the bytes do.
    if (e.shared && e.path.rfind("/SYSV", 0) == 0) {
      refuse(kj::str("System V shared memory cannot be checkpointed or moved (", e.path, ")"));
    }
    m.setKind(proto::Mapping::Kind::ANONYMOUS);
    return Copy::PRESENT;
  }
  if (endsWith(" (deleted)") || e.path[0] != '/') {
    // No file has this content any more (a deleted file, a memfd): every page travels.
    if (e.shared && (e.prot & PROT_WRITE)) {
      refuse(kj::str("a shared writable mapping of a deleted file or memfd cannot be checkpointed ",
                     "or moved (", e.path, ")"));
    }
    m.setKind(proto::Mapping::Kind::ANONYMOUS);
    return Copy::EVERY;
  }
  if (e.shared && (e.prot & PROT_WRITE)) {
    refuse(
        kj::str("a shared writable file mapping cannot be checkpointed or moved (", e.path, ")"));
  }
  m.setKind(proto::Mapping::Kind::FILE);
  m.setOffset(e.offset);
  char range[64];
  snprintf(range, sizeof(range), "map_files/%" PRIx64 "-%" PRIx64, e.start, e.end);
  struct stat st;
  if (::stat(procPath(pid, range).c_str(), &st) != 0) {
    KJ_SYSCALL(::stat(e.path.c_str(), &st), e.path);
  }
  KJ_REQUIRE(st.st_ino == e.inode, "a mapped file was replaced under its path", e.path);
  setFileRef(m.initFile(), e.path, st);
  return e.shared ? Copy::NONE : Copy::WRITTEN;
}

// A pipe end among the process's descriptors.
struct PipeEnd {
  int fd;
  ino_t ino;
  bool writer;
};

// Descriptors that are ends of anonymous pipes; read ends' queued bytes are asked with FIONREAD,
// and a pipe whose write end is the process's own too has them drained and written back.
std::vector<PipeEnd> pipeEnds(pid_t pid) {
  std::vector<PipeEnd> out;
  std::string dirPath = procPath(pid, "fd");
  DIR* dir = ::opendir(dirPath.c_str());
  KJ_REQUIRE(dir != nullptr, "cannot list descriptors", dirPath, strerror(errno));
  while (dirent* e = ::readdir(dir)) {
    struct stat st;
    if (e->d_name[0] == '.' || ::stat((dirPath + "/" + e->d_name).c_str(), &st) != 0 ||
        !S_ISFIFO(st.st_mode)) {
      continue;
    }
    std::string info = readProcFile(procPath(pid, (std::string("fdinfo/") + e->d_name).c_str()));
    out.push_back(
        {atoi(e->d_name), st.st_ino, (procField(info, "flags:", 8) & O_ACCMODE) == O_WRONLY});
  }
  ::closedir(dir);
  return out;
}

// What the injected queries learnt of one pipe (keyed by a read end's descriptor).
struct PipeState {
  uint32_t unread = 0;  // bytes queued (FIONREAD)
  uint32_t size = 0;    // capacity (F_GETPIPE_SZ), bytes
  std::string data;     // the queued bytes, when the write end is the process's own too
  bool drained = false;
};

void describeFiles(pid_t pid, proto::ImageHeader::Builder header,
                   const std::map<int, PipeState>& pipes,
                   const std::function<bool(int)>& skip = nullptr) {
  std::string dirPath = procPath(pid, "fd");
  DIR* dir = ::opendir(dirPath.c_str());
  KJ_REQUIRE(dir != nullptr, "cannot list descriptors", dirPath, strerror(errno));
  std::vector<int> fds;
  while (dirent* e = ::readdir(dir)) {
    int fd = atoi(e->d_name);
    if (e->d_name[0] != '.' && !(pid == ::getpid() && fd == ::dirfd(dir)) && !(skip && skip(fd))) {
      fds.push_back(fd);
    }
  }
  ::closedir(dir);
  std::sort(fds.begin(), fds.end());
  auto list = header.initFiles(fds.size());
  for (size_t i = 0; i < fds.size(); ++i) {
    auto f = list[i];
    std::string fdPath = dirPath + "/" + std::to_string(fds[i]);
    f.setFd(fds[i]);
    std::string link = readLink(fdPath);
    f.setPath(bytesOf(link));
    std::string info = readProcFile(procPath(pid, ("fdinfo/" + std::to_string(fds[i])).c_str()));
    uint32_t flags = procField(info, "flags:", 8);
    f.setFlags(flags & ~O_CLOEXEC);
    f.setCloseOnExec(flags & O_CLOEXEC);
    f.setOffset(static_cast<int64_t>(procField(info, "pos:", 10)));
    struct stat st;
    if (::stat(fdPath.c_str(), &st) != 0 || link.empty() || link[0] != '/') {
      // Pipes ("pipe:[N]"), sockets ("socket:[N]"), anonymous inodes ("anon_inode:[eventfd]").
      if (::stat(fdPath.c_str(), &st) == 0 && S_ISFIFO(st.st_mode)) {
        f.setKind(proto::OpenFile::Kind::PIPE);
        f.setIno(st.st_ino);
        auto it = pipes.find(fds[i]);
        if (it != pipes.end()) {
          f.setUnread(it->second.unread);
          f.setPipeSize(it->second.size);
          if (it->second.drained) {
            f.setPipeData(bytesOf(it->second.data));
          }
        }
      } else if (::stat(fdPath.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
        f.setKind(proto::OpenFile::Kind::SOCKET);
      } else {
        f.setKind(proto::OpenFile::Kind::OTHER);
      }
      continue;
    }
    f.setDev(st.st_dev);
    f.setIno(st.st_ino);
    if (S_ISREG(st.st_mode)) {
      f.setKind(proto::OpenFile::Kind::REGULAR);
    } else if (S_ISDIR(st.st_mode)) {
      f.setKind(proto::OpenFile::Kind::DIRECTORY);
    } else if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) {
      f.setKind(proto::OpenFile::Kind::DEVICE);
    } else if (S_ISFIFO(st.st_mode)) {
      f.setKind(proto::OpenFile::Kind::PIPE);  // a named pipe: its writer is another process
    } else if (S_ISSOCK(st.st_mode)) {
      f.setKind(proto::OpenFile::Kind::SOCKET);
    } else {
      f.setKind(proto::OpenFile::Kind::OTHER);
    }
  }
}

// Register state as the process must resume: an interrupted system call re-issued (CRIU's
// fixup, compel/arch/x86/src/lib/infect.c; the kernel's own in arch_do_signal_or_restart,
// which no longer runs once we have injected calls), a restartable sequence aborted. A call
// that fails with EINTR whatever woke it (the table's eintrWhenWoken: rt_sigtimedwait) is
// re-issued too when `signalToTake` is false: then it was our interrupt that woke it.
user_regs_struct resumableRegs(PtraceTask& task, user_regs_struct regs,
                               const ptrace_rseq_configuration& rseq, bool signalToTake) {
  if (static_cast<int64_t>(regs.orig_rax) >= 0) {
    if (static_cast<int64_t>(regs.rax) == -EINTR && !signalToTake &&
        eintrWhenWoken(static_cast<int>(static_cast<int64_t>(regs.orig_rax)))) {
      regs.rax = static_cast<uint64_t>(-ERESTARTNOINTR);  // re-issued just below
    }
    switch (static_cast<int64_t>(regs.rax)) {
      case -512:  // ERESTARTSYS
      case -513:  // ERESTARTNOINTR
      case -514:  // ERESTARTNOHAND
        regs.rax = regs.orig_rax;
        regs.rip -= 2;
        break;
      case -516:  // ERESTART_RESTARTBLOCK: the kernel's restart block (a fresh process: EINTR)
        regs.rax = __NR_restart_syscall;
        regs.rip -= 2;
        break;
      default: break;
    }
  }
  regs.orig_rax = static_cast<uint64_t>(-1);
  if (rseq.rseqAbiPointer != 0) {
    uint64_t csPtr = 0;
    task.readMem(RemotePtr<uint8_t>(rseq.rseqAbiPointer + 8),
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
  return regs;
}

std::vector<siginfo_t> peekQueue(pid_t pid, bool shared) {
  std::vector<siginfo_t> out;
  for (;;) {
    __ptrace_peeksiginfo_args args{};
    args.off = out.size();
    args.flags = shared ? PTRACE_PEEKSIGINFO_SHARED : 0;
    args.nr = 32;
    siginfo_t buf[32];
    long n;
    KJ_SYSCALL(n = ::ptrace(PTRACE_PEEKSIGINFO, pid, &args, buf), pid);
    if (n == 0) {
      return out;
    }
    out.insert(out.end(), buf, buf + n);
  }
}

void setPending(capnp::List<proto::PendingSignal>::Builder list,
                const std::vector<siginfo_t>& infos, bool shared) {
  for (size_t i = 0; i < infos.size(); ++i) {
    list[i].setShared(shared);
    list[i].setSiginfo(
        kj::arrayPtr(reinterpret_cast<const kj::byte*>(&infos[i]), sizeof(siginfo_t)));
  }
}

// The bytes queued in a pipe whose both ends are the process's own: read out of it with an
// injected read(2) into a temporary mapping and written straight back with write(2) (the pipe
// is then empty, so its capacity takes them in one call), so the process finds its pipe as it
// was. Throws kj::Exception naming the descriptor if the pipe gives fewer bytes than FIONREAD
// said or does not take them back (the process would then have lost them; with every signal
// blocked and the process stopped, nothing else touches the pipe).
std::string drainAndRefill(PtraceTask& task, int readFd, int writeFd, size_t queued) {
  size_t length = (queued + IMAGE_PAGE - 1) / IMAGE_PAGE * IMAGE_PAGE;
  uint64_t buffer = task.syscallOrThrow(
      "mmap(pipe buffer)", __NR_mmap,
      {0, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, ~0ull, 0});
  KJ_DEFER(task.syscall(__NR_munmap, {buffer, length}));
  long got = task.syscall(__NR_read, {uint64_t(readFd), buffer, queued});
  KJ_REQUIRE(got == long(queued), "a pipe of the process's own did not give its queued bytes",
             readFd, queued, got);
  std::string data(queued, '\0');
  task.readMem(RemotePtr<uint8_t>(buffer),
               std::span<uint8_t>(reinterpret_cast<uint8_t*>(data.data()), data.size()));
  size_t put = 0;
  while (put < queued) {
    long n = task.syscall(__NR_write, {uint64_t(writeFd), buffer + put, queued - put});
    KJ_REQUIRE(n > 0, "the bytes of a pipe of the process's own could not be written back", writeFd,
               queued - put, n);
    put += size_t(n);
  }
  return data;
}

// What only a thread itself can tell: its sigaltstack(2) and clear-child-tid address.
struct ThreadQueries {
  stack_t altStack{};
  uint64_t tidAddress = 0;
  bool tidAddressKnown = false;
};

struct Injected {
  std::vector<std::pair<int, KernelSigaction>> actions;
  itimerval timers[3]{};
  std::map<int, PipeState> pipes;  // by read end
  ThreadQueries thread;            // of the task the queries ran in
};

// Runs `body(scratch)` with calls injected into `task` at `insn`: every signal blocked and a
// scratch page (IMAGE_PAGE bytes at `scratch`) mapped meanwhile; the page is unmapped and the
// registers and mask are left as `resume` and `mask` say, also when `body` throws.
// `size` bytes of scratch (a multiple of IMAGE_PAGE) instead of one page.
template <typename Body>
void withScratch(PtraceTask& task, RemotePtr<uint8_t> insn, const user_regs_struct& resume,
                 uint64_t mask, Body&& body, uint64_t size = IMAGE_PAGE) {
  task.setSyscallInstruction(insn);
  task.setSigmask(~0ull);
  uint64_t scratch = 0;
  KJ_DEFER({
    if (scratch != 0) {
      task.syscall(__NR_munmap, {scratch, size});
    }
    task.setRegs(resume);
    task.setSigmask(mask);
  });
  scratch =
      task.syscallOrThrow("mmap(scratch)", __NR_mmap,
                          {0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, ~0ull, 0});
  body(scratch);
}

// The per-thread queries, in a withScratch session of that thread.
ThreadQueries queryThread(PtraceTask& task, uint64_t scratch) {
  ThreadQueries out;
  RemotePtr<uint8_t> at(scratch);
  task.syscallOrThrow("sigaltstack", __NR_sigaltstack, {0, scratch});
  task.readMem(at,
               std::span<uint8_t>(reinterpret_cast<uint8_t*>(&out.altStack), sizeof(out.altStack)));
  if (task.syscall(__NR_prctl, {PR_GET_TID_ADDRESS, scratch, 0, 0, 0}) == 0) {
    task.readMem(at, std::span<uint8_t>(reinterpret_cast<uint8_t*>(&out.tidAddress),
                                        sizeof(out.tidAddress)));
    out.tidAddressKnown = true;
  }
  return out;
}

// queryThread for a task other than the leader.
ThreadQueries injectThreadQueries(PtraceTask& task, RemotePtr<uint8_t> insn,
                                  const user_regs_struct& resume, uint64_t mask) {
  ThreadQueries out;
  withScratch(task, insn, resume, mask,
              [&](uint64_t scratch) { out = queryThread(task, scratch); });
  return out;
}

// A run of pages the stream carries: at most MAX_RUN_PAGES, inside one mapping.
struct PageRun {
  uint64_t start;
  uint32_t pages;
  bool readable;  // the mapping has PROT_READ: the process itself can read (and send) it
};

// Runs per injected sendmsg (two iovecs each, below IOV_MAX = 1024), and the scratch they need:
// the msghdr, the iovecs, then the frame messages (each well under FRAME_ROOM bytes).
constexpr size_t SEND_BATCH = 256;
constexpr size_t FRAME_ROOM = 64;
constexpr uint64_t SEND_SCRATCH = 8 * IMAGE_PAGE;
static_assert(64 + 2 * SEND_BATCH * sizeof(iovec) + SEND_BATCH * FRAME_ROOM <= SEND_SCRATCH);

// True for the codes an injected call may come back with when something interrupted it before
// it did anything: it is simply issued again (every signal is blocked meanwhile).
bool interruptedEarly(long r) {
  return r == -EINTR || r == -ERESTARTSYS || r == -ERESTARTNOINTR || r == -ERESTARTNOHAND ||
         r == -516 /* ERESTART_RESTARTBLOCK */;
}

// Puts `runs` on the stream from the process itself (CaptureOptions::sendPagesFromFd): for each
// batch of runs, their frame messages (writer.runFrame) go into a scratch mapping of the process
// and one sendmsg(2) of [frame, pages, frame, pages, ...] is injected into `task` on descriptor
// `fd`, MSG_NOSIGNAL, every signal blocked; a partial send goes on where it stopped. A run the
// process cannot read (PROT_NONE) is read here through /proc/PID/mem and written on `sink`
// instead, between two batches. Leaves registers and mask as `resume` and `mask` say. Throws
// kj::Exception (FAILED) with the errno when a send fails (the node closed the connection: EPIPE,
// ECONNRESET; TCP_USER_TIMEOUT: ETIMEDOUT).
void sendRunsFromProcess(PtraceTask& task, RemotePtr<uint8_t> insn, const user_regs_struct& resume,
                         uint64_t mask, int fd, std::span<const PageRun> runs, ImageWriter& writer,
                         kj::OutputStream& sink) {
  withScratch(
      task, insn, resume, mask,
      [&](uint64_t scratch) {
        const uint64_t msgAt = scratch;
        const uint64_t iovAt = scratch + 64;
        const uint64_t framesAt = iovAt + 2 * SEND_BATCH * sizeof(iovec);
        std::vector<iovec> iov;
        std::vector<uint8_t> frames;
        // Sends iov (remote addresses) whole, re-issuing after a partial send.
        auto flush = [&]() {
          if (iov.empty()) {
            return;
          }
          task.writeMem(RemotePtr<uint8_t>(framesAt), frames);
          size_t first = 0;
          while (first < iov.size()) {
            size_t n = iov.size() - first;
            task.writeMem(RemotePtr<uint8_t>(iovAt),
                          std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&iov[first]),
                                                   n * sizeof(iovec)));
            msghdr msg{};
            msg.msg_iov = reinterpret_cast<iovec*>(iovAt);
            msg.msg_iovlen = n;
            task.writeValue(RemotePtr<msghdr>(msgAt), msg);
            long r = task.syscall(__NR_sendmsg, {uint64_t(fd), msgAt, MSG_NOSIGNAL});
            if (interruptedEarly(r)) {
              continue;
            }
            if (r <= 0) {
              refuse(kj::str("sending the pages failed: ", strerror(r == 0 ? EPIPE : int(-r))));
            }
            size_t sent = size_t(r);
            while (first < iov.size() && sent >= iov[first].iov_len) {
              sent -= iov[first].iov_len;
              ++first;
            }
            if (sent > 0) {
              iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + sent;
              iov[first].iov_len -= sent;
            }
          }
          iov.clear();
          frames.clear();
        };
        std::vector<uint8_t> buffer;
        for (const PageRun& run : runs) {
          uint64_t bytes = uint64_t(run.pages) * IMAGE_PAGE;
          kj::Array<capnp::word> frame = writer.runFrame(run.start, run.pages);
          auto frameBytes = frame.asBytes();
          if (!run.readable) {
            flush();
            buffer.resize(bytes);
            task.readMem(RemotePtr<uint8_t>(run.start), buffer);
            sink.write(frameBytes.begin(), frameBytes.size());
            sink.write(buffer.data(), buffer.size());
            continue;
          }
          KJ_ASSERT(frameBytes.size() <= FRAME_ROOM, frameBytes.size());
          uint64_t at = framesAt + frames.size();
          frames.insert(frames.end(), frameBytes.begin(), frameBytes.end());
          iov.push_back({reinterpret_cast<void*>(at), frameBytes.size()});
          iov.push_back({reinterpret_cast<void*>(run.start), bytes});
          if (iov.size() == 2 * SEND_BATCH) {
            flush();
          }
        }
        flush();
      },
      SEND_SCRATCH);
}

// The state only the process itself can ask the kernel for. Leaves registers and mask as
// `resume` and `mask` say, also when it throws.
Injected injectQueries(PtraceTask& task, RemotePtr<uint8_t> insn, const user_regs_struct& resume,
                       uint64_t mask, const std::vector<PipeEnd>& pipes) {
  Injected out;
  // Only the dispositions that are not SIG_DFL are asked for; the image records no other.
  uint64_t handled = nonDefaultSignals(task.pid());
  withScratch(task, insn, resume, mask, [&](uint64_t scratch) {
    RemotePtr<uint8_t> at(scratch);
    auto read = [&](void* into, size_t size) {
      task.readMem(at, std::span<uint8_t>(static_cast<uint8_t*>(into), size));
    };
    for (int sig = 1; sig <= 64; ++sig) {
      if (sig == SIGKILL || sig == SIGSTOP || !(handled & (uint64_t{1} << (sig - 1)))) {
        continue;
      }
      task.syscallOrThrow("rt_sigaction", __NR_rt_sigaction, {uint64_t(sig), 0, scratch, 8});
      KernelSigaction act{};
      read(&act, sizeof(act));
      if (act.handler != 0 /* SIG_DFL */) {
        out.actions.emplace_back(sig, act);
      }
    }
    for (int which = 0; which < 3; ++which) {
      task.syscallOrThrow("getitimer", __NR_getitimer, {uint64_t(which), scratch});
      read(&out.timers[which], sizeof(itimerval));
    }
    for (const PipeEnd& end : pipes) {
      if (end.writer) {
        continue;
      }
      PipeState& state = out.pipes[end.fd];
      int queued = 0;
      if (task.syscall(__NR_ioctl, {uint64_t(end.fd), FIONREAD, scratch}) == 0) {
        read(&queued, sizeof(queued));
      }
      state.unread = static_cast<uint32_t>(queued);
      long size = task.syscall(__NR_fcntl, {uint64_t(end.fd), F_GETPIPE_SZ});
      state.size = size > 0 ? static_cast<uint32_t>(size) : 0;
      auto writer = std::find_if(pipes.begin(), pipes.end(),
                                 [&](const PipeEnd& w) { return w.writer && w.ino == end.ino; });
      if (queued > 0 && writer != pipes.end()) {
        state.data = drainAndRefill(task, end.fd, writer->fd, static_cast<size_t>(queued));
        state.drained = true;
      }
    }
    out.thread = queryThread(task, scratch);
  });
  return out;
}

uint64_t toUs(const timeval& tv) { return uint64_t(tv.tv_sec) * 1000000 + tv.tv_usec; }

}  // namespace

namespace {

// PTRACE_SEIZE + PTRACE_INTERRUPT of one task, then its interrupt stop (signals on their way in
// are delivered, not lost). Returns false if the task is gone (a thread that exited meanwhile).
bool seizeTask(pid_t tid) {
  if (::ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD) < 0) {
    if (errno == ESRCH) {
      return false;
    }
    KJ_FAIL_SYSCALL("cannot trace the process", errno, tid);
  }
  KJ_ON_SCOPE_FAILURE(::ptrace(PTRACE_DETACH, tid, 0, 0));
  KJ_SYSCALL(::ptrace(PTRACE_INTERRUPT, tid, 0, 0), tid);
  for (;;) {
    int status = waitTask(tid);
    KJ_REQUIRE(WIFSTOPPED(status), "the process ended", tid, describeStatus(status));
    if (ptraceEvent(status) == PTRACE_EVENT_STOP) {
      return true;
    }
    // A signal on its way in before our interrupt: deliver it; the interrupt stop follows.
    KJ_SYSCALL(::ptrace(PTRACE_CONT, tid, 0, ptraceEvent(status) ? 0 : WSTOPSIG(status)), tid);
  }
}

}  // namespace

SeizedProcess::SeizedProcess(pid_t pid) : pid_(pid) {
  KJ_ON_SCOPE_FAILURE(detach());
  // Every task; listed again until a pass finds no new one (a task that runs until it is
  // seized may start threads; once all are stopped, none can).
  for (bool found = true; found;) {
    found = false;
    for (pid_t tid : listThreads(pid)) {
      if (std::find(tasks_.begin(), tasks_.end(), tid) != tasks_.end()) {
        continue;
      }
      if (seizeTask(tid)) {
        tasks_.push_back(tid);
        found = true;
      } else {
        KJ_REQUIRE(tid != pid, "the process ended", pid);
      }
    }
  }
}

SeizedProcess::~SeizedProcess() { detach(); }

void SeizedProcess::detach() {
  // The leader last: a thread that runs on before it never finds its process half traced.
  for (auto it = tasks_.rbegin(); it != tasks_.rend(); ++it) {
    ::ptrace(PTRACE_DETACH, *it, 0, 0);
  }
  tasks_.clear();
}

void describeOpenFiles(pid_t pid, proto::ImageHeader::Builder header,
                       const std::function<bool(int)>& skip) {
  describeFiles(pid, header, {}, skip);
}

CaptureStats captureImage(pid_t pid, kj::OutputStream& sink) {
  return captureImage(pid, sink, CaptureOptions{});
}

CaptureStats captureImage(pid_t pid, kj::OutputStream& sink, const CaptureOptions& options) {
  auto started = std::chrono::steady_clock::now();
  CaptureStats stats;
  std::vector<pid_t> tids = listThreads(pid);
  for (pid_t tid : tids) {
    if (!tracedByUs(tid)) {
      refuse(kj::str("its thread ", tid,
                     " is not stopped for the capture (every task must be seized first)"));
    }
  }
  // Per-thread state, the leader first (threads[0] of the image).
  struct TaskState {
    pid_t tid;
    ptrace_rseq_configuration rseq{};
    user_regs_struct regs;
    std::vector<uint8_t> xstate;
    uint64_t sigmask;
    std::vector<siginfo_t> queue;
    uint64_t robustHead = 0;
    size_t robustLen = 0;
    ThreadQueries injected;
  };
  std::vector<TaskState> states;
  std::vector<siginfo_t> sharedQueue = peekQueue(pid, true);
  for (pid_t tid : tids) {
    PtraceTask t(tid);
    TaskState st;
    st.tid = tid;
    if (::ptrace(static_cast<__ptrace_request>(PTRACE_GET_RSEQ_CONFIGURATION_REQUEST), tid,
                 sizeof(st.rseq), &st.rseq) < 0) {
      st.rseq = {};
    }
    st.xstate = t.getXstate();
    st.sigmask = t.getSigmask();
    st.queue = peekQueue(tid, false);
    uint64_t pending = 0;
    for (const std::vector<siginfo_t>* q : {&st.queue, &sharedQueue}) {
      for (const siginfo_t& info : *q) {
        pending |= uint64_t{1} << (info.si_signo - 1);
      }
    }
    st.regs = resumableRegs(t, t.getRegs(), st.rseq, (pending & ~st.sigmask) != 0);
    uint64_t head = 0;
    if (::syscall(SYS_get_robust_list, tid, &head, &st.robustLen) == 0) {
      st.robustHead = head;
    } else {
      st.robustLen = 0;
    }
    states.push_back(std::move(st));
  }
  PtraceTask task(pid);
  const user_regs_struct& regs = states[0].regs;
  const std::vector<uint8_t>& xstate = states[0].xstate;
  uint64_t sigmask = states[0].sigmask;

  std::vector<MapsEntry> maps = readMaps(pid);
  RemotePtr<uint8_t> insn;
  for (const MapsEntry& e : maps) {
    if (e.path == "[vdso]") {
      insn = task.findSyscallInstruction(e.start, e.end);
    }
  }
  KJ_REQUIRE(!insn.isNull(), "the process has no vDSO with a syscall instruction", pid);
  Injected injected = injectQueries(task, insn, regs, sigmask, pipeEnds(pid));
  stats.injectedSyscalls = task.injected();
  states[0].injected = injected.thread;
  for (size_t i = 1; i < states.size(); ++i) {
    PtraceTask t(states[i].tid);
    states[i].injected = injectThreadQueries(t, insn, states[i].regs, states[i].sigmask);
    stats.injectedSyscalls += t.injected();
  }
  maps = readMaps(pid);  // without the scratch page

  capnp::MallocMessageBuilder message;
  auto header = message.initRoot<proto::ImageHeader>();
  header.setVersion(proto::MIGRATION_VERSION);
  header.setArch("x86_64");
  struct utsname uts;
  KJ_SYSCALL(::uname(&uts));
  header.setKernelRelease(uts.release);
  timespec now;
  ::clock_gettime(CLOCK_REALTIME, &now);
  header.setCapturedAtNs(int64_t(now.tv_sec) * 1000000000 + now.tv_nsec);
  header.setSourcePid(pid);
  auto cpu = header.initCpu();
  cpu.setXsaveFeatures(xsaveFeatures(xstate));
  cpu.setXsaveSize(xstate.size());

  {
    std::string comm = readProcFile(procPath(pid, "comm"));
    while (!comm.empty() && comm.back() == '\n') {
      comm.pop_back();
    }
    header.setCommand(comm);
    std::string cmdline = readProcFile(procPath(pid, "cmdline"));
    std::vector<std::string> args;
    for (size_t start = 0; start < cmdline.size();) {
      size_t nul = cmdline.find('\0', start);
      nul = nul == std::string::npos ? cmdline.size() : nul;
      args.push_back(cmdline.substr(start, nul - start));
      start = nul + 1;
    }
    auto argv = header.initArgv(args.size());
    for (size_t i = 0; i < args.size(); ++i) {
      argv.set(i, bytesOf(args[i]));
    }
    struct stat exeStat;
    KJ_SYSCALL(::stat(procPath(pid, "exe").c_str(), &exeStat), pid);
    setFileRef(header.initExe(), readLink(procPath(pid, "exe")), exeStat);
  }

  auto threadList = header.initThreads(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    const TaskState& st = states[i];
    auto thread = threadList[i];
    thread.setTid(st.tid);
    thread.setRegs(kj::arrayPtr(reinterpret_cast<const kj::byte*>(&st.regs), sizeof(st.regs)));
    thread.setXstate(kj::arrayPtr(st.xstate.data(), st.xstate.size()));
    thread.setSigBlocked(st.sigmask);
    setPending(thread.initPending(st.queue.size()), st.queue, false);
    thread.setAltStackSp(reinterpret_cast<uint64_t>(st.injected.altStack.ss_sp));
    thread.setAltStackFlags(st.injected.altStack.ss_flags);
    thread.setAltStackSize(st.injected.altStack.ss_size);
    thread.setRseqAddr(st.rseq.rseqAbiPointer);
    thread.setRseqSize(st.rseq.rseqAbiSize);
    thread.setRseqSignature(st.rseq.signature);
    thread.setRobustListHead(st.robustHead);
    thread.setRobustListLen(st.robustLen);
    thread.setTidAddress(st.injected.tidAddress);
    thread.setTidAddressKnown(st.injected.tidAddressKnown);
  }

  auto actions = header.initSigActions(injected.actions.size());
  for (size_t i = 0; i < injected.actions.size(); ++i) {
    auto& [sig, act] = injected.actions[i];
    actions[i].setSigno(sig);
    actions[i].setHandler(act.handler);
    actions[i].setFlags(act.flags);
    actions[i].setRestorer(act.restorer);
    actions[i].setMask(act.mask);
  }
  setPending(header.initPending(sharedQueue.size()), sharedQueue, true);
  proto::TimerValue::Builder timers[3] = {header.initTimerReal(), header.initTimerVirtual(),
                                          header.initTimerProf()};
  for (int i = 0; i < 3; ++i) {
    uint64_t interval = toUs(injected.timers[i].it_interval);
    uint64_t value = toUs(injected.timers[i].it_value);
    if (value == 0 && interval != 0) {
      // A periodic timer that has fired while its signal is still queued reads as 0: the kernel
      // re-arms ITIMER_REAL only when the signal is dequeued, and setitimer with a zero value
      // would disarm it. It is due again one interval on.
      value = interval;
    }
    timers[i].setIntervalUs(interval);
    timers[i].setValueUs(value);
  }
  header.setPersonality(strtoul(readProcFile(procPath(pid, "personality")).c_str(), nullptr, 16));
  header.setUmask(procField(readProcFile(procPath(pid, "status")), "Umask:", 8));
  header.setCwd(bytesOf(readLink(procPath(pid, "cwd"))));
  describeFiles(pid, header, injected.pipes);

  // Mappings, and the runs of pages the stream carries (pagemap(5)).
  std::string pagemapPath = procPath(pid, "pagemap");
  int pagemapFd;
  KJ_SYSCALL(pagemapFd = ::open(pagemapPath.c_str(), O_RDONLY | O_CLOEXEC), pagemapPath);
  kj::AutoCloseFd pagemapOwner(pagemapFd);
  std::vector<PageRun> runs;
  uint64_t pageCount = 0;
  auto mappingList = header.initMappings(maps.size());
  for (size_t i = 0; i < maps.size(); ++i) {
    const MapsEntry& e = maps[i];
    Copy copy = describeMapping(pid, e, mappingList[i]);
    if (copy == Copy::NONE) {
      continue;
    }
    bool joinable = false;  // runs never cross a mapping boundary
    auto addPage = [&](uint64_t addr) {
      if (joinable && runs.back().start + uint64_t(runs.back().pages) * IMAGE_PAGE == addr &&
          runs.back().pages < MAX_RUN_PAGES) {
        runs.back().pages += 1;
      } else {
        runs.push_back({addr, 1, (e.prot & PROT_READ) != 0});
      }
      joinable = true;
      pageCount += 1;
    };
    constexpr size_t CHUNK = 8192;
    std::vector<uint64_t> entries(CHUNK);
    for (uint64_t a = e.start; a < e.end; a += CHUNK * IMAGE_PAGE) {
      size_t pages = std::min<uint64_t>(CHUNK, (e.end - a) / IMAGE_PAGE);
      if (copy == Copy::EVERY) {
        for (size_t p = 0; p < pages; ++p) {
          addPage(a + p * IMAGE_PAGE);
        }
        continue;
      }
      ssize_t n;
      KJ_SYSCALL(n = ::pread(pagemapFd, entries.data(), pages * 8, (a / IMAGE_PAGE) * 8),
                 pagemapPath);
      KJ_REQUIRE(static_cast<size_t>(n) == pages * 8, "short pagemap read", pid, a);
      for (size_t p = 0; p < pages; ++p) {
        uint64_t pm = entries[p];
        bool take = copy == Copy::PRESENT
                        ? (pm & (PM_PRESENT | PM_SWAP)) != 0
                        : ((pm & PM_PRESENT) && !(pm & PM_FILE_OR_SHARED)) || (pm & PM_SWAP);
        if (take) {
          addPage(a + p * IMAGE_PAGE);
        } else {
          joinable = false;
        }
      }
    }
  }
  header.setPageCount(pageCount);

  // mm layout: /proc/PID/stat fields 26-28 and 45-51 (proc(5)); brk is the end of [heap].
  std::vector<uint64_t> f = statFields(pid);
  auto mm = header.initMm();
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
  header.setAuxv(bytesOf(auxv));

  if (options.editHeader) {
    options.editHeader(header);
  }

  int pagesFd = options.sendPagesFromFd ? options.sendPagesFromFd() : -1;
  bool fromProcess = pagesFd >= 0;
  ImageWriter writer(sink, fromProcess ? PageDigest::FRAMING : PageDigest::ALL);
  writer.writeHeader(message);
  if (options.beforePages) {
    options.beforePages();
  }
  if (fromProcess) {
    uint64_t before = task.injected();
    sendRunsFromProcess(task, insn, regs, sigmask, pagesFd, runs, writer, sink);
    stats.injectedSyscalls += task.injected() - before;
  } else {
    std::vector<uint8_t> buffer(MAX_RUN_PAGES * IMAGE_PAGE);
    for (const PageRun& run : runs) {
      std::span<uint8_t> out(buffer.data(), uint64_t(run.pages) * IMAGE_PAGE);
      size_t fast = task.readMemFast(RemotePtr<uint8_t>(run.start), out);
      if (fast < out.size()) {
        // PROT_NONE pages or a partial copy: /proc/PID/mem forces its way (FOLL_FORCE).
        task.readMem(RemotePtr<uint8_t>(run.start + fast), out.subspan(fast));
      }
      writer.writePages(run.start, out);
    }
  }
  writer.finish();

  stats.mappings = maps.size();
  stats.runs = writer.runs();
  stats.pages = writer.pages();
  stats.bytes = writer.bytes();
  stats.frozen = std::chrono::duration_cast<std::chrono::microseconds>(
      std::chrono::steady_clock::now() - started);
  return stats;
}

}  // namespace mos::migrate
