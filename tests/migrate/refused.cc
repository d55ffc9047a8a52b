// What cannot be checkpointed is refused, and the process keeps running unharmed: `refused DIR
// thread` has a second thread, `refused DIR shared_file` a shared writable file mapping.
// run.py checks migrate's exit status and message, and that no checkpoint file appears.
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>

#include "zdtm.h"

static void* waiter(void*) {
  zdtm::waitGo();
  return reinterpret_cast<void*>(42);
}

int main(int argc, char** argv) {
  zdtm::init(argc, argv);
  std::string mode = argc > 2 ? argv[2] : "";
  if (mode == "thread") {
    pthread_t t;
    CHECK(pthread_create(&t, nullptr, waiter, nullptr) == 0);
    zdtm::ready();
    void* result = nullptr;
    CHECK(pthread_join(t, &result) == 0);
    CHECK(result == reinterpret_cast<void*>(42));
  } else if (mode == "shared_file") {
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
