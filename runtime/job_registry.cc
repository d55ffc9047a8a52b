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

const char* jobStateName(JobState state) {
  switch (state) {
    case JobState::HOME: return "home";
    case JobState::MIGRATING: return "migrating";
    case JobState::REMOTE: return "remote";
    case JobState::EXITED: return "exited";
  }
  return "unknown";
}

OwnedJobRecord OwnedJobRecord::create(const std::string& runDir, const char* kind, int32_t name,
                                      int32_t homePid, uint32_t homeNode,
                                      const std::string& command) {
  std::string dir = runDir + "/" + kind;
  makeDirectories(dir);
  OwnedJobRecord result;
  result.path_ = dir + "/" + std::to_string(name);
  int fd;
  KJ_SYSCALL(fd = open(result.path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644),
             result.path_);
  kj::AutoCloseFd owned(fd);
  KJ_SYSCALL(ftruncate(fd, RECORD_BYTES));
  void* p = mmap(nullptr, RECORD_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    KJ_FAIL_SYSCALL("mmap", errno, result.path_);
  }
  auto* record = new (p) JobRecord{};
  record->version = 1;
  record->ownerPid = getpid();
  record->homePid = homePid;
  record->homeNode = homeNode;
  record->node = homeNode;
  record->state = static_cast<uint32_t>(JobState::HOME);
  strncpy(record->command, command.c_str(), sizeof(record->command) - 1);
  std::atomic_thread_fence(std::memory_order_release);
  record->magic = JobRecord::MAGIC;
  result.record_ = record;
  return result;
}

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
                (kill(copy.ownerPid, 0) == 0 || errno == EPERM);
    if (!live) {
      ::unlink(path.c_str());
      continue;
    }
    copy.command[sizeof(copy.command) - 1] = '\0';
    result.push_back(JobSnapshot{copy.ownerPid, copy.homePid, copy.homeNode, copy.node.load(),
                                 static_cast<JobState>(copy.state.load()), copy.remotePid.load(),
                                 copy.syscalls.load(), copy.command});
  }
  closedir(d);
  std::sort(result.begin(), result.end(),
            [](const JobSnapshot& a, const JobSnapshot& b) { return a.homePid < b.homePid; });
  return result;
}

}  // namespace mos
