// notify_rt N: the seccomp floor of a forwarded syscall. A child installs a filter that turns
// getppid(2) into a user notification (seccomp_unotify(2), SECCOMP_RET_USER_NOTIF) and sends the
// listener to its parent over a socketpair (SCM_RIGHTS, unix(7)); the parent, a supervisor in
// another process, answers each notification. The child times N getppid calls and prints the
// median round trip.

#include <linux/seccomp.h>
#include <seccomp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "stats.h"

namespace {

[[noreturn]] void fail(const char* what, int err) {
  std::fprintf(stderr, "notify_rt: %s: %s\n", what, std::strerror(err));
  std::exit(1);
}

void sendFd(int sock, int fd) {
  char data = 'F';
  iovec iov{&data, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
  if (sendmsg(sock, &msg, MSG_NOSIGNAL) != 1) {
    fail("sendmsg", errno);
  }
}

int receiveFd(int sock) {
  char data;
  iovec iov{&data, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1) {
    fail("recvmsg", errno);
  }
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  if (cmsg == nullptr || cmsg->cmsg_type != SCM_RIGHTS) {
    std::fprintf(stderr, "notify_rt: no descriptor received\n");
    std::exit(1);
  }
  int fd;
  std::memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
  return fd;
}

// The child: filter, hand over the listener, time the calls.
int runChild(int sock, long n) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (ctx == nullptr) {
    fail("seccomp_init", ENOMEM);
  }
  int rc = seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(getppid), 0);
  if (rc < 0) {
    fail("seccomp_rule_add", -rc);
  }
  if ((rc = seccomp_load(ctx)) < 0) {
    fail("seccomp_load", -rc);
  }
  int listener = seccomp_notify_fd(ctx);
  if (listener < 0) {
    fail("seccomp_notify_fd", -listener);
  }
  sendFd(sock, listener);
  close(listener);
  for (long i = 0; i < std::min(n, 200L); i++) {
    syscall(SYS_getppid);
  }
  std::vector<uint64_t> samples(size_t(n), 0);
  for (long i = 0; i < n; i++) {
    uint64_t t0 = mos::bench::nowNs();
    long r = syscall(SYS_getppid);
    samples[size_t(i)] = mos::bench::nowNs() - t0;
    if (r != 4242) {
      std::fprintf(stderr, "notify_rt: getppid answered %ld, not the supervisor's 4242\n", r);
      return 1;
    }
  }
  mos::bench::report("notify", samples);
  seccomp_release(ctx);
  return 0;
}

// The supervisor: answer every notification with 4242 until the child's filter is gone. Raw
// ioctls (seccomp_unotify(2)): libseccomp's notify helpers depend on API detection that this
// process, which never loaded a filter, has not done.
void supervise(int listener) {
  seccomp_notif req;
  seccomp_notif_resp resp;
  for (;;) {
    std::memset(&req, 0, sizeof(req));
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) {
      if (errno == EINTR) {
        continue;
      }
      break;  // ENOENT: no task uses the filter any more
    }
    std::memset(&resp, 0, sizeof(resp));
    resp.id = req.id;
    resp.val = 4242;
    // ENOENT here is routine: the child died between receive and respond.
    ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
  }
}

}  // namespace

int main(int argc, char** argv) {
  long n = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 10000;
  if (n <= 0) {
    std::fprintf(stderr, "usage: notify_rt [N > 0]\n");
    return 2;
  }
  int socks[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, socks) < 0) {
    fail("socketpair", errno);
  }
  pid_t child = fork();
  if (child < 0) {
    fail("fork", errno);
  }
  if (child == 0) {
    close(socks[0]);
    std::_Exit(runChild(socks[1], n));
  }
  close(socks[1]);
  int listener = receiveFd(socks[0]);
  // The supervisor loop ends when the child exits: receive fails once no filter user remains.
  // A thread could not do this job here: the point is a supervisor in another process.
  pid_t waiter = fork();
  if (waiter < 0) {
    fail("fork", errno);
  }
  if (waiter == 0) {
    supervise(listener);
    std::_Exit(0);
  }
  close(listener);
  int status = 0;
  waitpid(child, &status, 0);
  kill(waiter, SIGKILL);
  waitpid(waiter, nullptr, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
