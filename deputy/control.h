#pragma once
// The deputy's control socket (docs/design.md, "Migration of a running process"): how
// `migrate PID home` reaches the deputy of job PID, whatever it is doing (waiting for its
// guest's next call, or blocked in a forwarded call such as a read of an empty pipe).
//
// RUN_DIR/control/<pid> is a listening Unix stream socket, close-on-exec and reserved (fds.h),
// with O_ASYNC and F_SETSIG(SIGURG) owned by the deputy's thread: a connection raises SIGURG
// with si_code POLL_IN and si_fd = the socket, which the deputy's handler tells apart from a
// job's signal (signals.h, takeControlRequest) and which interrupts what the deputy waits in, as
// a job signal would. The deputy then accepts, checks the peer (SO_PEERCRED: root or the job's
// own user) and reads one request line:
//
//   client -> deputy   "home\n"  |  "node ID ADDRESS PORT\n"  (to another remote node)
//                      |  "checkpoint /PATH\n"  (write the image to PATH, the guest runs on)
//   deputy -> client   "refused: WHY\n"    nothing changed, the job runs on where it was
//                      "ok PAGES INJECTED\n" | "failed: WHY\n"   from the migration agent, once
//                                          the job runs at home again (or could not)
//                      "ok node ID REMOTEPID BYTES\n"   the job runs on node ID (Deputy::relayMove)
//                      "ok checkpoint PAGES BYTES\n"   PATH written (Deputy::writeRemoteCheckpoint)
//
// The directory is made world-writable and sticky (like /tmp): deputies of every user of the
// node keep their sockets there.

#include <sys/types.h>

#include <string>

#include <kj/io.h>
#include <kj/memory.h>

#include "fds.h"

namespace mos::deputy {

class ControlSocket {
 public:
  // Creates RUN_DIR/control/<pid> (replacing a stale one) and listens on it, owned by the
  // calling thread. Returns nullptr (and logs why) when it cannot: the job then cannot be
  // moved home on request, and runs on.
  static kj::Own<ControlSocket> open(const std::string& runDir, pid_t pid, ReservedFds& fds);
  // Use open(). `fd` is a reserved descriptor (or -1), `path` its name.
  ControlSocket(ReservedFds& fds, int fd, std::string path);
  ~ControlSocket();
  KJ_DISALLOW_COPY(ControlSocket);

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

  struct Request {
    kj::AutoCloseFd connection;  // reserved, close-on-exec
    std::string command;         // the request line without its newline
  };
  // Accepts the next pending connection and reads its request (at most 1 s). A peer that is
  // neither root nor the job's user is answered "refused: ..." and dropped. nullptr when no
  // connection is pending.
  kj::Maybe<Request> accept();

  // Forgets the socket without removing its path (a fork child: the path is its parent's).
  void abandon();
  // Removes the path (the deputy is going away, or execs).
  void unlinkPath();

 private:
  ReservedFds& fds_;
  int fd_;
  std::string path_;
};

// Writes `line` and a newline to a control connection; errors are ignored.
void replyControl(int fd, const std::string& line);

}  // namespace mos::deputy
