#pragma once
// A typed address in another process's address space (rr's RemotePtr). A guest address is never a
// `T*` or a bare integer in our code: the memory accessor only takes RemotePtr, so a local
// pointer cannot be passed where a guest address is meant.

#include <cstddef>
#include <cstdint>

namespace mos {

template <typename T>
class RemotePtr {
 public:
  constexpr RemotePtr() = default;
  constexpr explicit RemotePtr(uint64_t addr) : addr_(addr) {}
  template <typename U>
  constexpr RemotePtr<U> cast() const {
    return RemotePtr<U>(addr_);
  }
  constexpr uint64_t addr() const { return addr_; }
  constexpr bool isNull() const { return addr_ == 0; }
  constexpr RemotePtr operator+(size_t bytes) const { return RemotePtr(addr_ + bytes); }
  constexpr bool operator==(const RemotePtr&) const = default;

 private:
  uint64_t addr_ = 0;
};

}  // namespace mos
