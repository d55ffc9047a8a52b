#include "guest_stack.h"

#include <elf.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <libunwind-ptrace.h>
#include <libunwind.h>

#include <asm/perf_regs.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

namespace mos::remote {

namespace {

constexpr size_t DATA_PAGES = 16;  // 64 KiB of samples: far more than one trap needs

// The registers asked of perf, in perf's order (ascending bit number). DS, ES, FS and GS are
// refused on x86-64 (perf_reg_validate).
constexpr int SAMPLED_REGS[] = {
    PERF_REG_X86_AX,  PERF_REG_X86_BX,  PERF_REG_X86_CX,  PERF_REG_X86_DX,  PERF_REG_X86_SI,
    PERF_REG_X86_DI,  PERF_REG_X86_BP,  PERF_REG_X86_SP,  PERF_REG_X86_IP,  PERF_REG_X86_R8,
    PERF_REG_X86_R9,  PERF_REG_X86_R10, PERF_REG_X86_R11, PERF_REG_X86_R12, PERF_REG_X86_R13,
    PERF_REG_X86_R14, PERF_REG_X86_R15,
};
constexpr size_t SAMPLED_COUNT = sizeof(SAMPLED_REGS) / sizeof(SAMPLED_REGS[0]);

uint64_t sampledMask() {
  uint64_t mask = 0;
  for (int r : SAMPLED_REGS) {
    mask |= uint64_t{1} << r;
  }
  return mask;
}

TrappedRegs fromSample(const uint64_t* v) {
  TrappedRegs regs;
  uint64_t* fields[SAMPLED_COUNT] = {
      &regs.ax, &regs.bx, &regs.cx,  &regs.dx,  &regs.si,  &regs.di,  &regs.bp,  &regs.sp, &regs.ip,
      &regs.r8, &regs.r9, &regs.r10, &regs.r11, &regs.r12, &regs.r13, &regs.r14, &regs.r15};
  for (size_t i = 0; i < SAMPLED_COUNT; i++) {
    *fields[i] = v[i];
  }
  return regs;
}

bool matches(const TrappedRegs& regs, uint64_t ip, const uint64_t (&args)[6]) {
  return regs.ip == ip && regs.di == args[0] && regs.si == args[1] && regs.dx == args[2] &&
         regs.r10 == args[3] && regs.r8 == args[4] && regs.r9 == args[5];
}

}  // namespace

GuestStackSampler::GuestStackSampler(pid_t tid) : tid_(tid) {
  struct perf_event_attr attr = {};
  attr.size = sizeof(attr);
  attr.type = PERF_TYPE_SOFTWARE;
  attr.config = PERF_COUNT_SW_CONTEXT_SWITCHES;
  attr.sample_period = 1;
  attr.sample_type = PERF_SAMPLE_TID | PERF_SAMPLE_REGS_USER;
  attr.sample_regs_user = sampledMask();
  attr.wakeup_events = 1;  // POLLIN at every sample: trappedRegs waits for one
  // The switch happens in the kernel (the notification wait): kernel samples must be allowed.
  attr.exclude_hv = 1;
  int fd = static_cast<int>(syscall(SYS_perf_event_open, &attr, tid, -1, -1, PERF_FLAG_FD_CLOEXEC));
  if (fd < 0) {
    KJ_FAIL_SYSCALL("perf_event_open (context switches of a guest thread)", errno, tid);
  }
  fd_ = kj::AutoCloseFd(fd);
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ringBytes_ = page * (1 + DATA_PAGES);
  void* ring = mmap(nullptr, ringBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (ring == MAP_FAILED) {
    KJ_FAIL_SYSCALL("mmap of a perf ring", errno, tid);
  }
  ring_ = ring;
}

GuestStackSampler::~GuestStackSampler() {
  if (ring_ != nullptr) {
    munmap(ring_, ringBytes_);
  }
}

void GuestStackSampler::drain(uint64_t ip, const uint64_t (&args)[6],
                              kj::Maybe<TrappedRegs>* found) {
  auto* meta = static_cast<perf_event_mmap_page*>(ring_);
  auto* data = static_cast<uint8_t*>(ring_) + meta->data_offset;
  uint64_t size = meta->data_size;
  uint64_t head = __atomic_load_n(&meta->data_head, __ATOMIC_ACQUIRE);
  uint64_t tail = meta->data_tail;
  // Copies `n` bytes at ring position `at` (records may wrap around the end).
  auto copy = [&](uint64_t at, void* out, size_t n) {
    auto* dst = static_cast<uint8_t*>(out);
    for (size_t i = 0; i < n; i++) {
      dst[i] = data[(at + i) % size];
    }
  };
  while (tail < head) {
    perf_event_header header;
    copy(tail, &header, sizeof(header));
    if (header.size < sizeof(header)) {
      break;  // never written by the kernel; stop rather than loop
    }
    if (header.type == PERF_RECORD_SAMPLE) {
      // PERF_SAMPLE_TID: u32 pid, u32 tid; PERF_SAMPLE_REGS_USER: u64 abi, u64 regs[] (no regs
      // when abi is PERF_SAMPLE_REGS_ABI_NONE: a kernel thread, or an NMI in the entry code).
      uint64_t body[2 + SAMPLED_COUNT] = {};
      size_t bodyBytes = header.size - sizeof(header);
      copy(tail + sizeof(header), body, kj::min(bodyBytes, sizeof(body)));
      if (bodyBytes >= sizeof(body) && body[1] != PERF_SAMPLE_REGS_ABI_NONE) {
        TrappedRegs regs = fromSample(body + 2);
        if (matches(regs, ip, args)) {
          *found = regs;
        }
      }
    }
    tail += header.size;
  }
  __atomic_store_n(&meta->data_tail, tail, __ATOMIC_RELEASE);
}

kj::Maybe<TrappedRegs> GuestStackSampler::trappedRegs(uint64_t ip, const uint64_t (&args)[6],
                                                      int timeoutMs) {
  kj::Maybe<TrappedRegs> found;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeoutMs);
  for (;;) {
    drain(ip, args, &found);
    if (found != nullptr) {
      return found;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) {
      return nullptr;
    }
    struct pollfd pfd = {fd_.get(), POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(left)) < 0 && errno != EINTR) {
      return nullptr;
    }
  }
}

