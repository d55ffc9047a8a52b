#pragma once
// /proc/PID/maps, parsed (proc(5)). Internal to libmigrate.

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mos::migrate {

struct MapsEntry {
  uint64_t start = 0;
  uint64_t end = 0;     // exclusive
  uint32_t prot = 0;    // PROT_READ | PROT_WRITE | PROT_EXEC
  bool shared = false;  // 's' in the perms column
  uint64_t offset = 0;
  uint32_t devMajor = 0;
  uint32_t devMinor = 0;
  uint64_t inode = 0;
  std::string path;  // the pathname column, possibly empty or "[stack]", " (deleted)" kept
};

// Reads /proc/PID/maps. Throws kj::Exception (FAILED) if it cannot be read or parsed.
std::vector<MapsEntry> readMaps(pid_t pid);

// The vDSO area of one address space: [vvar][vvar_vclock][vdso] on 6.13+ kernels.
struct VdsoLayout {
  uint64_t areaStart = 0;  // lowest of vvar, vvar_vclock, vdso
  uint64_t vdsoStart = 0;
  uint64_t vdsoSize = 0;  // bytes; 0: no vDSO
  bool present() const { return vdsoSize != 0; }
};

// The vDSO area as `maps` shows it (from readMaps).
VdsoLayout vdsoLayout(const std::vector<MapsEntry>& maps);

// Reads a whole /proc file (or any file) into a string. Throws kj::Exception (FAILED).
std::string readProcFile(const std::string& path);

}  // namespace mos::migrate
