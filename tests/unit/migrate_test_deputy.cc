// A stand-in deputy for libmigrate's Agent tests: `migrate_test_deputy --image PATH` reads the
// image, restores it here (the restored process keeps this process's fds), waits for it and
// exits with its status (128 + signal if it was killed).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#include <kj/exception.h>

#include <fcntl.h>

#include <cstdlib>

#include "checkpoint.h"
#include "migrate.h"

int main(int argc, char** argv) {
  std::string image;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--image") == 0) {
      image = argv[i + 1];
    }
  }
  // The agent passes the deputy's own arguments in UMOSIX_DEPUTY_ARGS, one per line; argv is
  // the job's own.
  if (const char* packed = std::getenv("UMOSIX_DEPUTY_ARGS")) {
    std::string args(packed);
    size_t at = args.find("--image\n");
    if (at != std::string::npos) {
      size_t start = at + 8;
      image = args.substr(start, args.find('\n', start) - start);
    }
  }
  if (image.empty()) {
    std::fprintf(stderr, "usage: migrate_test_deputy --image PATH\n");
    return 2;
  }
  try {
    int fd = ::open(image.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      std::fprintf(stderr, "migrate_test_deputy: %s: %s\n", image.c_str(), strerror(errno));
      return 124;
    }
    kj::AutoCloseFd owner(fd);
    ::unlink(image.c_str());
    kj::FdInputStream in(fd);
    mos::migrate::ImageReader reader(in);
    // Started by an agent, the deputy's argv is the job's own (ps at home shows the job).
    auto jobArgv = reader.header().getArgv();
    if (std::getenv("UMOSIX_DEPUTY_ARGS") != nullptr) {
      bool same = jobArgv.size() == static_cast<unsigned>(argc);
      for (int i = 0; same && i < argc; ++i) {
        same = std::string(reinterpret_cast<const char*>(jobArgv[i].begin()), jobArgv[i].size()) ==
               argv[i];
      }
      if (!same) {
        std::fprintf(stderr, "migrate_test_deputy: argv is not the job's\n");
        return 98;
      }
    }
    mos::migrate::RestoreOptions options;
    options.dropPrivileges = false;
    options.keepAllFds = true;
    auto guest = mos::migrate::restoreGuest(
        reader,
        [](mos::proto::FileRef::Reader ref) {
          return std::string(reinterpret_cast<const char*>(ref.getPath().begin()),
                             ref.getPath().size());
        },
        options);
    int status = 0;
    while (::waitpid(guest.pid, &status, 0) < 0) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  } catch (kj::Exception& e) {
    std::fprintf(stderr, "migrate_test_deputy: %s\n", e.getDescription().cStr());
    return 124;
  }
}
