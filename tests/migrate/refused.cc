// What cannot be checkpointed is refused, and the process keeps running unharmed: `refused DIR
// shared_file` has a shared writable file mapping.
// run.py checks migrate's exit status and message, and that no checkpoint file appears.
#include <fcntl.h>
#include <sys/mman.h>

#include "zdtm.h"

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  std::string mode = argc > 2 ? argv[2] : "";
  if (mode == "shared_file") {
    std::string path = zdtm::path("shared.bin");
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(ftruncate(fd, 4096) == 0);
    auto* p = static_cast<char*>(mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    CHECK(p != MAP_FAILED);
    strcpy(p, "shared");
    zdtm::ready();
    zdtm::waitGo();
    CHECK(strcmp(p, "shared") == 0);
  } else {
    printf("unknown mode '%s'\n", mode.c_str());
    return 2;
  }
  return zdtm::finish();
}
