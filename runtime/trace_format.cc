#include "trace_format.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <utility>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <vector>

#include "syscall_table.h"

namespace mos {

namespace {

struct FlagName {
  uint64_t bits;
  const char* name;
};

// In strace's order (its xlat tables), so combinations print identically.
// O_LARGEFILE is the kernel's value: glibc defines it as 0 on x86-64.
constexpr FlagName OPEN_FLAGS[] = {
    {O_CREAT, "O_CREAT"},         {O_EXCL, "O_EXCL"},       {O_NOCTTY, "O_NOCTTY"},
    {O_TRUNC, "O_TRUNC"},         {O_APPEND, "O_APPEND"},   {O_NONBLOCK, "O_NONBLOCK"},
    {O_SYNC, "O_SYNC"},           {O_DSYNC, "O_DSYNC"},     {O_ASYNC, "O_ASYNC"},
    {O_DIRECT, "O_DIRECT"},       {0100000, "O_LARGEFILE"}, {O_NOFOLLOW, "O_NOFOLLOW"},
    {O_NOATIME, "O_NOATIME"},     {O_CLOEXEC, "O_CLOEXEC"}, {O_TMPFILE, "O_TMPFILE"},
    {O_DIRECTORY, "O_DIRECTORY"}, {O_PATH, "O_PATH"},
};
constexpr FlagName PROT_FLAGS[] = {
    {PROT_READ, "PROT_READ"},           {PROT_WRITE, "PROT_WRITE"},     {PROT_EXEC, "PROT_EXEC"},
    {PROT_GROWSDOWN, "PROT_GROWSDOWN"}, {PROT_GROWSUP, "PROT_GROWSUP"},
};
constexpr FlagName MAP_FLAGS[] = {
    {MAP_FIXED, "MAP_FIXED"},         {MAP_ANONYMOUS, "MAP_ANONYMOUS"},
    {MAP_32BIT, "MAP_32BIT"},         {MAP_GROWSDOWN, "MAP_GROWSDOWN"},
    {MAP_DENYWRITE, "MAP_DENYWRITE"}, {MAP_EXECUTABLE, "MAP_EXECUTABLE"},
    {MAP_LOCKED, "MAP_LOCKED"},       {MAP_NORESERVE, "MAP_NORESERVE"},
    {MAP_POPULATE, "MAP_POPULATE"},   {MAP_NONBLOCK, "MAP_NONBLOCK"},
    {MAP_STACK, "MAP_STACK"},         {MAP_HUGETLB, "MAP_HUGETLB"},
    {MAP_SYNC, "MAP_SYNC"},           {MAP_FIXED_NOREPLACE, "MAP_FIXED_NOREPLACE"},
};
constexpr FlagName AT_FLAGS[] = {
    {AT_SYMLINK_NOFOLLOW, "AT_SYMLINK_NOFOLLOW"},
    {AT_REMOVEDIR, "AT_REMOVEDIR"},
    {AT_SYMLINK_FOLLOW, "AT_SYMLINK_FOLLOW"},
    {AT_NO_AUTOMOUNT, "AT_NO_AUTOMOUNT"},
    {AT_EMPTY_PATH, "AT_EMPTY_PATH"},
    {AT_EACCESS, "AT_EACCESS"},
};
constexpr FlagName ACCESS_FLAGS[] = {{R_OK, "R_OK"}, {W_OK, "W_OK"}, {X_OK, "X_OK"}};

// How a VAL argument of a known call is shown.
enum class ValStyle : uint8_t {
  DECIMAL,
  HEX,         // offsets of mmap, addresses
  POINTER,     // NULL or hex
  OPEN_FLAGS,  // O_RDONLY|O_CLOEXEC
  OPEN_MODE,   // octal, shown only with O_CREAT or O_TMPFILE in the flags before it
  OCTAL,       // modes
  PROT,
  MAP,
  AT,
  ACCESS,
  SIGNAL,
  WHENCE,
  STATX_FLAGS,  // AT_STATX_SYNC_AS_STAT|AT_SYMLINK_NOFOLLOW
  STATX_MASK,
};

struct ValRule {
  const char* name;
  uint8_t arg;
  ValStyle style;
};

constexpr ValRule VAL_RULES[] = {
    {"open", 1, ValStyle::OPEN_FLAGS},   {"open", 2, ValStyle::OPEN_MODE},
    {"openat", 2, ValStyle::OPEN_FLAGS}, {"openat", 3, ValStyle::OPEN_MODE},
    {"creat", 1, ValStyle::OCTAL},       {"mkdir", 1, ValStyle::OCTAL},
    {"mkdirat", 2, ValStyle::OCTAL},     {"chmod", 1, ValStyle::OCTAL},
    {"fchmod", 1, ValStyle::OCTAL},      {"fchmodat", 2, ValStyle::OCTAL},
    {"umask", 0, ValStyle::OCTAL},       {"mmap", 0, ValStyle::POINTER},
    {"mmap", 2, ValStyle::PROT},         {"mmap", 3, ValStyle::MAP},
    {"mmap", 5, ValStyle::HEX},          {"mprotect", 0, ValStyle::HEX},
    {"mprotect", 2, ValStyle::PROT},     {"munmap", 0, ValStyle::HEX},
    {"brk", 0, ValStyle::POINTER},       {"newfstatat", 3, ValStyle::AT},
    {"statx", 2, ValStyle::STATX_FLAGS}, {"statx", 3, ValStyle::STATX_MASK},
    {"unlinkat", 2, ValStyle::AT},       {"fchownat", 4, ValStyle::AT},
    {"linkat", 4, ValStyle::AT},         {"utimensat", 3, ValStyle::AT},
    {"faccessat", 2, ValStyle::ACCESS},  {"faccessat2", 2, ValStyle::ACCESS},
    {"faccessat2", 3, ValStyle::AT},     {"access", 1, ValStyle::ACCESS},
    {"kill", 1, ValStyle::SIGNAL},       {"tkill", 1, ValStyle::SIGNAL},
    {"tgkill", 2, ValStyle::SIGNAL},     {"rt_sigaction", 0, ValStyle::SIGNAL},
    {"lseek", 2, ValStyle::WHENCE},
};

// Calls whose result is an address, shown in hex.
bool returnsAddress(std::string_view name) {
  return name == "mmap" || name == "mremap" || name == "brk" || name == "shmat";
}

std::string flags(uint64_t value, std::span<const FlagName> table, std::string out) {
  for (const FlagName& f : table) {
    if (f.bits != 0 && (value & f.bits) == f.bits) {
      if (!out.empty()) out += '|';
      out += f.name;
      value &= ~f.bits;
    }
  }
  if (value != 0 || out.empty()) {
    if (!out.empty()) out += '|';
    out += fmt::format("{:#x}", value);
  }
  return out;
}

std::string openFlags(uint64_t value) {
  const char* access = "O_RDONLY";
  switch (value & O_ACCMODE) {
    case O_WRONLY: access = "O_WRONLY"; break;
    case O_RDWR: access = "O_RDWR"; break;
    case O_ACCMODE: access = "O_ACCMODE"; break;
  }
  value &= ~uint64_t(O_ACCMODE);
  // O_SYNC includes O_DSYNC and O_TMPFILE includes O_DIRECTORY: strace names the larger one.
  std::string out = access;
  for (const FlagName& f : OPEN_FLAGS) {
    if ((value & f.bits) == f.bits) {
      out += '|';
      out += f.name;
      value &= ~uint64_t(f.bits);
    }
  }
  if (value != 0) {
    out += fmt::format("|{:#x}", value);
  }
  return out;
}

std::string octal(uint64_t value) { return fmt::format("0{:03o}", value); }

std::string hexOrZero(uint64_t value) { return value == 0 ? "0" : fmt::format("{:#x}", value); }

std::string pointer(uint64_t value) { return value == 0 ? "NULL" : fmt::format("{:#x}", value); }

std::string fdText(uint64_t value) {
  int fd = int(int32_t(value));
  return fd == AT_FDCWD ? "AT_FDCWD" : std::to_string(fd);
}

std::string modeText(uint32_t mode) {
  const char* type = nullptr;
  switch (mode & S_IFMT) {
    case S_IFREG: type = "S_IFREG"; break;
    case S_IFDIR: type = "S_IFDIR"; break;
    case S_IFCHR: type = "S_IFCHR"; break;
    case S_IFBLK: type = "S_IFBLK"; break;
    case S_IFIFO: type = "S_IFIFO"; break;
    case S_IFLNK: type = "S_IFLNK"; break;
    case S_IFSOCK: type = "S_IFSOCK"; break;
  }
  std::string out = type ? fmt::format("{}|", type) : "";
  for (auto [bit, name] : {std::pair{S_ISUID, "S_ISUID|"}, std::pair{S_ISGID, "S_ISGID|"},
                           std::pair{S_ISVTX, "S_ISVTX|"}}) {
    if (mode & bit) out += name;
  }
  return out + octal(mode & 0777);
}

constexpr FlagName STATX_MASK[] = {
    {STATX_TYPE, "STATX_TYPE"},   {STATX_MODE, "STATX_MODE"},     {STATX_NLINK, "STATX_NLINK"},
    {STATX_UID, "STATX_UID"},     {STATX_GID, "STATX_GID"},       {STATX_ATIME, "STATX_ATIME"},
    {STATX_MTIME, "STATX_MTIME"}, {STATX_CTIME, "STATX_CTIME"},   {STATX_INO, "STATX_INO"},
    {STATX_SIZE, "STATX_SIZE"},   {STATX_BLOCKS, "STATX_BLOCKS"}, {STATX_BTIME, "STATX_BTIME"},
    {0x1000, "STATX_MNT_ID"},
};

// STATX_BASIC_STATS by name when all of it is there, as strace prints it.
std::string statxMask(uint64_t mask) {
  std::string out;
  if ((mask & STATX_BASIC_STATS) == STATX_BASIC_STATS) {
    out = "STATX_BASIC_STATS";
    mask &= ~uint64_t(STATX_BASIC_STATS);
    if (mask == 0) return out;
  }
  return flags(mask, STATX_MASK, out);
}

std::string statxText(const std::string& bytes) {
  struct statx stx;
  memcpy(&stx, bytes.data(), sizeof(stx));
  return fmt::format("{{stx_mask={}, stx_attributes={}, stx_mode={}, stx_size={}, ...}}",
                     statxMask(stx.stx_mask), hexOrZero(stx.stx_attributes), modeText(stx.stx_mode),
                     stx.stx_size);
}

// linux_dirent64 records in a getdents64 buffer; -1 when the buffer is malformed.
int direntCount(const std::string& bytes) {
  int n = 0;
  for (size_t at = 0; at + 19 <= bytes.size(); n++) {
    uint16_t reclen;
    memcpy(&reclen, bytes.data() + at + 16, sizeof(reclen));
    if (reclen == 0) return -1;
    at += reclen;
  }
  return n;
}

struct NamedValue {
  uint64_t value;
  const char* name;
};

constexpr NamedValue IOCTL_REQUESTS[] = {
    {TCGETS, "TCGETS"},       {TCSETS, "TCSETS"},         {TCSETSW, "TCSETSW"},
    {TCSETSF, "TCSETSF"},     {TIOCGWINSZ, "TIOCGWINSZ"}, {TIOCSWINSZ, "TIOCSWINSZ"},
    {TIOCGPGRP, "TIOCGPGRP"}, {TIOCSPGRP, "TIOCSPGRP"},   {FIONREAD, "FIONREAD"},
    {FIONBIO, "FIONBIO"},     {FIOCLEX, "FIOCLEX"},       {FIONCLEX, "FIONCLEX"},
    {TIOCSCTTY, "TIOCSCTTY"}, {TIOCNOTTY, "TIOCNOTTY"},
};
constexpr NamedValue FCNTL_COMMANDS[] = {
    {F_DUPFD, "F_DUPFD"},
    {F_GETFD, "F_GETFD"},
    {F_SETFD, "F_SETFD"},
    {F_GETFL, "F_GETFL"},
    {F_SETFL, "F_SETFL"},
    {F_GETLK, "F_GETLK"},
    {F_SETLK, "F_SETLK"},
    {F_SETLKW, "F_SETLKW"},
    {F_SETOWN, "F_SETOWN"},
    {F_GETOWN, "F_GETOWN"},
    {F_DUPFD_CLOEXEC, "F_DUPFD_CLOEXEC"},
    {F_SETPIPE_SZ, "F_SETPIPE_SZ"},
    {F_GETPIPE_SZ, "F_GETPIPE_SZ"},
    {F_ADD_SEALS, "F_ADD_SEALS"},
    {F_GET_SEALS, "F_GET_SEALS"},
    {F_OFD_GETLK, "F_OFD_GETLK"},
    {F_OFD_SETLK, "F_OFD_SETLK"},
    {F_OFD_SETLKW, "F_OFD_SETLKW"},
};

const char* nameOf(uint64_t value, std::span<const NamedValue> table) {
  for (const NamedValue& v : table) {
    if (v.value == value) return v.name;
  }
  return nullptr;
}

constexpr NamedValue RLIMITS[] = {
    {RLIMIT_CPU, "RLIMIT_CPU"},           {RLIMIT_FSIZE, "RLIMIT_FSIZE"},
    {RLIMIT_DATA, "RLIMIT_DATA"},         {RLIMIT_STACK, "RLIMIT_STACK"},
    {RLIMIT_CORE, "RLIMIT_CORE"},         {RLIMIT_RSS, "RLIMIT_RSS"},
    {RLIMIT_NPROC, "RLIMIT_NPROC"},       {RLIMIT_NOFILE, "RLIMIT_NOFILE"},
    {RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK"},   {RLIMIT_AS, "RLIMIT_AS"},
    {RLIMIT_LOCKS, "RLIMIT_LOCKS"},       {RLIMIT_SIGPENDING, "RLIMIT_SIGPENDING"},
    {RLIMIT_MSGQUEUE, "RLIMIT_MSGQUEUE"}, {RLIMIT_NICE, "RLIMIT_NICE"},
    {RLIMIT_RTPRIO, "RLIMIT_RTPRIO"},     {RLIMIT_RTTIME, "RLIMIT_RTTIME"},
};
constexpr NamedValue ADDRESS_FAMILIES[] = {
    {AF_UNSPEC, "AF_UNSPEC"}, {AF_UNIX, "AF_UNIX"},       {AF_INET, "AF_INET"},
    {AF_INET6, "AF_INET6"},   {AF_NETLINK, "AF_NETLINK"}, {AF_PACKET, "AF_PACKET"},
};
constexpr NamedValue SOCKET_TYPES[] = {
    {SOCK_STREAM, "SOCK_STREAM"}, {SOCK_DGRAM, "SOCK_DGRAM"},         {SOCK_RAW, "SOCK_RAW"},
    {SOCK_RDM, "SOCK_RDM"},       {SOCK_SEQPACKET, "SOCK_SEQPACKET"}, {SOCK_PACKET, "SOCK_PACKET"},
};

// strace's rlim64_t: RLIM64_INFINITY, N*1024 for multiples of 1 KiB, else N.
std::string rlimitValue(uint64_t v) {
  if (v == UINT64_MAX) {
    return "RLIM64_INFINITY";
  }
  if (v > 1024 && v % 1024 == 0) {
    return fmt::format("{}*1024", v / 1024);
  }
  return std::to_string(v);
}

// A struct rlimit64 payload as strace shows it; the address when it was not captured.
std::string rlimitText(const TracePayload& p, uint64_t address) {
  if (address == 0) {
    return "NULL";
  }
  if (!p.present || p.data.size() < 2 * sizeof(uint64_t)) {
    return fmt::format("{:#x}", address);
  }
  uint64_t limits[2];
  memcpy(limits, p.data.data(), sizeof limits);
  return fmt::format("{{rlim_cur={}, rlim_max={}}}", rlimitValue(limits[0]),
                     rlimitValue(limits[1]));
}

// socket(2)'s arguments: AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC, and the protocol (IPPROTO_IP for an
// internet socket's 0, as strace shows it).
std::string socketArgs(const TraceRecord& r) {
  const char* family = nameOf(r.args[0], ADDRESS_FAMILIES);
  uint64_t type = r.args[1];
  const char* base = nameOf(type & 0xf, SOCKET_TYPES);
  std::string typeText = base ? base : std::to_string(type & 0xf);
  if (type & SOCK_CLOEXEC) typeText += "|SOCK_CLOEXEC";
  if (type & SOCK_NONBLOCK) typeText += "|SOCK_NONBLOCK";
  std::string protocol = std::to_string(r.args[2]);
  if ((r.args[0] == AF_INET || r.args[0] == AF_INET6) && r.args[2] == 0) {
    protocol = "IPPROTO_IP";
  }
  return fmt::format("{}, {}, {}", family ? family : std::to_string(r.args[0]), typeText, protocol);
}

// A sockaddr in-buffer (connect, bind): AF_UNIX and AF_INET decoded as strace does; other
// families and short buffers fall back to the quoted bytes.
// In strace's order (xlat/clone_flags.in).
constexpr FlagName CLONE_FLAGS[] = {
    {CLONE_VM, "CLONE_VM"},
    {CLONE_FS, "CLONE_FS"},
    {CLONE_FILES, "CLONE_FILES"},
    {CLONE_SIGHAND, "CLONE_SIGHAND"},
    {CLONE_PIDFD, "CLONE_PIDFD"},
    {CLONE_PTRACE, "CLONE_PTRACE"},
    {CLONE_VFORK, "CLONE_VFORK"},
    {CLONE_PARENT, "CLONE_PARENT"},
    {CLONE_THREAD, "CLONE_THREAD"},
    {CLONE_NEWNS, "CLONE_NEWNS"},
    {CLONE_SYSVSEM, "CLONE_SYSVSEM"},
    {CLONE_SETTLS, "CLONE_SETTLS"},
    {CLONE_PARENT_SETTID, "CLONE_PARENT_SETTID"},
    {CLONE_CHILD_CLEARTID, "CLONE_CHILD_CLEARTID"},
    {CLONE_UNTRACED, "CLONE_UNTRACED"},
    {CLONE_CHILD_SETTID, "CLONE_CHILD_SETTID"},
    {CLONE_NEWCGROUP, "CLONE_NEWCGROUP"},
    {CLONE_NEWUTS, "CLONE_NEWUTS"},
    {CLONE_NEWIPC, "CLONE_NEWIPC"},
    {CLONE_NEWUSER, "CLONE_NEWUSER"},
    {CLONE_NEWPID, "CLONE_NEWPID"},
    {CLONE_NEWNET, "CLONE_NEWNET"},
    {CLONE_IO, "CLONE_IO"},
};

// clone(2) as strace shows it on x86-64 (flags, stack, parent_tid, child_tid, tls):
// child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x...
std::string cloneArgs(const TraceRecord& r) {
  uint64_t bits = r.args[0];
  std::string text = fmt::format("child_stack={}, flags=", pointer(r.args[1]));
  uint64_t named = bits & ~uint64_t(CSIGNAL);
  std::string names = named != 0 ? flags(named, CLONE_FLAGS, "") : "";
  int sig = int(bits & CSIGNAL);
  if (sig != 0) {
    names += (names.empty() ? "" : "|") + signalName(sig);
  }
  text += names.empty() ? "0" : names;
  if (bits & CLONE_PARENT_SETTID) {
    text += fmt::format(", parent_tid={}", pointer(r.args[2]));
  }
  if (bits & (CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID)) {
    text += fmt::format(", child_tidptr={}", pointer(r.args[3]));
  }
  if (bits & CLONE_SETTLS) {
    text += fmt::format(", tls={}", pointer(r.args[4]));
  }
  return text;
}

// execve's argv and envp as strace shows them: ["cat", "a.txt"], 0x7ffd... /* 27 vars */.
std::string execArgs(const TraceRecord& r, int argvArg, size_t limit) {
  const TracePayload& argv = r.payloads[argvArg];
  std::string out;
  if (r.args[argvArg] == 0) {
    out = "NULL";
  } else if (!argv.present) {
    out = fmt::format("{:#x}", r.args[argvArg]);
  } else {
    out = "[";
    size_t at = 0;
    int n = 0;
    for (;;) {
      size_t nul = argv.data.find('\0', at);
      if (nul == std::string::npos) {
        break;  // a string cut by the publisher: shown as `...`
      }
      out += n++ ? ", " : "";
      out += quoteString(std::string_view(argv.data).substr(at, nul - at), limit, false);
      at = nul + 1;
    }
    if (argv.length > argv.data.size()) {
      out += n ? ", ..." : "...";
    }
    out += "]";
  }
  const TracePayload& envp = r.payloads[argvArg + 1];
  uint64_t address = r.args[argvArg + 1];
  if (address == 0) {
    return out + ", NULL";
  }
  if (envp.present && envp.data.size() == 4) {
    uint32_t count;
    memcpy(&count, envp.data.data(), 4);
    return out + fmt::format(", {:#x} /* {} var{} */", address, count, count == 1 ? "" : "s");
  }
  return out + fmt::format(", {:#x}", address);
}

std::string sockaddrText(const TracePayload& p, uint64_t address, size_t limit) {
  if (address == 0) {
    return "NULL";
  }
  if (!p.present) {
    return fmt::format("{:#x}", address);
  }
  if (p.data.size() >= sizeof(sa_family_t) && p.data.size() == p.length) {
    sa_family_t family;
    memcpy(&family, p.data.data(), sizeof family);
    if (family == AF_UNIX) {
      std::string path = p.data.substr(sizeof family);
      if (!path.empty() && path[0] == '\0') {
        return fmt::format("{{sa_family=AF_UNIX, sun_path=@{}}}",
                           quoteString(path.substr(1), SIZE_MAX, false));
      }
      path = path.substr(0, path.find('\0'));
      return fmt::format("{{sa_family=AF_UNIX, sun_path={}}}", quoteString(path, SIZE_MAX, false));
    }
    if (family == AF_INET && p.data.size() >= sizeof(sockaddr_in)) {
      sockaddr_in sin;
      memcpy(&sin, p.data.data(), sizeof sin);
      char text[INET_ADDRSTRLEN];
      inet_ntop(AF_INET, &sin.sin_addr, text, sizeof text);
      return fmt::format("{{sa_family=AF_INET, sin_port=htons({}), sin_addr=inet_addr(\"{}\")}}",
                         ntohs(sin.sin_port), text);
    }
  }
  return quoteString(p.data, limit, p.length > p.data.size());
}

// The arguments of ioctl and fcntl after the descriptor, which their rows leave to the handler:
// strace's `TCGETS, 0x7ffd...`, `F_SETFD, FD_CLOEXEC`, `F_GETFL`.
std::string ioctlArgs(const TraceRecord& r) {
  const char* name = nameOf(r.args[1], IOCTL_REQUESTS);
  std::string request = name ? name : fmt::format("{:#x}", r.args[1]);
  if (r.args[1] == FIOCLEX || r.args[1] == FIONCLEX) {
    return request;  // strace: ioctl(3, FIOCLEX); the argument is not used
  }
  return fmt::format("{}, {}", request, hexOrZero(r.args[2]));
}

std::string fcntlArgs(const TraceRecord& r) {
  int cmd = int(r.args[1]);
  const char* name = nameOf(uint64_t(cmd), FCNTL_COMMANDS);
  std::string out = name ? name : std::to_string(cmd);
  switch (cmd) {
    case F_GETFD:
    case F_GETFL:
    case F_GETOWN:
    case F_GETPIPE_SZ:
    case F_GET_SEALS: return out;
    case F_SETFD:
      return out + (r.args[2] == FD_CLOEXEC ? ", FD_CLOEXEC" : fmt::format(", {}", r.args[2]));
    case F_SETFL: return out + ", " + openFlags(uint32_t(r.args[2]));
    case F_DUPFD:
    case F_DUPFD_CLOEXEC:
    case F_SETOWN:
    case F_SETPIPE_SZ:
    case F_ADD_SEALS: return fmt::format("{}, {}", out, int64_t(r.args[2]));
    case F_SETLK:
    case F_SETLKW:
    case F_OFD_SETLK:
    case F_OFD_SETLKW: {
      // strace: {l_type=F_RDLCK, l_whence=SEEK_SET, l_start=1073741824, l_len=1}
      const TracePayload& p = r.payloads[2];
      if (!p.present || p.data.size() < sizeof(struct flock)) {
        break;
      }
      struct flock lock;
      memcpy(&lock, p.data.data(), sizeof lock);
      const char* type = lock.l_type == F_RDLCK   ? "F_RDLCK"
                         : lock.l_type == F_WRLCK ? "F_WRLCK"
                         : lock.l_type == F_UNLCK ? "F_UNLCK"
                                                  : nullptr;
      const char* whence = lock.l_whence == SEEK_SET   ? "SEEK_SET"
                           : lock.l_whence == SEEK_CUR ? "SEEK_CUR"
                           : lock.l_whence == SEEK_END ? "SEEK_END"
                                                       : nullptr;
      return fmt::format("{}, {{l_type={}, l_whence={}, l_start={}, l_len={}}}", out,
                         type ? type : std::to_string(lock.l_type),
                         whence ? whence : std::to_string(lock.l_whence), int64_t(lock.l_start),
                         int64_t(lock.l_len));
    }
  }
  return fmt::format("{}, {}", out, hexOrZero(r.args[2]));
}

// strace's abbreviated struct stat: {st_mode=S_IFREG|0644, st_size=42655, ...}; devices show
// st_rdev instead of st_size.
std::string statText(const std::string& bytes) {
  struct stat st;
  memcpy(&st, bytes.data(), sizeof(st));
  if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) {
    return fmt::format("{{st_mode={}, st_rdev=makedev({:#x}, {:#x}), ...}}", modeText(st.st_mode),
                       major(st.st_rdev), minor(st.st_rdev));
  }
  return fmt::format("{{st_mode={}, st_size={}, ...}}", modeText(st.st_mode), st.st_size);
}

const ValRule* valRule(std::string_view name, int arg) {
  for (const ValRule& rule : VAL_RULES) {
    if (rule.arg == arg && name == rule.name) {
      return &rule;
    }
  }
  return nullptr;
}

std::string valText(const SyscallEntry& row, int i, const TraceRecord& r) {
  uint64_t v = r.args[i];
  const ValRule* rule = valRule(row.name, i);
  switch (rule ? rule->style : ValStyle::DECIMAL) {
    case ValStyle::DECIMAL: return std::to_string(int64_t(v));
    case ValStyle::HEX: return hexOrZero(v);
    case ValStyle::POINTER: return pointer(v);
    case ValStyle::OPEN_FLAGS: return openFlags(uint32_t(v));
    case ValStyle::OPEN_MODE:
    case ValStyle::OCTAL: return octal(uint32_t(v));
    case ValStyle::PROT: return v == 0 ? "PROT_NONE" : flags(v, PROT_FLAGS, "");
    case ValStyle::MAP: {
      const char* type = "MAP_PRIVATE";
      switch (v & MAP_TYPE) {
        case MAP_SHARED: type = "MAP_SHARED"; break;
        case MAP_PRIVATE: type = "MAP_PRIVATE"; break;
        case MAP_SHARED_VALIDATE: type = "MAP_SHARED_VALIDATE"; break;
        default: type = "0"; break;
      }
      std::string out = type;
      v &= ~uint64_t(MAP_TYPE);
      return v == 0 ? out : flags(v, MAP_FLAGS, out);
    }
    case ValStyle::AT: return v == 0 ? "0" : flags(uint32_t(v), AT_FLAGS, "");
    case ValStyle::ACCESS: return v == 0 ? "F_OK" : flags(v, ACCESS_FLAGS, "");
    case ValStyle::SIGNAL: return signalName(int(v));
    case ValStyle::WHENCE:
      switch (v) {
        case SEEK_SET: return "SEEK_SET";
        case SEEK_CUR: return "SEEK_CUR";
        case SEEK_END: return "SEEK_END";
        case SEEK_DATA: return "SEEK_DATA";
        case SEEK_HOLE: return "SEEK_HOLE";
      }
      return std::to_string(v);
    case ValStyle::STATX_FLAGS: {
      const char* sync = "AT_STATX_SYNC_AS_STAT";
      if ((v & AT_STATX_SYNC_TYPE) == AT_STATX_FORCE_SYNC) sync = "AT_STATX_FORCE_SYNC";
      if ((v & AT_STATX_SYNC_TYPE) == AT_STATX_DONT_SYNC) sync = "AT_STATX_DONT_SYNC";
      v &= ~uint64_t(AT_STATX_SYNC_TYPE);
      return v == 0 ? sync : flags(uint32_t(v), AT_FLAGS, sync);
    }
    case ValStyle::STATX_MASK: return statxMask(v);
  }
  return std::to_string(int64_t(v));
}

std::string bufferText(const TracePayload& p, uint64_t address, size_t limit) {
  if (address == 0) {
    return "NULL";
  }
  if (!p.present) {
    return fmt::format("{:#x}", address);
  }
  return quoteString(p.data, limit, p.length > p.data.size());
}

std::string argText(const SyscallEntry& row, int i, const TraceRecord& r, size_t limit) {
  const ArgSpec& spec = row.args[i];
  uint64_t v = r.args[i];
  const TracePayload& p = r.payloads[i];
  bool failed = r.failed();
  switch (spec.kind) {
    case ArgKind::NONE: return "";
    case ArgKind::VAL: return valText(row, i, r);
    case ArgKind::FD:
    case ArgKind::NEW_FD: return fdText(v);
    case ArgKind::PATH:
    case ArgKind::PATH_OR_NULL: return bufferText(p, v, SIZE_MAX);  // paths are never cut
    case ArgKind::STRING:
    case ArgKind::IN_BUF: return bufferText(p, v, limit);
    case ArgKind::OUT_BUF:
    case ArgKind::OUT_BUF_LENPTR:
      if (!failed && (r.nr == __NR_getdents64 || r.nr == __NR_getdents)) {
        // strace: the address and how many records came back (when all of them were captured)
        int n = p.present && p.data.size() == p.length && r.nr == __NR_getdents64
                    ? direntCount(p.data)
                    : -1;
        return n >= 0 ? fmt::format("{:#x} /* {} entries */", v, n) : pointer(v);
      }
      return failed ? pointer(v) : bufferText(p, v, limit);
    case ArgKind::IN_STRUCT:
    case ArgKind::OUT_STRUCT:
    case ArgKind::INOUT_STRUCT:
      if (v == 0) {
        return "NULL";
      }
      if (failed && spec.kind == ArgKind::OUT_STRUCT) {
        return pointer(v);
      }
      if (p.present && spec.size == sizeof(struct stat) && p.data.size() >= sizeof(struct stat)) {
        return statText(p.data);
      }
      if (p.present && spec.size == sizeof(struct statx) && p.data.size() >= sizeof(struct statx)) {
        return statxText(p.data);
      }
      return p.present ? "{...}" : pointer(v);
    case ArgKind::INOUT_ARRAY:
    case ArgKind::OUT_ARRAY:
      if (v == 0) return "NULL";
      return failed ? pointer(v) : "[...]";
    case ArgKind::INOUT_BITS: return v == 0 ? "NULL" : "[...]";
    case ArgKind::SIGMASK:
    case ArgKind::SIGMASK_PAIR: return pointer(v);
  }
  return fmt::format("{:#x}", v);
}

std::string resultText(const TraceRecord& r, const char* name) {
  if (r.resultUnknown) {
    return "?";
  }
  if (r.failed()) {
    int err = int(-r.result);
    std::string desc;
    switch (err) {
      case 512: desc = "To be restarted if SA_RESTART is set"; break;
      case 513: desc = "To be restarted if no handler"; break;
      case 514: desc = "To be restarted if no handler"; break;
      case 516: desc = "To be restarted"; break;
      default: {
        const char* d = strerrordesc_np(err);
        desc = d ? d : fmt::format("Unknown error {}", err);
      }
    }
    const char* head = err >= 512 && err <= 516 ? "?" : "-1";
    return fmt::format("{} {} ({})", head, errnoName(err), desc);
  }
  if (r.nr == __NR_fcntl && r.result > 0 && (r.args[1] == F_GETFD || r.args[1] == F_GETFL)) {
    // strace: 0x1 (flags FD_CLOEXEC), 0x8002 (flags O_RDWR|O_LARGEFILE)
    std::string flagText = r.args[1] == F_GETFD
                               ? (r.result == FD_CLOEXEC ? "FD_CLOEXEC" : std::to_string(r.result))
                               : openFlags(uint64_t(r.result));
    return fmt::format("{:#x} (flags {})", uint64_t(r.result), flagText);
  }
  if (name && returnsAddress(name)) {
    return fmt::format("{:#x}", uint64_t(r.result));
  }
  return std::to_string(r.result);
}

std::string seconds(uint64_t us) { return fmt::format("{}.{:06}", us / 1000000, us % 1000000); }

}  // namespace

const char* traceRouteName(TraceRoute route) {
  switch (route) {
    case TraceRoute::FORWARDED: return "forwarded";
    case TraceRoute::EMULATED: return "emulated";
    case TraceRoute::LOCAL_ANSWER: return "local";
    case TraceRoute::DENIED: return "denied";
  }
  return "?";
}

std::string quoteString(std::string_view s, size_t limit, bool truncated) {
  std::string out = "\"";
  size_t n = std::min(s.size(), limit);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = s[i];
    switch (c) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\t': out += "\\t"; continue;
      case '\r': out += "\\r"; continue;
      case '\v': out += "\\v"; continue;
      case '\f': out += "\\f"; continue;
    }
    if (c >= 0x20 && c < 0x7f) {
      out += char(c);
      continue;
    }
    bool digitNext = i + 1 < n && s[i + 1] >= '0' && s[i + 1] <= '7';
    out += digitNext ? fmt::format("\\{:03o}", c) : fmt::format("\\{:o}", c);
  }
  out += '"';
  if (s.size() > limit || truncated) {
    out += "...";
  }
  return out;
}

