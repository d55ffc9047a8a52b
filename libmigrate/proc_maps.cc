#include "proc_maps.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <sstream>

#include <kj/debug.h>
#include <kj/io.h>

namespace mos::migrate {

std::string readProcFile(const std::string& path) {
  int fd;
  KJ_SYSCALL(fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC), path);
  kj::AutoCloseFd owner(fd);
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t n;
    KJ_SYSCALL(n = ::read(fd, buf, sizeof(buf)), path);
    if (n == 0) {
      return out;
    }
    out.append(buf, n);
  }
}

std::vector<MapsEntry> readMaps(pid_t pid) {
  std::string text = readProcFile("/proc/" + std::to_string(pid) + "/maps");
  std::vector<MapsEntry> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) {
      continue;
    }
    MapsEntry e;
    char perms[8] = {};
    int consumed = 0;
    int n = std::sscanf(line.c_str(), "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %x:%x %" SCNu64 "%n",
                        &e.start, &e.end, perms, &e.offset, &e.devMajor, &e.devMinor, &e.inode,
                        &consumed);
    KJ_REQUIRE(n == 7, "unparsable /proc/PID/maps line", pid, line);
    e.prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
             (perms[2] == 'x' ? PROT_EXEC : 0);
    e.shared = perms[3] == 's';
    size_t p = consumed;
    while (p < line.size() && line[p] == ' ') {
      ++p;
    }
    e.path = line.substr(p);
    out.push_back(std::move(e));
  }
  return out;
}

VdsoLayout vdsoLayout(const std::vector<MapsEntry>& maps) {
  VdsoLayout l;
  uint64_t low = ~0ull;
  for (const MapsEntry& e : maps) {
    if (e.path == "[vdso]") {
      l.vdsoStart = e.start;
      l.vdsoSize = e.end - e.start;
      low = std::min(low, e.start);
    } else if (e.path == "[vvar]" || e.path == "[vvar_vclock]") {
      low = std::min(low, e.start);
    }
  }
  l.areaStart = l.present() ? low : 0;
  return l;
}

}  // namespace mos::migrate
