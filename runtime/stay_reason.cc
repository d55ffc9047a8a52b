#include "stay_reason.h"

#include <algorithm>
#include <set>
#include <sstream>

#include <fmt/format.h>

namespace mos {

std::vector<SharedMapping> sharedMappings(std::string_view maps, std::string_view shmDirMark) {
  std::vector<SharedMapping> result;
  std::set<std::pair<uint64_t, uint64_t>> seen;
  size_t at = 0;
  while (at < maps.size()) {
    size_t end = maps.find('\n', at);
    if (end == std::string_view::npos) {
      end = maps.size();
    }
    std::string line(maps.substr(at, end - at));
    at = end + 1;
    // start-end perms offset major:minor inode [path]
    std::istringstream in(line);
    std::string range, perms, offset, device;
    uint64_t inode = 0;
    if (!(in >> range >> perms >> offset >> device >> inode) || perms.size() < 4 ||
        perms[3] != 's') {
      continue;
    }
    std::string path;
    std::getline(in >> std::ws, path);
    constexpr std::string_view DELETED = " (deleted)";
    if (path.size() >= DELETED.size() &&
        path.compare(path.size() - DELETED.size(), DELETED.size(), DELETED) == 0) {
      path.resize(path.size() - DELETED.size());
    }
    SharedMapping m;
    unsigned major = 0, minor = 0;
    if (sscanf(device.c_str(), "%x:%x", &major, &minor) != 2) {
      continue;
    }
    m.dev = (uint64_t(major) << 32) | minor;
    m.inode = inode;
    size_t mark;
    if (path == "/dev/zero" || path.empty()) {
      m.what = "MAP_SHARED|MAP_ANONYMOUS";
    } else if (path.rfind("/SYSV", 0) == 0) {
      m.what = "System V shm";
    } else if (path.rfind("/memfd:", 0) == 0) {
      m.what = "memfd " + path.substr(7);
    } else if (!shmDirMark.empty() && (mark = path.find(shmDirMark)) != std::string::npos &&
               path.find('/', path.find('/', mark + shmDirMark.size()) + 1) == std::string::npos) {
      // RUN_DIR/shm/<homeNode>-<pid>/NAME: the job's /dev/shm/NAME
      m.what = "/dev/shm/" + path.substr(path.rfind('/') + 1);
    } else {
      continue;
    }
    if (seen.insert({m.dev, m.inode}).second) {
      result.push_back(std::move(m));
    }
  }
  return result;
}

std::vector<std::string> stayReasons(const std::vector<GuestMaps>& guests) {
  std::vector<std::string> result;
  for (size_t i = 0; i < guests.size(); i++) {
    std::set<int32_t> with;
    std::vector<std::string> objects, shared;
    for (const SharedMapping& m : guests[i].shared) {
      bool common = false;
      for (size_t j = 0; j < guests.size(); j++) {
        if (j == i) {
          continue;
        }
        for (const SharedMapping& o : guests[j].shared) {
          if (o.dev == m.dev && o.inode == m.inode) {
            with.insert(guests[j].homePid);
            common = true;
          }
        }
      }
      auto& list = common ? shared : objects;
      if (std::find(list.begin(), list.end(), m.what) == list.end()) {
        list.push_back(m.what);
      }
    }
    if (!with.empty()) {
      result.push_back(fmt::format("shares memory with {} ({})", fmt::join(with, ", "),
                                   fmt::join(shared, ", ")));
    } else if (!objects.empty()) {
      result.push_back(fmt::format("maps {}", fmt::join(objects, ", ")));
    } else {
      result.push_back("");
    }
  }
  return result;
}

}  // namespace mos