kj::Maybe<TrappedRegs> syscallRegs(pid_t tid) {
  std::ifstream in("/proc/" + std::to_string(tid) + "/syscall");
  std::string line;
  if (!std::getline(in, line)) {
    return nullptr;
  }
  // "NR ARG1 .. ARG6 SP PC" while blocked in a syscall; "running" or "-1 SP PC" otherwise.
  std::istringstream fields(line);
  std::vector<std::string> parts;
  for (std::string part; fields >> part;) {
    parts.push_back(part);
  }
  if (parts.size() != 9) {
    return nullptr;
  }
  TrappedRegs regs;
  regs.sp = std::stoull(parts[7], nullptr, 16);
  regs.ip = std::stoull(parts[8], nullptr, 16);
  regs.partial = true;
  return regs;
}

namespace {

// What libunwind's accessors get as their `arg`.
struct UnwindTarget {
  pid_t tid;
  const TrappedRegs* regs;
  void* upt;  // libunwind-ptrace's per-process state (maps, ELF images); never ptrace()s here
  // Guest pages read so far (the thread stays stopped during one unwind): one process_vm_readv
  // per page instead of one per word.
  std::map<uint64_t, std::vector<uint8_t>> pages;
};

constexpr uint64_t PAGE = 4096;

// The unwind in progress on this thread. Accessors use it rather than their `arg`: libunwind's
// ptrace helpers call back into the address space's accessors with their own state (the UPT
// handle) as `arg`.
thread_local UnwindTarget* currentTarget = nullptr;

UnwindTarget& targetOf(void*) { return *currentTarget; }

int findProcInfo(unw_addr_space_t as, unw_word_t ip, unw_proc_info_t* pi, int needUnwindInfo,
                 void* arg) {
  return _UPT_find_proc_info(as, ip, pi, needUnwindInfo, targetOf(arg).upt);
}

void putUnwindInfo(unw_addr_space_t as, unw_proc_info_t* pi, void* arg) {
  _UPT_put_unwind_info(as, pi, targetOf(arg).upt);
}

int getDynInfoListAddr(unw_addr_space_t as, unw_word_t* addr, void* arg) {
  return _UPT_get_dyn_info_list_addr(as, addr, targetOf(arg).upt);
}

int accessMem(unw_addr_space_t, unw_word_t addr, unw_word_t* value, int write, void* arg) {
  if (write) {
    return -UNW_EREADONLYREG;  // the guest is never written while unwinding
  }
  UnwindTarget& target = targetOf(arg);
  uint64_t page = addr & ~(PAGE - 1);
  if (addr - page <= PAGE - sizeof(*value)) {
    auto it = target.pages.find(page);
    if (it == target.pages.end()) {
      std::vector<uint8_t> bytes(PAGE);
      struct iovec local = {bytes.data(), PAGE};
      struct iovec remote = {reinterpret_cast<void*>(page), PAGE};
      if (process_vm_readv(target.tid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(PAGE)) {
        bytes.clear();  // unreadable: remembered, so it is not asked again
      }
      it = target.pages.emplace(page, kj::mv(bytes)).first;
    }
    if (it->second.empty()) {
      return -UNW_EINVAL;
    }
    memcpy(value, it->second.data() + (addr - page), sizeof(*value));
    return 0;
  }
  struct iovec local = {value, sizeof(*value)};  // a word across two pages
  struct iovec remote = {reinterpret_cast<void*>(addr), sizeof(*value)};
  ssize_t n = process_vm_readv(target.tid, &local, 1, &remote, 1, 0);
  return n == static_cast<ssize_t>(sizeof(*value)) ? 0 : -UNW_EINVAL;
}

int accessReg(unw_addr_space_t, unw_regnum_t reg, unw_word_t* value, int write, void* arg) {
  if (write) {
    return -UNW_EREADONLYREG;
  }
  const TrappedRegs& r = *targetOf(arg).regs;
  if (r.partial && reg != UNW_X86_64_RIP && reg != UNW_X86_64_RSP) {
    return -UNW_EBADREG;
  }
  switch (reg) {
    case UNW_X86_64_RAX: *value = r.ax; return 0;
    case UNW_X86_64_RDX: *value = r.dx; return 0;
    case UNW_X86_64_RCX: *value = r.cx; return 0;
    case UNW_X86_64_RSI: *value = r.si; return 0;
    case UNW_X86_64_RDI: *value = r.di; return 0;
    case UNW_X86_64_RBP: *value = r.bp; return 0;
    case UNW_X86_64_RSP: *value = r.sp; return 0;
    case UNW_X86_64_R8: *value = r.r8; return 0;
    case UNW_X86_64_R9: *value = r.r9; return 0;
    case UNW_X86_64_R10: *value = r.r10; return 0;
    case UNW_X86_64_R11: *value = r.r11; return 0;
    case UNW_X86_64_RIP: *value = r.ip; return 0;
    // rbx and r12..r15 are not saved at syscall entry as perf sees it: unknown.
    default: return -UNW_EBADREG;
  }
}

int accessFpreg(unw_addr_space_t, unw_regnum_t, unw_fpreg_t*, int, void*) { return -UNW_EBADREG; }

int resume(unw_addr_space_t, unw_cursor_t*, void*) { return -UNW_EINVAL; }

int getProcName(unw_addr_space_t as, unw_word_t ip, char* buf, size_t length, unw_word_t* offset,
                void* arg) {
  return _UPT_get_proc_name(as, ip, buf, length, offset, targetOf(arg).upt);
}

// One line of /proc/PID/maps that maps a file.
struct MappedFile {
  uint64_t start, end;
  uint64_t offset;  // file offset of `start`
  std::string path;
};

// The function symbols of one ELF file (.symtab and .dynsym), for gdb's choice among aliases.
struct ElfFunctions {
  uint64_t firstLoad = 0;                 // p_vaddr of the first PT_LOAD, page aligned down
  std::map<uint64_t, std::string> names;  // st_value -> the preferred name there
};

// Reads `path`'s function symbols; empty when it is not a readable ELF64 file.
ElfFunctions readElfFunctions(const std::string& path) {
  ElfFunctions result;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return result;
  }
  kj::AutoCloseFd owned(fd);
  struct stat st;
  if (fstat(fd, &st) < 0 || st.st_size < static_cast<off_t>(sizeof(Elf64_Ehdr))) {
    return result;
  }
  size_t size = static_cast<size_t>(st.st_size);
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (map == MAP_FAILED) {
    return result;
  }
  KJ_DEFER(munmap(map, size));
  const auto* base = static_cast<const uint8_t*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  auto inside = [&](uint64_t offset, uint64_t bytes) {
    return offset <= size && bytes <= size - offset;
  };
  if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
      !inside(eh->e_phoff, uint64_t{eh->e_phnum} * sizeof(Elf64_Phdr)) ||
      !inside(eh->e_shoff, uint64_t{eh->e_shnum} * sizeof(Elf64_Shdr))) {
    return result;
  }
  const auto* ph = reinterpret_cast<const Elf64_Phdr*>(base + eh->e_phoff);
  for (int i = 0; i < eh->e_phnum; i++) {
    if (ph[i].p_type == PT_LOAD) {
      result.firstLoad = ph[i].p_vaddr & ~uint64_t{4095};
      break;
    }
  }
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; i++) {
    if ((sh[i].sh_type != SHT_SYMTAB && sh[i].sh_type != SHT_DYNSYM) ||
        sh[i].sh_link >= eh->e_shnum || !inside(sh[i].sh_offset, sh[i].sh_size)) {
      continue;
    }
    const Elf64_Shdr& strtab = sh[sh[i].sh_link];
    if (!inside(strtab.sh_offset, strtab.sh_size)) {
      continue;
    }
    const char* strings = reinterpret_cast<const char*>(base + strtab.sh_offset);
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
    size_t count = sh[i].sh_size / sizeof(Elf64_Sym);
    for (size_t k = 0; k < count; k++) {
      int type = ELF64_ST_TYPE(syms[k].st_info);
      if ((type != STT_FUNC && type != STT_GNU_IFUNC) || syms[k].st_shndx == SHN_UNDEF ||
          syms[k].st_name >= strtab.sh_size) {
        continue;
      }
      const char* name = strings + syms[k].st_name;
      if (strnlen(name, strtab.sh_size - syms[k].st_name) == strtab.sh_size - syms[k].st_name) {
        continue;  // not terminated inside the table
      }
      // gdb sorts minimal symbols of one address by name and takes the last: `write` over
      // `__write` and `__libc_write`.
      std::string& best = result.names[syms[k].st_value];
      if (best < name) {
        best = name;
      }
    }
  }
  return result;
}

