#pragma once
// The client side of a deputy's control socket (deputy/control.h): how `migrate` and the
// periodic checkpointer of `mosrun -C/-A` ask the deputy of a job whose user part runs on a remote
// node to move it home, to another node, or to write a checkpoint.

#include <sys/types.h>

#include <chrono>
#include <string>

namespace mos::migrate {

// True when process `pid` runs the deputy program (its /proc/PID/exe ends in "mos-deputy"): its
// user part is on a remote node.
bool isDeputyProcess(pid_t pid);

// Connects to RUN_DIR/control/PID, sends `line` and a newline, and returns the answer line
// without its newline ("refused: ...", "ok ...", "failed: ..."; "" when the deputy closed the
// connection without one, as when the job ended). `elapsed` receives the time from the request to
// the answer. Throws kj::Exception (FAILED) naming the socket path and errno when it cannot be
// reached (ENOENT: not a deputy of this node's run directory), or when no answer comes within
// `timeout`.
std::string askDeputy(const std::string& runDir, pid_t pid, const std::string& line,
                      std::chrono::seconds timeout, std::chrono::duration<double>& elapsed);

}  // namespace mos::migrate
