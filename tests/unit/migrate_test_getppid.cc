// A tiny program for libmigrate's restore tests: prints "getppid() getpid() getuid()".
#include <unistd.h>

#include <cstdio>

int main() {
  std::printf("%d %d %d\n", static_cast<int>(getppid()), static_cast<int>(getpid()),
              static_cast<int>(getuid()));
  return 0;
}