// The name gdb shows for the function at `address` of the process whose maps are `maps`, mapped
// from `module`; `fallback` when the file has no function symbol exactly there.
std::string preferredName(const std::vector<MappedFile>& maps, const std::string& module,
                          uint64_t address, const std::string& fallback) {
  static std::mutex mutex;
  static std::map<std::string, ElfFunctions> files;  // cache paths are immutable files
  if (module.empty() || module[0] != '/') {
    return fallback;
  }
  uint64_t loadStart = 0;
  bool found = false;
  for (const MappedFile& m : maps) {
    if (m.path == module && m.offset == 0) {
      loadStart = m.start;
      found = true;
      break;
    }
  }
  if (!found) {
    return fallback;
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto it = files.find(module);
  if (it == files.end()) {
    it = files.emplace(module, readElfFunctions(module)).first;
  }
  uint64_t bias = loadStart - it->second.firstLoad;
  auto name = it->second.names.find(address - bias);
  return name == it->second.names.end() ? fallback : name->second;
}

std::vector<MappedFile> readMappedFiles(pid_t tid) {
  std::vector<MappedFile> result;
  std::ifstream in("/proc/" + std::to_string(tid) + "/maps");
  for (std::string line; std::getline(in, line);) {
    // start-end perms offset dev inode path
    std::istringstream fields(line);
    std::string range, perms, offset, dev, inode, path;
    fields >> range >> perms >> offset >> dev >> inode;
    std::getline(fields >> std::ws, path);
    size_t dash = range.find('-');
    if (dash == std::string::npos) {
      continue;
    }
    result.push_back(MappedFile{std::stoull(range.substr(0, dash), nullptr, 16),
                                std::stoull(range.substr(dash + 1), nullptr, 16),
                                std::stoull(offset, nullptr, 16), path});
  }
  return result;
}

}  // namespace

