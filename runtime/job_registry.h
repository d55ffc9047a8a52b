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

// One call the record's owner is executing now (mps -d: "calls in flight"). Written only by the
// thread that owns the slot, read by mosd without a lock: the writer clears `startNs`, writes
// the call, then sets `startNs` (release); a reader takes the call when `startNs` reads the same
// non-zero value before and after it (acquire). Slot 0 is the deputy's main thread.
struct CallSlot {
  std::atomic<uint64_t> startNs;  // CLOCK_REALTIME when the call began, ns; 0: the slot is idle
  std::atomic<int32_t> tid;       // the thread as the job sees it (home tid)
  std::atomic<int32_t> nr;        // x86-64 syscall number
  std::atomic<uint64_t> args[6];
};

// Calls of one route (the trace's routes: forwarded, emulated, localAnswer, denied).
struct RouteCounter {
  std::atomic<uint64_t> calls;
  std::atomic<uint64_t> totalUs;  // sum of the calls' latencies, microseconds
  std::atomic<uint64_t> maxUs;
};

// Inspection counters of the record's owner (mps -d; docs/design.md "Inspection"). Only the
// owner writes them, with relaxed atomics (no lock, no read-modify-write on the forwarded path);
// mosd reads them. A deputy (jobs/) counts what it executed at home; a supervisor (guests/)
// counts every trapped call by route, trap to answer, and its content cache.
struct JobStats {
  static constexpr int ROUTES = 4;      // forwarded, emulated, localAnswer, denied
  static constexpr int CALL_SLOTS = 8;  // threads of one process executing at home at once
  static constexpr int MAX_RESERVED = 8;
  std::atomic<uint64_t> sinceNs;                // CLOCK_REALTIME when the user part began to run at
                                                // `node` (ns since the epoch; 0: unknown)
  std::atomic<uint64_t> bytesIn;                // job-channel bytes received by the owner
  std::atomic<uint64_t> bytesOut;               // job-channel bytes sent by the owner
  RouteCounter routes[ROUTES];                  // deputy: routes[0] only, the time spent at home
  std::atomic<uint64_t> cacheHits;              // supervisor: files found in the content cache
  std::atomic<uint64_t> cacheMisses;            // supervisor: files fetched from home
  std::atomic<uint64_t> cacheBytes;             // supervisor: bytes fetched into the cache
  CallSlot inFlight[CALL_SLOTS];                // deputy: calls executing at home now
  std::atomic<int32_t> reserved[MAX_RESERVED];  // deputy: its own descriptors, -1 unused
  char stayReason[128];                         // why the job cannot migrate now; "" none known
};

// Records `us` in `counter` (single writer: plain loads and stores, no locked instructions).
void countCall(RouteCounter& counter, uint64_t us);

// The current CLOCK_REALTIME, ns since the epoch.
uint64_t realtimeNs();

// The owner's side of a CallSlot: the call `nr` with `args` of thread `tid` begins / ended.
void beginCall(CallSlot& slot, int32_t tid, int nr, const uint64_t (&args)[6]);
void endCall(CallSlot& slot);

// The stay reason a deputy leaves in its record when the node failed its start and the job runs
// on at home from its image (deputy.h, runOnAtHome): what `migrate` waits for tells it apart
// from an exec at home, during which the process is briefly not a deputy either.
inline constexpr const char* START_FAILED_REASON = "its node could not start it";

// Sets a record's stay reason ("" clears it); cut to 127 bytes.
void setStayReason(JobStats& stats, const std::string& reason);

// The shared record. Fixed layout (version 1), 4096 bytes on disk. `stats` came later: readers
// of records without it see zeros.
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
  JobStats stats;
  // Where the job's user part has been (`mps`: MOVES, `trail`), kept across the deputy
  // generations of one process (an exec at home, a move home and out again): node ids in
  // arrival order, the last TRAIL_SLOTS of them (entry i at trail[i % TRAIL_SLOTS]).
  static constexpr uint32_t TRAIL_SLOTS = 16;
  std::atomic<uint32_t> moves;        // arrivals on another node than the last one
  std::atomic<uint32_t> trailLength;  // arrivals recorded in all (the first is the start)
  std::atomic<uint32_t> trail[TRAIL_SLOTS];
  uint64_t ownerStart;  // the owner's start time (proc(5) stat field 22, clock ticks): with
                        // ownerPid, which process wrote the trail (pids are reused)
};

// Records that the user part of the job of `record` now runs on `node` (the home node id for
// home): appended to its trail and counted as a move unless it is where it was. Owner only.
void noteArrival(JobRecord* record, uint32_t node);

// A record this process owns, mapped shared. Moving only; unmaps (and, if asked, unlinks) on
// destruction.
class OwnedJobRecord {
 public:
  // Creates RUN_DIR/<kind>/<name> (kind is "jobs" or "guests"), creating directories as needed,
  // maps it and fills the constant fields. A record of the same process that was there (this
  // pid owned it: an earlier deputy of this process, before an exec or a move) passes on its
  // move count and trail; otherwise the trail starts at `homeNode`. The descriptor is closed before
  // returning, so the record holds no fd of the job's table. Throws kj::Exception (FAILED) on I/O
  // errors.
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
  uint32_t moves = 0;
  std::vector<uint32_t> trail;  // node ids, oldest first (at most JobRecord::TRAIL_SLOTS)
  std::string stay;             // the owner's stay reason (JobStats::stayReason), "" none
};

// A copy of one record's inspection counters and in-flight calls, as read by mosd.
struct CallSnapshot {
  uint64_t startNs;
  int32_t tid;
  int32_t nr;
  uint64_t args[6];
};
struct RouteSnapshot {
  uint64_t calls, totalUs, maxUs;
};
struct StatsSnapshot {
  uint64_t sinceNs = 0, bytesIn = 0, bytesOut = 0;
  RouteSnapshot routes[JobStats::ROUTES] = {};
  uint64_t cacheHits = 0, cacheMisses = 0, cacheBytes = 0;
  std::vector<CallSnapshot> inFlight;
  std::vector<int> reserved;
  std::string stayReason;
};

// Reads the live record RUN_DIR/<kind>/<name> (name: a deputy's pid for "jobs", a supervisor's
// pid for "guests"): false when it is missing or stale.
bool readJobRecord(const std::string& runDir, const char* kind, int32_t name, JobSnapshot& job,
                   StatsSnapshot& stats);

// Reads every live record of RUN_DIR/<kind>, sorted by homePid; removes stale ones (owner gone,
// bad magic). A missing directory reads as empty.
std::vector<JobSnapshot> readJobRecords(const std::string& runDir, const char* kind);

}  // namespace mos
