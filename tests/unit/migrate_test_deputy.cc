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

#include "image_io.h"
#include "migrate.h"

int main(int argc, char** argv) {
  std::string image;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--image") == 0) {
      image = argv[i + 1];
    }
  }
  if (image.empty()) {
    std::fprintf(stderr, "usage: migrate_test_deputy --image PATH\n");
    return 2;
  }
  try {
    auto reader = mos::migrate::readImageFile(image.c_str());
    ::unlink(image.c_str());
    mos::migrate::RestoreOptions options;
    options.dropPrivileges = false;
    options.keepAllFds = true;
    auto guest = mos::migrate::restore(
        reader->getRoot<mos::proto::MigrationImage>(),
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
