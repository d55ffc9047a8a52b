#include "deputy_control.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include <fmt/format.h>
#include <kj/debug.h>
#include <kj/io.h>

namespace mos::migrate {

bool isDeputyProcess(pid_t pid) {
  char buffer[PATH_MAX];
  ssize_t n = readlink(fmt::format("/proc/{}/exe", pid).c_str(), buffer, sizeof(buffer));
  std::string exe = n < 0 ? std::string() : std::string(buffer, n);
  return exe.size() >= 10 && exe.compare(exe.size() - 10, 10, "mos-deputy") == 0;
}

std::string askDeputy(const std::string& runDir, pid_t pid, const std::string& line,
                      std::chrono::seconds timeout, std::chrono::duration<double>& elapsed) {
  std::string path = fmt::format("{}/control/{}", runDir, pid);
  struct sockaddr_un address = {};
  address.sun_family = AF_UNIX;
  KJ_REQUIRE(path.size() < sizeof(address.sun_path),
             kj::str("the control socket path ", path.c_str(), " is too long"));
  memcpy(address.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  KJ_REQUIRE(fd >= 0, kj::str("socket: ", strerror(errno)));
  kj::AutoCloseFd owner(fd);
  KJ_REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0,
             kj::str("cannot reach the deputy of pid ", pid, " at ", path.c_str(), ": ",
                     strerror(errno), " (is UMOSIX_RUN_DIR the one of its home node?)"));
  auto started = std::chrono::steady_clock::now();
  std::string request = line + "\n";
  KJ_REQUIRE(send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
                 static_cast<ssize_t>(request.size()),
             kj::str("cannot ask the deputy of pid ", pid, ": ", strerror(errno)));
  // The answer: one line from the deputy (refused, ok) or from the migration agent (ok, failed).
  std::string answer;
  auto deadline = started + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    KJ_REQUIRE(left > 0,
               kj::str("no answer from the deputy of pid ", pid, " within ", timeout.count(),
                       " s (is the job stopped?); the request may "
                       "still be carried out"));
    struct pollfd pfd = {fd, POLLIN, 0};
    int n = poll(&pfd, 1, static_cast<int>(std::min<long>(left, 1000)));
    if (n <= 0) {
      continue;  // EINTR, or not yet
    }
    char buffer[512];
    ssize_t got = read(fd, buffer, sizeof(buffer));
    if (got < 0 && errno == EINTR) {
      continue;
    }
    if (got <= 0) {
      break;
    }
    answer.append(buffer, got);
    if (answer.find('\n') != std::string::npos) {
      break;
    }
  }
  while (!answer.empty() && (answer.back() == '\n' || answer.back() == '\r')) {
    answer.pop_back();
  }
  elapsed = std::chrono::steady_clock::now() - started;
  return answer;
}

}  // namespace mos::migrate
