#pragma once
// Why a guest stays on its node: the memory it shares with other processes of its job there
// (docs/design.md, "Memory shared between job processes"). A shared mapping cannot be coherent
// across nodes, so the processes that share one are kept together, and mps shows why. The reason
// is derived when asked (mosd reads the guests' /proc/PID/maps), so the guests pay nothing for it.

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mos {

// One shared mapping of a process, from a line of /proc/PID/maps with an 's' permission.
struct SharedMapping {
  uint64_t dev = 0;    // major << 32 | minor, of the backing object
  uint64_t inode = 0;  // its inode: the same object in every process that maps it
  std::string what;    // "MAP_SHARED|MAP_ANONYMOUS", "System V shm", "memfd NAME",
                       // "/dev/shm/NAME"
};

// The shared mappings of /proc/PID/maps content `maps` that tie a process to its node: anonymous
// shared memory, System V segments, memfds and files of the job's /dev/shm (whose directory on
// this node contains `shmDirMark`, "/shm/"). Shared mappings of other files (the content cache's,
// read-only) are not: they can be had on any node. One entry per object, in order of address.
std::vector<SharedMapping> sharedMappings(std::string_view maps,
                                          std::string_view shmDirMark = "/shm/");

// A guest of one job on this node, for stayReasons().
struct GuestMaps {
  int32_t homePid = 0;
  std::vector<SharedMapping> shared;
};

// For each of `guests` (the processes of one job on one node), why it stays on this node:
// "shares memory with 4250, 4251 (MAP_SHARED|MAP_ANONYMOUS, /dev/shm/sem.mp-x)" when another
// guest maps one of its objects, else "maps System V shm" (its objects), or "" when nothing ties
// it. Same order as `guests`.
std::vector<std::string> stayReasons(const std::vector<GuestMaps>& guests);

}  // namespace mos