std::string errnoName(int err) {
  switch (err) {
    case 512: return "ERESTARTSYS";
    case 513: return "ERESTARTNOINTR";
    case 514: return "ERESTARTNOHAND";
    case 516: return "ERESTART_RESTARTBLOCK";
  }
  const char* name = strerrorname_np(err);
  return name ? name : fmt::format("E{}", err);
}

std::string signalName(int sig) {
  if (sig >= SIGRTMIN && sig <= SIGRTMAX) {
    return sig == SIGRTMIN ? "SIGRTMIN" : fmt::format("SIGRTMIN+{}", sig - SIGRTMIN);
  }
  const char* abbrev = sigabbrev_np(sig);
  return abbrev ? fmt::format("SIG{}", abbrev) : std::to_string(sig);
}

std::string TraceFormatter::call(const TraceRecord& r) const {
  const SyscallEntry* row = findSyscall(r.nr);
  std::string text;
  if (row == nullptr) {
    text = fmt::format("syscall_{:#x}(", r.nr);
    for (int i = 0; i < 6; i++) {
      text += fmt::format("{}{}", i ? ", " : "", hexOrZero(r.args[i]));
    }
  } else {
    text = fmt::format("{}(", row->name);
    int count = 0;
    // execve's argv and envp are HANDLED (no kind): shown from the handler's payloads.
    auto execStrings = [&](int i) {
      return (r.nr == __NR_execve && i == 1) || (r.nr == __NR_execveat && i == 2);
    };
    for (int i = 0; i < 6 && (row->args[i].kind != ArgKind::NONE || execStrings(i)); i++) {
      const ValRule* rule = valRule(row->name, i);
      if (rule && rule->style == ValStyle::OPEN_MODE && (r.args[i - 1] & O_CREAT) == 0 &&
          (r.args[i - 1] & O_TMPFILE) != O_TMPFILE) {
        continue;  // strace shows open's mode only when the flags use it
      }
      text += count++ ? ", " : "";
      if (i == 1 && row->handler == HandlerId::IOCTL) {
        text += ioctlArgs(r);
        break;
      }
      if (i == 1 && row->handler == HandlerId::FCNTL) {
        text += fcntlArgs(r);
        break;
      }
      if (r.nr == __NR_execve && i == 1) {
        text += execArgs(r, 1, options_.stringLimit);
        break;
      }
      if (r.nr == __NR_execveat && i == 2) {
        text += execArgs(r, 2, options_.stringLimit) + ", " + valText(*row, 4, r);
        break;
      }
      if (r.nr == __NR_clone) {
        text += cloneArgs(r);
        break;
      }
      if (r.nr == __NR_socket) {
        text += socketArgs(r);
        break;
      }
      if ((r.nr == __NR_connect || r.nr == __NR_bind) && i == 1) {
        text += sockaddrText(r.payloads[1], r.args[1], options_.stringLimit);
        continue;
      }
      if (r.nr == __NR_prlimit64 && i == 1) {
        const char* resource = nameOf(r.args[1], RLIMITS);
        text += resource ? resource : std::to_string(r.args[1]);
        continue;
      }
      if (r.nr == __NR_prlimit64 && (i == 2 || i == 3)) {
        text += (i == 3 && r.failed()) ? pointer(r.args[3]) : rlimitText(r.payloads[i], r.args[i]);
        continue;
      }
      if (r.nr == __NR_getcwd && i == 0 && !r.failed() && r.payloads[0].present) {
        // strace shows the path without the NUL the result counts.
        TracePayload path = r.payloads[0];
        if (!path.data.empty() && path.data.back() == '\0' && path.length == path.data.size()) {
          path.data.pop_back();
          path.length--;
        }
        text += bufferText(path, r.args[0], SIZE_MAX);
        continue;
      }
      text += argText(*row, i, r, options_.stringLimit);
    }
  }
  text += ')';
  if (text.size() < 39) {
    text.append(39 - text.size(), ' ');
  }
  text += " = ";
  text += resultText(r, row ? row->name : nullptr);
  return text;
}

