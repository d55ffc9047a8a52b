// Checkpoint files: the migration stream of a running process written atomically to a file
// (`migrate PID checkpoint FILE`), and the periodic checkpointer of `mosrun -C FILE -A MINUTES`.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include <fmt/format.h>
#include <kj/debug.h>

#include "checkpoint.h"
#include "deputy_control.h"

namespace mos::migrate {

CaptureStats writeCheckpoint(pid_t pid, const std::string& file) {
  // The image goes to a temporary file beside FILE, renamed over it when complete: FILE is
  // either absent, the old checkpoint, or a complete new one.
  std::string tmp = fmt::format("{}.tmp.{}", file, getpid());
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    KJ_FAIL_REQUIRE("cannot create the checkpoint file", tmp, strerror(errno));
  }
  kj::AutoCloseFd owner(fd);
  KJ_ON_SCOPE_FAILURE(unlink(tmp.c_str()));
  CaptureStats stats;
  kj::FdOutputStream out(fd);
  kj::BufferedOutputStreamWrapper buffered(out);
  {
    SeizedProcess process(pid);
    stats = captureImage(pid, buffered);
  }  // detached: the process runs on while the rest of the file is flushed
  buffered.flush();
  KJ_SYSCALL(fsync(fd), tmp);
  KJ_SYSCALL(rename(tmp.c_str(), file.c_str()), tmp, file);
  return stats;
}

namespace {

// The checkpointer's life (a grandchild of the job, in its own session): wait until the job has
// exec'd (the gate's write end is close-on-exec in the job), then sleep `interval` on the job's
// pidfd, checkpoint, and again, until the job ends.
[[noreturn]] void runCheckpointer(pid_t job, int jobPidfd, int gate, const std::string& file,
                                  std::chrono::milliseconds interval, const std::string& runDir) {
  char byte;
  while (read(gate, &byte, 1) < 0 && errno == EINTR) {
  }
  close(gate);
  uint64_t written = 0;
  for (;;) {
    pollfd wait{jobPidfd, POLLIN, 0};
    int ready = poll(&wait, 1, static_cast<int>(interval.count()));
    if (ready < 0 && errno == EINTR) {
      continue;
    }
    if (ready != 0) {
      _exit(0);  // the job ended (or its pidfd failed): nothing more to checkpoint
    }
    try {
      if (isDeputyProcess(job)) {
        // Its user part runs on a node now (mosrun -r, or a migrate): the deputy has it streamed
        // home and writes the checkpoint, and the guest runs on (deputy/control.h).
        std::chrono::duration<double> elapsed{};
        std::string answer =
            askDeputy(runDir, job, "checkpoint " + file, std::chrono::seconds(600), elapsed);
        KJ_REQUIRE(answer.rfind("ok", 0) == 0, kj::str("its deputy answered: ", answer.c_str()));
      } else {
        writeCheckpoint(job, file);
      }
      written++;
    } catch (kj::Exception& e) {
      // The job goes on; so do the next attempts (a multi-threaded phase may pass).
      fmt::print(stderr, "mosrun: checkpoint {} of pid {} to {} failed: {}\n", written + 1, job,
                 file, e.getDescription().cStr());
    }
  }
}

}  // namespace

void startCheckpointer(const std::string& file, std::chrono::milliseconds interval,
                       const std::string& runDir) {
  KJ_REQUIRE(interval.count() > 0 && interval.count() <= INT32_MAX, "bad checkpoint interval",
             interval.count());
  pid_t job = getpid();
  int jobPidfd = static_cast<int>(::syscall(SYS_pidfd_open, job, 0));
  KJ_SYSCALL(jobPidfd, "pidfd_open");
  kj::AutoCloseFd pidfdOwner(jobPidfd);
  int gate[2];
  KJ_SYSCALL(pipe2(gate, O_CLOEXEC));
  kj::AutoCloseFd gateRead(gate[0]);
  // The write end stays open in the job until its exec (close-on-exec) or its exit.
  pid_t child = fork();
  KJ_SYSCALL(child, "fork");
  if (child == 0) {
    // Double fork: the checkpointer is never a child the job could wait for.
    if (fork() != 0) {
      _exit(0);
    }
    setsid();  // the terminal's signals (Ctrl-C, Ctrl-Z) are the job's, not the checkpointer's
    close(gate[1]);
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0) {
      dup2(devnull, 0);
      dup2(devnull, 1);
    }
    // Nothing of the job's but its standard error (for failure reports): a pipe the job
    // writes to must see EOF when the job ends, not when the checkpointer does.
    int low = kj::min(gate[0], jobPidfd), high = kj::max(gate[0], jobPidfd);
    ::syscall(SYS_close_range, 3, low - 1, 0);
    ::syscall(SYS_close_range, low + 1, high - 1, 0);
    ::syscall(SYS_close_range, high + 1, ~0u, 0);
    for (int sig : {SIGINT, SIGQUIT, SIGTSTP, SIGTTIN, SIGTTOU, SIGHUP, SIGPIPE}) {
      signal(sig, SIG_IGN);
    }
    runCheckpointer(job, jobPidfd, gate[0], file, interval, runDir);
  }
  int status;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
}

}  // namespace mos::migrate