std::vector<StackFrame> unwindGuest(pid_t tid, const TrappedRegs& regs, size_t maxFrames) {
  std::vector<StackFrame> frames;
  unw_accessors_t accessors = {};
  accessors.find_proc_info = findProcInfo;
  accessors.put_unwind_info = putUnwindInfo;
  accessors.get_dyn_info_list_addr = getDynInfoListAddr;
  accessors.access_mem = accessMem;
  accessors.access_reg = accessReg;
  accessors.access_fpreg = accessFpreg;
  accessors.resume = resume;
  accessors.get_proc_name = getProcName;
  unw_addr_space_t space = unw_create_addr_space(&accessors, 0);
  if (space == nullptr) {
    return frames;
  }
  KJ_DEFER(unw_destroy_addr_space(space));
  void* upt = _UPT_create(tid);
  if (upt == nullptr) {
    return frames;
  }
  KJ_DEFER(_UPT_destroy(upt));
  UnwindTarget target{tid, &regs, upt, {}};
  currentTarget = &target;
  KJ_DEFER(currentTarget = nullptr);
  std::vector<MappedFile> maps = readMappedFiles(tid);

  unw_cursor_t cursor;
  if (unw_init_remote(&cursor, space, &target) < 0) {
    return frames;
  }
  for (size_t depth = 0; depth < maxFrames; depth++) {
    unw_word_t ip = 0;
    if (unw_get_reg(&cursor, UNW_REG_IP, &ip) < 0 || ip == 0) {
      break;
    }
    StackFrame frame;
    frame.ip = ip;
    for (const MappedFile& m : maps) {
      if (ip >= m.start && ip < m.end) {
        frame.module = m.path;
        break;
      }
    }
    char name[512];
    unw_word_t offset = 0;
    if (unw_get_proc_name(&cursor, name, sizeof(name), &offset) == 0) {
      frame.symbol = preferredName(maps, frame.module, ip - offset, name);
      frame.offset = offset;
    }
    frames.push_back(kj::mv(frame));
    if (unw_step(&cursor) <= 0) {
      break;
    }
  }
  return frames;
}

