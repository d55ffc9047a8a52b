#pragma once
// A live move of a guest off this node (issue 8; docs/design.md, "Migration of a running
// process"): the supervisor stops the guest and captures it with libmigrate into a migration
// stream, which its task sends over the job channel. Only the thread that traces the guests (the
// GuestFamily's main thread) runs it.
//
// The session:
//   1. PTRACE_SEIZE (TRACESYSGOOD), PTRACE_INTERRUPT; when the guest waits in a received
//      notification, answer it -ERESTARTNOINTR now: it leaves the call and stops on its way out
//      with the call set to restart, so the call is issued again wherever the guest resumes
//      (libmigrate's capture turns the restart code into a re-issue). A signal delivered before
//      the stop runs its handler here first, as for a checkpoint (SeizedProcess).
//   2. At the interrupt stop: PTRACE_O_SUSPEND_SECCOMP (libmigrate's injected calls must not be
//      notified to us, who inject them), then captureImage() into the sink; the header is
//      edited first (content-cache paths to home paths) and may refuse.
//   3. The guest stays stopped and traced until finishMove(): killed (the move committed) or
//      detached to run on here, re-issuing its call (the move was aborted).
//
// Sources: ptrace(2) (PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_O_SUSPEND_SECCOMP), CRIU's dump
// (seize, then dump), libmigrate checkpoint.h.

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <kj/common.h>
#include <kj/io.h>

#include "guest_signal.h"  // InjectHost
#include "migration.capnp.h"

namespace mos::remote {

enum class MoveOutcome {
  DONE,     // the stream was written; the guest is stopped and traced (finishMove)
  BUSY,     // a notification of the guest waits unanswered in its task: nothing done
  GONE,     // the guest ended meanwhile (its status was routed by `wait`)
  REFUSED,  // not movable (reason); nothing changed, the guest runs on
};

struct MoveResult {
  MoveOutcome outcome = MoveOutcome::REFUSED;
  std::string reason;  // REFUSED: one readable sentence
  uint64_t pages = 0;  // DONE: pages in the stream
};

struct MoveRequest {
  pid_t pid = -1;                // the guest, a pid of this node
  kj::Maybe<uint64_t> answerId;  // the notification the guest waits in, answered on the way
  // The guest's other threads (node tids), each seized and interrupted like the leader, and the
  // notifications they wait in (their tasks parked: GuestFamily), each answered -ERESTARTNOINTR
  // once every thread has been interrupted, so each call is issued again where the process
  // resumes.
  std::vector<pid_t> threads;
  std::vector<uint64_t> threadAnswers;
  kj::OutputStream* sink = nullptr;
  std::function<void(proto::ImageHeader::Builder)> editHeader;
};

// Runs steps 1 and 2 on `request.pid` and its `request.threads` (every thread of the process
// must be listed: captureImage refuses a thread that is not stopped). The caller is the guest's
// tracer from now on (ptrace is per thread) and nothing else may wait for the guest meanwhile.
// `host.send` answers the notifications, `host.wait` waits for a thread. Not DONE: every
// thread runs on, and every notification given was answered.
MoveResult captureForMove(const MoveRequest& request, const InjectHost& host);

// Step 3: `commit` kills the captured guest and reaps each of its `threads` (node tids, not the
// leader: traced threads are reaped by their tracer) and then the leader with `host.wait`;
// otherwise lets them run on (the filter applies again, PTRACE_DETACH, the leader last).
void finishMove(pid_t pid, const std::vector<pid_t>& threads, bool commit, const InjectHost& host);

// The home identity of a file of the content cache, from its name (FileCache::keyOf:
// "n<home>-<dev hex>-<ino>-<size>-<mtimeNs>"); false when `name` is not such a name.
struct CacheKey {
  uint32_t homeNode = 0;
  uint64_t dev = 0, ino = 0, size = 0;
  int64_t mtimeNs = 0;
};
bool parseCacheKey(const std::string& name, CacheKey& key);

}  // namespace mos::remote
