// execve(2): a missing path fails ENOENT, a non-executable file EACCES, and a successful exec
// runs the new program with the given argv and environment, keeps descriptors without
// FD_CLOEXEC and closes the others. The program re-executes itself (no fork): the second stage
// checks and its exit status is the test's.

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>

#include "check.h"

extern char** environ;

static int afterExec(int argc, char** argv) {
  // argv: exec --after-exec <kept fd> <closed fd> <tmp dir>
  CHECK(argc == 5);
  if (argc != 5) {
    return conf::finish();
  }
  const char* env = getenv("UMOSIX_EXEC_TEST");
  CHECK(env != nullptr && std::string(env) == "kept value");
  int kept = atoi(argv[2]), closed = atoi(argv[3]);
  CHECK(fcntl(kept, F_GETFD) == 0);
  CHECK_FAILS(fcntl(closed, F_GETFD), EBADF);
  char buf[8] = {};
  CHECK(pread(kept, buf, 5, 0) == 5 && std::string(buf) == "exec!");
  std::string dir = argv[4];
  unlink((dir + "/data").c_str());
  rmdir(dir.c_str());
  return conf::failures ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--after-exec") {
    return afterExec(argc, argv);
  }
  char* const noArgs[] = {const_cast<char*>("none"), nullptr};
  CHECK_FAILS(execve(conf::tmpPath("missing").c_str(), noArgs, environ), ENOENT);
  std::string plain = conf::tmpPath("plain");
  int pf = open(plain.c_str(), O_CREAT | O_WRONLY, 0644);
  CHECK(pf >= 0);
  close(pf);
  CHECK_FAILS(execve(plain.c_str(), noArgs, environ), EACCES);
  CHECK_FAILS(execve(conf::tmpDir().c_str(), noArgs, environ), EACCES);
  unlink(plain.c_str());

  std::string data = conf::tmpPath("data");
  int kept = open(data.c_str(), O_CREAT | O_RDWR, 0600);
  int closed = open(data.c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(kept >= 0 && closed >= 0);
  CHECK(write(kept, "exec!", 5) == 5);
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  CHECK(n > 0);
  if (conf::failures > 0 || n <= 0) {
    return conf::finish();
  }
  self[n] = 0;
  std::string keptS = std::to_string(kept), closedS = std::to_string(closed);
  std::string dir = conf::tmpDir();
  char* const args[] = {argv[0],      const_cast<char*>("--after-exec"),
                        keptS.data(), closedS.data(),
                        dir.data(),   nullptr};
  char envVar[] = "UMOSIX_EXEC_TEST=kept value";
  char* const env[] = {envVar, nullptr};
  execve(self, args, env);
  printf("execve %s: %s\n", self, strerror(errno));
  ++conf::failures;
  return conf::finish();
}
