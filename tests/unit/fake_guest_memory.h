#pragma once
// A fake guest address space for unit tests: separate regions, anything outside them faults
// (EFAULT, as GuestMemory promises). Records every write.

#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <utility>
#include <vector>

#include "marshal.h"

namespace mos::testing {

class FakeMemory final : public GuestMemory {
 public:
  void map(uint64_t base, std::vector<uint8_t> bytes) { regions_[base] = std::move(bytes); }
  std::vector<uint8_t>& at(uint64_t base) { return regions_.at(base); }

  int read(RemotePtr<void> addr, std::span<uint8_t> out) override {
    uint8_t* p = find(addr.addr(), out.size());
    if (p == nullptr) {
      return EFAULT;
    }
    memcpy(out.data(), p, out.size());
    return 0;
  }
  int write(RemotePtr<void> addr, std::span<const uint8_t> data) override {
    uint8_t* p = find(addr.addr(), data.size());
    if (p == nullptr) {
      return EFAULT;
    }
    memcpy(p, data.data(), data.size());
    writes.push_back({addr.addr(), data.size()});
    return 0;
  }

  std::vector<std::pair<uint64_t, size_t>> writes;  // address, bytes

 private:
  uint8_t* find(uint64_t addr, size_t len) {
    auto it = regions_.upper_bound(addr);
    if (it == regions_.begin()) {
      return nullptr;
    }
    --it;
    if (addr + len > it->first + it->second.size()) {
      return nullptr;
    }
    return it->second.data() + (addr - it->first);
  }
  std::map<uint64_t, std::vector<uint8_t>> regions_;
};

}  // namespace mos::testing
