#include "control.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <kj/debug.h>
#include <spdlog/spdlog.h>

#include "signals.h"

namespace mos::deputy {

namespace {

// O_ASYNC on the socket, signalled as SIGURG to this thread (F_SETSIG, F_SETOWN_EX). Redone on a
// new number when the socket moves: the kernel reports the number O_ASYNC was set with (si_fd).
bool armAsync(int fd) {
  struct f_owner_ex owner = {F_OWNER_TID, static_cast<pid_t>(gettid())};
  if (fcntl(fd, F_SETOWN_EX, &owner) < 0 || fcntl(fd, F_SETSIG, SIGURG) < 0 ||
      fcntl(fd, F_SETFL, O_NONBLOCK) < 0 || fcntl(fd, F_SETFL, O_NONBLOCK | O_ASYNC) < 0) {
    return false;
  }
  setControlFd(fd);
  return true;
}

}  // namespace

void replyControl(int fd, const std::string& line) {
  std::string text = line + "\n";
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = send(fd, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      return;
    }
    done += n;
  }
}

ControlSocket::ControlSocket(ReservedFds& fds, int fd, std::string path)
    : fds_(fds), fd_(fd), path_(std::move(path)) {}

kj::Own<ControlSocket> ControlSocket::open(const std::string& runDir, pid_t pid, ReservedFds& fds) {
  std::string dir = runDir + "/control";
  if (mkdir(dir.c_str(), 01777) == 0) {
    chmod(dir.c_str(), 01777);  // not narrowed by our umask
  }
  std::string path = dir + "/" + std::to_string(pid);
  struct sockaddr_un address = {};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof(address.sun_path)) {
    spdlog::warn("no control socket for job {}: {} is too long", pid, path);
    return kj::Own<ControlSocket>();
  }
  memcpy(address.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    spdlog::warn("no control socket for job {}: {}", pid, strerror(errno));
    return kj::Own<ControlSocket>();
  }
  unlink(path.c_str());  // a stale one of an earlier process with our pid
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) < 0 ||
      chmod(path.c_str(), 0666) < 0 || listen(fd, 4) < 0) {
    spdlog::warn("no control socket for job {} at {}: {}", pid, path, strerror(errno));
    close(fd);
    unlink(path.c_str());
    return kj::Own<ControlSocket>();
  }
  auto self = kj::heap<ControlSocket>(fds, -1, path);
  try {
    ControlSocket* s = self.get();
    self->fd_ = fds.moveHigh(fd, [s](int oldFd, int newFd) {
      close(oldFd);
      s->fd_ = newFd;
      armAsync(newFd);
    });
  } catch (kj::Exception& e) {
    spdlog::warn("no control socket for job {}: {}", pid, e.getDescription().cStr());
    close(fd);
    unlink(path.c_str());
    self->path_.clear();
    return kj::Own<ControlSocket>();
  }
  if (!armAsync(self->fd_)) {
    spdlog::warn("no control socket for job {}: O_ASYNC: {}", pid, strerror(errno));
    unlink(path.c_str());
    self->path_.clear();
    return kj::Own<ControlSocket>();  // the destructor closes it
  }
  return self;
}

ControlSocket::~ControlSocket() {
  if (fd_ >= 0) {
    setControlFd(-1);
    fds_.remove(fd_);
    close(fd_);
  }
}

void ControlSocket::abandon() { path_.clear(); }

void ControlSocket::unlinkPath() {
  if (!path_.empty()) {
    unlink(path_.c_str());
    path_.clear();
  }
}

kj::Maybe<ControlSocket::Request> ControlSocket::accept() {
  int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
  if (c < 0) {
    return nullptr;
  }
  kj::AutoCloseFd connection;
  try {
    connection = kj::AutoCloseFd(fds_.moveHigh(c));
  } catch (kj::Exception& e) {
    close(c);
    return nullptr;
  }
  int fd = connection.get();
  struct ucred peer = {};
  socklen_t length = sizeof(peer);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &length) < 0 ||
      (peer.uid != 0 && peer.uid != getuid() && peer.uid != geteuid())) {
    replyControl(fd, "refused: only root or the job's owner may move it");
    fds_.remove(fd);
    return nullptr;
  }
  // The request line follows the connection at once: wait for it at most 1 s.
  std::string line;
  for (int rounds = 0; rounds < 100 && line.find('\n') == std::string::npos; rounds++) {
    struct pollfd pfd = {fd, POLLIN, 0};
    if (poll(&pfd, 1, 10) <= 0) {
      continue;
    }
    char buffer[128];
    ssize_t n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n <= 0) {
      break;
    }
    line.append(buffer, n);
    if (line.size() > 1024) {
      break;
    }
  }
  size_t end = line.find('\n');
  if (end == std::string::npos) {
    replyControl(fd, "refused: no request");
    fds_.remove(fd);
    return nullptr;
  }
  line.resize(end);
  Request request;
  request.connection = kj::mv(connection);
  request.command = line;
  return kj::mv(request);
}

}  // namespace mos::deputy