std::string TraceFormatter::line(const TraceRecord& r) {
  std::string out;
  if (options_.relative) {
    uint64_t delta = previousNs_ == 0 || r.startNs < previousNs_ ? 0 : r.startNs - previousNs_;
    out += fmt::format("{:>6}.{:06} ", delta / 1000000000, delta / 1000 % 1000000);
  }
  previousNs_ = r.startNs;
  if (options_.timestamps == 3) {
    out += fmt::format("{}.{:06} ", r.startNs / 1000000000, r.startNs / 1000 % 1000000);
  } else if (options_.timestamps > 0) {
    time_t t = time_t(r.startNs / 1000000000);
    struct tm tm;
    localtime_r(&t, &tm);
    out += fmt::format("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec);
    if (options_.timestamps == 2) {
      out += fmt::format(".{:06}", r.startNs / 1000 % 1000000);
    }
    out += ' ';
  }
  if (options_.prefix) {
    out +=
        fmt::format("[pid {} node {} {}] ", r.tid ? r.tid : r.pid, r.node, traceRouteName(r.route));
  }
  out += call(r);
  if (options_.durations) {
    out += fmt::format(" <{}>", seconds(r.totalUs));
    if (r.route == TraceRoute::FORWARDED) {
      out += fmt::format(" (home {}, transit {})", seconds(r.homeUs), seconds(r.transitUs));
    }
  }
  if (options_.stacks) {
    std::string frames = stackLines(r);
    frames.pop_back();  // the line itself ends without a newline
    out += "\n" + frames;
  }
  return out;
}

TraceFilter TraceFilter::parse(std::string_view spec) {
  if (spec.starts_with("trace=")) {
    spec.remove_prefix(6);
  }
  TraceFilter filter;
  if (spec.starts_with('!')) {
    filter.negate_ = true;
    spec.remove_prefix(1);
  }
  filter.all_ = false;
  uint32_t classes = 0;
  bool all = false;
  std::vector<std::string> names;
  while (!spec.empty()) {
    size_t comma = spec.find(',');
    std::string word(spec.substr(0, comma));
    spec.remove_prefix(comma == std::string_view::npos ? spec.size() : comma + 1);
    std::string bare = word.starts_with('%') ? word.substr(1) : word;
    if (bare == "all") {
      all = true;
    } else if (bare == "none") {
    } else if (bare == "file") {
      classes |= FILE;
    } else if (bare == "network" || bare == "net") {
      classes |= NETWORK;
    } else if (bare == "process") {
      classes |= PROC;
    } else if (bare == "signal") {
      classes |= SIGNAL;
    } else if (bare == "desc") {
      classes |= DESC;
    } else if (bare == "memory") {
      classes |= MEMORY;
    } else if (bare == "ipc") {
      classes |= IPC;
    } else if (bare == "clock") {
      classes |= TIME;
    } else {
      names.push_back(word);
    }
  }
  for (const SyscallEntry& row : syscallTable()) {
    if (all || (row.classes & classes) != 0) {
      filter.nrs_.insert(row.nr);
    }
  }
  for (const std::string& name : names) {
    auto table = syscallTable();
    auto it = std::find_if(table.begin(), table.end(),
                           [&](const SyscallEntry& row) { return name == row.name; });
    if (it == table.end()) {
      throw std::invalid_argument(fmt::format("invalid system call '{}'", name));
    }
    filter.nrs_.insert(it->nr);
  }
  return filter;
}

bool TraceFilter::wantsSyscall(int nr) const {
  if (all_) {
    return true;
  }
  return nrs_.contains(nr) != negate_;
}

bool TraceFilter::accepts(const TraceRecord& record) const {
  return wantsSyscall(record.nr) && (!failedOnly_ || record.failed());
}

std::vector<int32_t> TraceFilter::syscalls() const {
  if (all_) {
    return {};
  }
  std::vector<int32_t> out;
  for (const SyscallEntry& row : syscallTable()) {
    if (wantsSyscall(row.nr)) {
      out.push_back(row.nr);
    }
  }
  if (out.empty()) {
    out.push_back(-1);  // nothing: a number no call has, since empty means everything
  }
  return out;
}

void TraceSummary::add(const TraceRecord& r) {
  const SyscallEntry* row = findSyscall(r.nr);
  std::string name = row ? row->name : fmt::format("syscall_{:#x}", r.nr);
  for (Row* target : {&bySyscall_[name], &byRoute_[r.route]}) {
    target->calls++;
    target->errors += r.failed() ? 1 : 0;
    target->totalUs += r.totalUs;
    target->homeUs += r.homeUs;
    target->transitUs += r.transitUs;
  }
  calls_++;
}

std::string TraceSummary::render() const {
  std::vector<std::pair<std::string, Row>> rows(bySyscall_.begin(), bySyscall_.end());
  std::stable_sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) {
    return a.second.totalUs != b.second.totalUs ? a.second.totalUs > b.second.totalUs
                                                : a.second.calls > b.second.calls;
  });
  Row total;
  for (const auto& [name, row] : rows) {
    total.calls += row.calls;
    total.errors += row.errors;
    total.totalUs += row.totalUs;
  }
  const char* rule = "------ ----------- ----------- --------- --------- ----------------\n";
  std::string out = "% time     seconds  usecs/call     calls    errors syscall\n";
  out += rule;
  auto line = [&](const std::string& name, const Row& row) {
    double share = total.totalUs ? 100.0 * double(row.totalUs) / double(total.totalUs) : 0;
    std::string errors = row.errors ? std::to_string(row.errors) : "";
    return fmt::format("{:6.2f} {:>11} {:>11} {:>9} {:>9} {}\n", share, seconds(row.totalUs),
                       row.calls ? row.totalUs / row.calls : 0, row.calls, errors, name);
  };
  for (const auto& [name, row] : rows) {
    out += line(name, row);
  }
  out += rule;
  out += line("total", total);
  out +=
      "\nroute          calls    errors     seconds  usecs/call  home usecs/call  transit "
      "usecs/call\n";
  for (const auto& [route, row] : byRoute_) {
    uint64_t n = row.calls ? row.calls : 1;
    out += fmt::format("{:<10} {:>9} {:>9} {:>11} {:>11} {:>16} {:>19}\n", traceRouteName(route),
                       row.calls, row.errors, seconds(row.totalUs), row.totalUs / n, row.homeUs / n,
                       row.transitUs / n);
  }
  return out;
}

std::string stackLines(const TraceRecord& record) {
  if (record.stack.empty()) {
    return " > unexpected_backtracing_error [0x0]\n";
  }
  std::string out;
  for (const TraceFrame& f : record.stack) {
    std::string where = f.module.empty() ? "?" : f.module;
    if (f.symbol.empty()) {
      out += fmt::format(" > {}() [{:#x}]\n", where, f.ip);
    } else {
      out += fmt::format(" > {}({}+{:#x}) [{:#x}]\n", where, f.symbol, f.offset, f.ip);
    }
  }
  return out;
}

}  // namespace mos
