#include "map_file.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <kj/exception.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <sstream>

namespace mos {

void throwConfigError(std::string message) {
  kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                        kj::heapString(message.data(), message.size())));
}

namespace {

// Parses a whole token as an unsigned decimal number (no sign, no spaces, no trailing junk).
bool parseNumber(const std::string& token, uint64_t& out) {
  if (token.empty() || token[0] < '0' || token[0] > '9') {
    return false;
  }
  auto [end, ec] = std::from_chars(token.data(), token.data() + token.size(), out);
  return ec == std::errc() && end == token.data() + token.size();
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) {
    return "";
  }
  size_t e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

std::string describeIds(uint64_t first, uint64_t count) {
  return count == 1 ? fmt::format("node {}", first)
                    : fmt::format("nodes {}..{}", first, first + count - 1);
}

}  // namespace

bool Ipv4::parse(const std::string& text, Ipv4& out) {
  in_addr addr;
  // inet_pton(3) accepts only the full dotted-quad form for AF_INET (no "10.1", no octal).
  if (inet_pton(AF_INET, text.c_str(), &addr) != 1) {
    return false;
  }
  out.value = ntohl(addr.s_addr);
  return true;
}

std::string Ipv4::toString() const {
  return fmt::format("{}.{}.{}.{}", value >> 24, (value >> 16) & 0xff, (value >> 8) & 0xff,
                     value & 0xff);
}

MapFile MapFile::fromPath(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    throwConfigError(fmt::format("{}: cannot read: {}", path, strerror(errno)));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    throwConfigError(fmt::format("{}: cannot read: {}", path, strerror(errno)));
  }
  return fromString(text.str(), path);
}

MapFile MapFile::fromString(const std::string& text, const std::string& name) {
  MapFile map;
  std::istringstream lines(text);
  std::string raw;
  int lineNo = 0;
  while (std::getline(lines, raw)) {
    lineNo++;
    std::string line = raw;
    if (size_t hash = line.find('#'); hash != std::string::npos) {
      line.resize(hash);
    }
    line = trim(line);
    if (line.empty()) {
      continue;
    }
    auto fail = [&](const std::string& what) {
      throwConfigError(fmt::format("{}:{}: {}", name, lineNo, what));
    };
    std::istringstream fields(line);
    std::vector<std::string> tokens;
    for (std::string t; fields >> t;) {
      tokens.push_back(t);
    }
    uint64_t id = 0;
    uint64_t count = 1;
    if (tokens.size() < 2 || tokens.size() > 3 || !parseNumber(tokens[0], id) ||
        (tokens.size() == 3 && !parseNumber(tokens[2], count))) {
      fail(fmt::format("expected \"ID ADDRESS COUNT\", got \"{}\"", line));
    }
    Ipv4 address;
    if (!Ipv4::parse(tokens[1], address)) {
      fail(fmt::format("bad address \"{}\" (expected an IPv4 address like 10.0.0.1)", tokens[1]));
    }
    if (id == 0) {
      fail("node ids start at 1, got 0");
    }
    if (count == 0) {
      fail("count must be at least 1, got 0");
    }
    if (id > UINT32_MAX || count > UINT32_MAX || id + count - 1 > UINT32_MAX) {
      fail(fmt::format("{} overflow the node id range (at most {})", describeIds(id, count),
                       UINT32_MAX));
    }
    if (address.value + count - 1 > UINT32_MAX) {
      fail(fmt::format("{} addresses from {} overflow the IPv4 range", count, address.toString()));
    }
    for (const MapRange& other : map.ranges_) {
      uint64_t otherEnd = uint64_t(other.firstId) + other.count;
      if (id < otherEnd && other.firstId < id + count) {
        fail(fmt::format("{} overlap {} of line {}", describeIds(id, count),
                         describeIds(other.firstId, other.count), other.line));
      }
      uint64_t otherAddrEnd = uint64_t(other.firstAddress.value) + other.count;
      if (address.value < otherAddrEnd && other.firstAddress.value < address.value + count) {
        uint64_t shared = std::max<uint64_t>(address.value, other.firstAddress.value);
        fail(fmt::format("address {} already belongs to node {} (line {})",
                         Ipv4{uint32_t(shared)}.toString(),
                         other.firstId + (shared - other.firstAddress.value), other.line));
      }
    }
    map.ranges_.push_back(MapRange{uint32_t(id), address, uint32_t(count), lineNo});
  }
  std::sort(map.ranges_.begin(), map.ranges_.end(),
            [](const MapRange& a, const MapRange& b) { return a.firstId < b.firstId; });
  return map;
}

kj::Maybe<Ipv4> MapFile::lookup(uint32_t id) const {
  // The last range whose first id is <= id.
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), id,
                             [](uint32_t v, const MapRange& r) { return v < r.firstId; });
  if (it == ranges_.begin()) {
    return nullptr;
  }
  --it;
  uint64_t offset = uint64_t(id) - it->firstId;
  if (offset >= it->count) {
    return nullptr;
  }
  return Ipv4{uint32_t(it->firstAddress.value + offset)};
}

kj::Maybe<uint32_t> MapFile::nodeOf(Ipv4 address) const {
  for (const MapRange& r : ranges_) {
    uint64_t offset = uint64_t(address.value) - r.firstAddress.value;
    if (address.value >= r.firstAddress.value && offset < r.count) {
      return uint32_t(r.firstId + offset);
    }
  }
  return nullptr;
}

std::vector<MapNode> MapFile::nodes() const {
  std::vector<MapNode> result;
  for (const MapRange& r : ranges_) {
    for (uint32_t i = 0; i < r.count; i++) {
      result.push_back(MapNode{r.firstId + i, Ipv4{r.firstAddress.value + i}});
    }
  }
  return result;
}

uint64_t MapFile::size() const {
  uint64_t n = 0;
  for (const MapRange& r : ranges_) {
    n += r.count;
  }
  return n;
}

}  // namespace mos
