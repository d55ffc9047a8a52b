#include "job_registry.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>

#include <kj/debug.h>
#include <kj/io.h>

namespace mos {

namespace {
constexpr size_t RECORD_BYTES = 4096;
static_assert(sizeof(JobRecord) <= RECORD_BYTES);

}  // namespace

void makeDirectories(const std::string& path) {
  for (size_t i = 1; i <= path.size(); i++) {
    if (i == path.size() || path[i] == '/') {
      std::string prefix = path.substr(0, i);
      if (mkdir(prefix.c_str(), 0755) < 0 && errno != EEXIST) {
        KJ_FAIL_SYSCALL("mkdir", errno, prefix);
      }
    }
  }
}

void countCall(RouteCounter& counter, uint64_t us) {
  counter.calls.store(counter.calls.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  counter.totalUs.store(counter.totalUs.load(std::memory_order_relaxed) + us,
                        std::memory_order_relaxed);
  if (us > counter.maxUs.load(std::memory_order_relaxed)) {
    counter.maxUs.store(us, std::memory_order_relaxed);
  }
}

uint64_t realtimeNs() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void beginCall(CallSlot& slot, int32_t tid, int nr, const uint64_t (&args)[6]) {
  slot.startNs.store(0, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  slot.tid.store(tid, std::memory_order_relaxed);
  slot.nr.store(nr, std::memory_order_relaxed);
  for (int i = 0; i < 6; i++) {
    slot.args[i].store(args[i], std::memory_order_relaxed);
  }
  slot.startNs.store(realtimeNs(), std::memory_order_release);
}

void endCall(CallSlot& slot) { slot.startNs.store(0, std::memory_order_release); }

void setStayReason(JobStats& stats, const std::string& reason) {
  size_t n = std::min(reason.size(), sizeof(stats.stayReason) - 1);
  memset(stats.stayReason, 0, sizeof(stats.stayReason));
  memcpy(stats.stayReason, reason.data(), n);
}

const char* jobStateName(JobState state) {
  switch (state) {
    case JobState::HOME: return "home";
    case JobState::MIGRATING: return "migrating";
    case JobState::REMOTE: return "remote";
    case JobState::EXITED: return "exited";
  }
  return "unknown";
}

namespace {

// The start time of process `pid` (0: this one), clock ticks after boot (proc(5): stat field
// 22); 0 when it cannot be read.
uint64_t startTimeOf(pid_t pid) {
  char buf[1024];
  std::string path = pid == 0 ? "/proc/self/stat" : "/proc/" + std::to_string(pid) + "/stat";
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return 0;
  }
  ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) {
    return 0;
  }
  buf[n] = '\0';
  const char* p = strrchr(buf, ')');
  if (p == nullptr) {
    return 0;
  }
  // Fields 3.. follow the command; field 22 is the 20th of them.
  unsigned long long value = 0;
  for (int field = 3; field <= 22 && p != nullptr; field++) {
    p = strchr(p + 1, ' ');
    if (p != nullptr && field == 22) {
      value = strtoull(p + 1, nullptr, 10);
    }
  }
  return value;
}

uint64_t ownStartTime() { return startTimeOf(0); }

// True when the process that wrote `record` is still alive: its pid exists and, when the record
// knows it, started when the writer did (pids are reused: a record left by a process that is
// gone would otherwise look alive when another process gets its pid).
bool ownerAlive(const JobRecord& record) {
  if (kill(record.ownerPid, 0) != 0 && errno != EPERM) {
    return false;
  }
  return record.ownerStart == 0 || record.ownerStart == startTimeOf(record.ownerPid);
}

}  // namespace

OwnedJobRecord OwnedJobRecord::create(const std::string& runDir, const char* kind, int32_t name,
                                      int32_t homePid, uint32_t homeNode,
                                      const std::string& command) {
  std::string dir = runDir + "/" + kind;
  makeDirectories(dir);
  OwnedJobRecord result;
  result.path_ = dir + "/" + std::to_string(name);
  // The trail of an earlier record of this very process (same owner pid and home pid).
  uint32_t moves = 0, trailLength = 0;
  uint32_t trail[JobRecord::TRAIL_SLOTS] = {};
  {
    int oldFd = open(result.path_.c_str(), O_RDONLY | O_CLOEXEC);
    JobRecord old;
    if (oldFd >= 0 && pread(oldFd, &old, sizeof(old), 0) == static_cast<ssize_t>(sizeof(old)) &&
        old.magic == JobRecord::MAGIC && old.ownerPid == getpid() && old.homePid == homePid &&
        old.ownerStart == ownStartTime()) {
      moves = old.moves.load();
      trailLength = old.trailLength.load();
      for (uint32_t i = 0; i < JobRecord::TRAIL_SLOTS; i++) {
        trail[i] = old.trail[i].load();
      }
    }
    if (oldFd >= 0) {
      close(oldFd);
    }
  }
  // Made whole under a hidden name, then renamed over the record: a reader (mosd, migrate)
  // never maps a file shorter than a record (SIGBUS) nor one half written. Hidden names are
  // skipped by readJobRecords.
  std::string fresh = dir + "/." + std::to_string(name) + ".new";
  int fd;
  KJ_SYSCALL(fd = open(fresh.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644), fresh);
  kj::AutoCloseFd owned(fd);
  KJ_SYSCALL(ftruncate(fd, RECORD_BYTES));
  void* p = mmap(nullptr, RECORD_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    KJ_FAIL_SYSCALL("mmap", errno, result.path_);
  }
  auto* record = new (p) JobRecord{};
  record->version = 1;
  record->ownerPid = getpid();
  record->ownerStart = ownStartTime();
  record->homePid = homePid;
  record->homeNode = homeNode;
  record->node = homeNode;
  record->state = static_cast<uint32_t>(JobState::HOME);
  strncpy(record->command, command.c_str(), sizeof(record->command) - 1);
  record->stats.sinceNs = realtimeNs();
  for (auto& fd : record->stats.reserved) {
    fd = -1;
  }
  if (trailLength > 0) {
    record->moves = moves;
    record->trailLength = trailLength;
    for (uint32_t i = 0; i < JobRecord::TRAIL_SLOTS; i++) {
      record->trail[i] = trail[i];
    }
  } else {
    noteArrival(record, homeNode);
  }
  std::atomic_thread_fence(std::memory_order_release);
  record->magic = JobRecord::MAGIC;
  result.record_ = record;
  KJ_SYSCALL(rename(fresh.c_str(), result.path_.c_str()), fresh, result.path_);
  return result;
}

void noteArrival(JobRecord* record, uint32_t node) {
  uint32_t length = record->trailLength.load(std::memory_order_relaxed);
  if (length > 0 && record->trail[(length - 1) % JobRecord::TRAIL_SLOTS].load(
                        std::memory_order_relaxed) == node) {
    return;
  }
  if (length > 0) {
    record->moves.fetch_add(1, std::memory_order_relaxed);
  }
  record->trail[length % JobRecord::TRAIL_SLOTS].store(node, std::memory_order_relaxed);
  record->trailLength.store(length + 1, std::memory_order_release);
}

namespace {

// The trail of `record`, oldest first.
std::vector<uint32_t> trailOf(const JobRecord& record) {
  uint32_t length = record.trailLength.load(std::memory_order_acquire);
  uint32_t first = length > JobRecord::TRAIL_SLOTS ? length - JobRecord::TRAIL_SLOTS : 0;
  std::vector<uint32_t> out;
  for (uint32_t i = first; i < length; i++) {
    out.push_back(record.trail[i % JobRecord::TRAIL_SLOTS].load(std::memory_order_relaxed));
  }
  return out;
}

// The stay reason of `stats` (NUL-terminated within its array, or cut there).
std::string stayOf(const JobStats& stats) {
  return std::string(stats.stayReason, strnlen(stats.stayReason, sizeof(stats.stayReason)));
}

}  // namespace

OwnedJobRecord::OwnedJobRecord(OwnedJobRecord&& other) noexcept
    : record_(other.record_), path_(std::move(other.path_)) {
  other.record_ = nullptr;
  other.path_.clear();
}

OwnedJobRecord& OwnedJobRecord::operator=(OwnedJobRecord&& other) noexcept {
  std::swap(record_, other.record_);
  std::swap(path_, other.path_);
  return *this;
}

OwnedJobRecord::~OwnedJobRecord() {
  if (record_ != nullptr) {
    munmap(record_, RECORD_BYTES);
  }
}

void OwnedJobRecord::unlink() {
  if (!path_.empty()) {
    ::unlink(path_.c_str());
  }
}

std::vector<JobSnapshot> readJobRecords(const std::string& runDir, const char* kind) {
  std::vector<JobSnapshot> result;
  std::string dir = runDir + "/" + kind;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    return result;
  }
  while (dirent* entry = readdir(d)) {
    if (entry->d_name[0] == '.') {
      continue;
    }
    std::string path = dir + "/" + entry->d_name;
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      continue;
    }
    JobRecord copy;
    ssize_t n = pread(fd, &copy, sizeof(copy), 0);
    close(fd);
    bool live = n == static_cast<ssize_t>(sizeof(copy)) && copy.magic == JobRecord::MAGIC &&
                ownerAlive(copy);
    if (!live) {
      ::unlink(path.c_str());
      continue;
    }
    copy.command[sizeof(copy.command) - 1] = '\0';
    result.push_back(JobSnapshot{copy.ownerPid, copy.homePid, copy.homeNode, copy.node.load(),
                                 static_cast<JobState>(copy.state.load()), copy.remotePid.load(),
                                 copy.syscalls.load(), copy.command, copy.moves.load(),
                                 trailOf(copy), stayOf(copy.stats)});
  }
  closedir(d);
  std::sort(result.begin(), result.end(),
            [](const JobSnapshot& a, const JobSnapshot& b) { return a.homePid < b.homePid; });
  return result;
}

