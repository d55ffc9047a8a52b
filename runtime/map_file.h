#pragma once
// The cluster map file, in the openMosix format (so `setpe -w -f map` reads the same file):
//
//   # comment
//   ID ADDRESS [COUNT]
//
// One line per range: nodes ID..ID+COUNT-1 live at ADDRESS, ADDRESS+1, ... (IPv4, dotted quad).
// COUNT defaults to 1. Blank lines and `#` comments (whole-line or trailing) are ignored.
// Node ids are 1..2^32-1 (0 means "no node" everywhere in umosix).

#include <kj/common.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mos {

// Throws a kj::Exception of type FAILED whose description is `message`: one line for the user
// that names the file, variable or flag at fault. Every configuration error (a bad map file,
// UMOSIX_* variable, flag or cluster key; map_file.h, config.h, cluster_auth.h) is one of these:
// tools print its getDescription() and exit.
[[noreturn]] void throwConfigError(std::string message);

// An IPv4 address in host byte order.
struct Ipv4 {
  uint32_t value = 0;

  // Parses a dotted quad ("10.0.0.1"); false for anything else (hostnames, IPv6, junk).
  static bool parse(const std::string& text, Ipv4& out);
  // "10.0.0.1".
  std::string toString() const;

  bool operator==(const Ipv4&) const = default;
  auto operator<=>(const Ipv4&) const = default;
};

// One line of the map: nodes firstId..firstId+count-1 at firstAddress.. (consecutive).
struct MapRange {
  uint32_t firstId;
  Ipv4 firstAddress;
  uint32_t count;
  int line;  // where it was declared, 1-based
};

// One node of the map.
struct MapNode {
  uint32_t id;
  Ipv4 address;
};

// A parsed map file. Immutable after parsing; cheap lookups (ranges sorted by id).
class MapFile {
 public:
  // Reads and parses `path`. Throws a configuration error (throwConfigError) naming the path and
  // the line, e.g. `map:3: expected "ID ADDRESS COUNT", got "1 2 3 4"`, or "PATH: cannot read:
  // strerror" when it cannot be opened.
  static MapFile fromPath(const std::string& path);
  // Parses `text`; `name` is used in error messages in place of a file name.
  static MapFile fromString(const std::string& text, const std::string& name = "map");

  // The address of node `id`, or nullptr when the map has no such node.
  kj::Maybe<Ipv4> lookup(uint32_t id) const;
  // The node at `address`, or nullptr when the address is not a cluster member.
  kj::Maybe<uint32_t> nodeOf(Ipv4 address) const;

  // The ranges as declared, sorted by first id.
  const std::vector<MapRange>& ranges() const { return ranges_; }
  // Every node, sorted by id (one entry per node: expands the ranges).
  std::vector<MapNode> nodes() const;
  // The number of nodes.
  uint64_t size() const;

 private:
  std::vector<MapRange> ranges_;
};

}  // namespace mos