GuestStacks::GuestStacks() = default;
GuestStacks::~GuestStacks() = default;

std::vector<StackFrame> GuestStacks::capture(pid_t tid, uint64_t ip, const uint64_t (&args)[6]) {
  auto it = samplers_.find(tid);
  bool fresh = it == samplers_.end();  // made now: the thread went to sleep unsampled
  if (fresh) {
    try {
      it = samplers_.emplace(tid, std::make_unique<GuestStackSampler>(tid)).first;
    } catch (kj::Exception& e) {
      if (!warned_) {
        warned_ = true;
        spdlog::warn("guest stacks (mostrace -k) fall back to ip and sp only: {}",
                     e.getDescription().cStr());
      }
    }
  }
  kj::Maybe<TrappedRegs> regs;
  if (it != samplers_.end()) {
    regs = it->second->trappedRegs(ip, args, fresh ? 0 : 20);
  }
  if (regs == nullptr) {
    regs = syscallRegs(tid);
  }
  KJ_IF_MAYBE (r, regs) {
    return unwindGuest(tid, *r);
  }
  return {};
}

void traceGuestStack(TraceCall& trace, GuestStacks& stacks, const seccomp_notif& notif,
                     const std::function<std::string(const std::string&)>& homePath) {
  if (!trace.wantsStack()) {
    if (KJ_UNLIKELY(trace.active() && stacks.sampling())) {
      stacks.stop();  // traced, but no subscriber wants stacks any more
    }
    return;
  }
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = notif.data.args[i];
  }
  std::vector<TraceFrame> frames;
  for (StackFrame& f :
       stacks.capture(static_cast<pid_t>(notif.pid), notif.data.instruction_pointer, args)) {
    std::string module = homePath && !f.module.empty() ? homePath(f.module) : f.module;
    frames.push_back(TraceFrame{f.ip, kj::mv(module), kj::mv(f.symbol), f.offset});
  }
  trace.stack(kj::mv(frames));
}

}  // namespace mos::remote
