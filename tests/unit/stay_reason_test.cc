#include "stay_reason.h"

#include <catch2/catch.hpp>

using mos::GuestMaps;
using mos::sharedMappings;
using mos::stayReasons;

namespace {

// /proc/PID/maps of a guest that maps one object of each kind shared, plus what does not tie it
// to its node (private memory, a read-only shared mapping of a content-cache file).
constexpr const char* MAPS =
    "55d0c0a00000-55d0c0a01000 r--p 00000000 fe:00 1234        /usr/bin/python3.11\n"
    "7fe10472b000-7fe10472c000 r--s 00000000 fe:00 777         "
    "/run/umosix-cluster/node-2/cache/n1-2049-99-4096-1\n"
    "7fe10472c000-7fe10472d000 rw-s 00000000 00:1b 143         "
    "/run/umosix-cluster/node-2/run/shm/1-4242/sem.mp-x1 (deleted)\n"
    "7fe10472d000-7fe10472e000 rw-s 00000000 00:01 11891       /memfd:mine (deleted)\n"
    "7fe10472e000-7fe10472f000 rw-s 00000000 00:01 34          /SYSV00000000 (deleted)\n"
    "7fe10472f000-7fe104730000 rw-s 00000000 00:01 11889       /dev/zero (deleted)\n"
    "7fe104730000-7fe104731000 rw-s 00000000 00:01 11889       /dev/zero (deleted)\n"
    "7ffd46c00000-7ffd46c21000 rw-p 00000000 00:00 0           [stack]\n";

}  // namespace

TEST_CASE("shared mappings that tie a guest to its node are found in its maps", "[runtime][stay]") {
  auto shared = sharedMappings(MAPS);
  REQUIRE(shared.size() == 4);  // the two /dev/zero lines are one object
  CHECK(shared[0].what == "/dev/shm/sem.mp-x1");
  CHECK(shared[0].dev == ((uint64_t(0) << 32) | 0x1b));
  CHECK(shared[0].inode == 143);
  CHECK(shared[1].what == "memfd mine");
  CHECK(shared[2].what == "System V shm");
  CHECK(shared[3].what == "MAP_SHARED|MAP_ANONYMOUS");
  CHECK(shared[3].inode == 11889);
  CHECK(sharedMappings("").empty());
  CHECK(sharedMappings("garbage line\n7f-8f rw-p 0 00:00 0\n").empty());
}

TEST_CASE("a guest stays for the memory it shares with the other processes of its job",
          "[runtime][stay]") {
  auto all = sharedMappings(MAPS);
  auto anonymousOnly = sharedMappings(
      "7fe10472f000-7fe104730000 rw-s 00000000 00:01 11889       /dev/zero (deleted)\n");
  auto ownSegment = sharedMappings(
      "7fe10472e000-7fe10472f000 rw-s 00000000 00:01 99          /SYSV00000001 (deleted)\n");
  auto reasons = stayReasons({GuestMaps{4242, all}, GuestMaps{4250, anonymousOnly},
                              GuestMaps{4251, anonymousOnly}, GuestMaps{4260, ownSegment},
                              GuestMaps{4270, {}}});
  REQUIRE(reasons.size() == 5);
  CHECK(reasons[0] == "shares memory with 4250, 4251 (MAP_SHARED|MAP_ANONYMOUS)");
  CHECK(reasons[1] == "shares memory with 4242, 4251 (MAP_SHARED|MAP_ANONYMOUS)");
  CHECK(reasons[3] == "maps System V shm");
  CHECK(reasons[4] == "");
}