namespace {

StatsSnapshot snapshotStats(const JobStats& stats) {
  StatsSnapshot out;
  out.sinceNs = stats.sinceNs.load(std::memory_order_relaxed);
  out.bytesIn = stats.bytesIn.load(std::memory_order_relaxed);
  out.bytesOut = stats.bytesOut.load(std::memory_order_relaxed);
  for (int i = 0; i < JobStats::ROUTES; i++) {
    out.routes[i] = RouteSnapshot{stats.routes[i].calls.load(std::memory_order_relaxed),
                                  stats.routes[i].totalUs.load(std::memory_order_relaxed),
                                  stats.routes[i].maxUs.load(std::memory_order_relaxed)};
  }
  out.cacheHits = stats.cacheHits.load(std::memory_order_relaxed);
  out.cacheMisses = stats.cacheMisses.load(std::memory_order_relaxed);
  out.cacheBytes = stats.cacheBytes.load(std::memory_order_relaxed);
  for (const CallSlot& slot : stats.inFlight) {
    uint64_t before = slot.startNs.load(std::memory_order_acquire);
    if (before == 0) {
      continue;
    }
    CallSnapshot call{before,
                      slot.tid.load(std::memory_order_relaxed),
                      slot.nr.load(std::memory_order_relaxed),
                      {}};
    for (int i = 0; i < 6; i++) {
      call.args[i] = slot.args[i].load(std::memory_order_relaxed);
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    if (slot.startNs.load(std::memory_order_relaxed) == before) {
      out.inFlight.push_back(call);
    }
  }
  for (const auto& fd : stats.reserved) {
    int n = fd.load(std::memory_order_relaxed);
    if (n >= 0) {
      out.reserved.push_back(n);
    }
  }
  char reason[sizeof(stats.stayReason)];
  memcpy(reason, stats.stayReason, sizeof(reason));
  reason[sizeof(reason) - 1] = '\0';
  out.stayReason = reason;
  return out;
}

}  // namespace

bool readJobRecord(const std::string& runDir, const char* kind, int32_t name, JobSnapshot& job,
                   StatsSnapshot& stats) {
  std::string path = runDir + "/" + kind + "/" + std::to_string(name);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return false;
  }
  // Mapped, not read: the in-flight slots must be read in the order their protocol says. Only a
  // whole record is mapped (a shorter file would fault past its end: SIGBUS).
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(RECORD_BYTES)) {
    close(fd);
    return false;
  }
  void* p = mmap(nullptr, RECORD_BYTES, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    return false;
  }
  KJ_DEFER(munmap(p, RECORD_BYTES));
  const auto* record = static_cast<const JobRecord*>(p);
  if (record->magic != JobRecord::MAGIC || !ownerAlive(*record)) {
    return false;
  }
  char command[sizeof(record->command)];
  memcpy(command, record->command, sizeof(command));
  command[sizeof(command) - 1] = '\0';
  job = JobSnapshot{record->ownerPid,
                    record->homePid,
                    record->homeNode,
                    record->node.load(),
                    static_cast<JobState>(record->state.load()),
                    record->remotePid.load(),
                    record->syscalls.load(),
                    command,
                    record->moves.load(),
                    trailOf(*record),
                    stayOf(record->stats)};
  stats = snapshotStats(record->stats);
  return true;
}

}  // namespace mos
