#pragma once
// The node's job registry: one small shared-mapped record per job, written by the process that
// serves the job and read by mosd (for mps and listGuests). Updating a record is a plain store to
// memory, so the forwarded-syscall hot path pays nothing for being observable.
//
// Layout on disk: RUN_DIR/jobs/<homePid>   records of jobs whose home is this node (deputies)
//                 RUN_DIR/guests/<pid>     records of guests supervised here (<pid>: supervisor)
// A record whose owner process is gone is stale; readers skip it and remove it.

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace mos {

enum class JobState : uint32_t { HOME = 0, MIGRATING = 1, REMOTE = 2, EXITED = 3 };

// Returns "home", "migrating", "remote" or "exited".
const char* jobStateName(JobState state);

// The shared record. Fixed layout (version 1), 4096 bytes on disk.
struct JobRecord {
  static constexpr uint32_t MAGIC = 0x534f4d55;  // "UMOS"
  uint32_t magic;
  uint32_t version;
  int32_t ownerPid;  // the process that keeps this record alive
  int32_t homePid;   // the job's pid on its home node
  uint32_t homeNode;
  std::atomic<uint32_t> node;      // where the user part runs now
  std::atomic<uint32_t> state;     // JobState
  std::atomic<int32_t> remotePid;  // the guest's pid on `node`, 0 at home
  std::atomic<uint64_t> syscalls;  // forwarded syscalls so far
  char command[64];                // NUL terminated
};

// A record this process owns, mapped shared. Moving only; unmaps (and, if asked, unlinks) on
// destruction.
class OwnedJobRecord {
 public:
  // Creates RUN_DIR/<kind>/<name> (kind is "jobs" or "guests"), creating directories as needed,
  // maps it and fills the constant fields. The descriptor is closed before returning, so the
  // record holds no fd of the job's table. Throws kj::Exception (FAILED) on I/O errors.
  static OwnedJobRecord create(const std::string& runDir, const char* kind, int32_t name,
                               int32_t homePid, uint32_t homeNode, const std::string& command);
  OwnedJobRecord() = default;
  OwnedJobRecord(OwnedJobRecord&& other) noexcept;
  OwnedJobRecord& operator=(OwnedJobRecord&& other) noexcept;
  ~OwnedJobRecord();

  // The mapped record; nullptr for a default-constructed (disabled) record.
  JobRecord* get() { return record_; }
  // Removes the file now (the mapping stays valid until destruction).
  void unlink();

 private:
  JobRecord* record_ = nullptr;
  std::string path_;
};

// mkdir -p: creates `path` and its missing parents (mode 0755). Throws kj::Exception (FAILED)
// naming the directory that could not be made.
void makeDirectories(const std::string& path);

// A copy of a record as read by mosd.
struct JobSnapshot {
  int32_t ownerPid;
  int32_t homePid;
  uint32_t homeNode;
  uint32_t node;
  JobState state;
  int32_t remotePid;
  uint64_t syscalls;
  std::string command;
};

// Reads every live record of RUN_DIR/<kind>, sorted by homePid; removes stale ones (owner gone,
// bad magic). A missing directory reads as empty.
std::vector<JobSnapshot> readJobRecords(const std::string& runDir, const char* kind);

}  // namespace mos
