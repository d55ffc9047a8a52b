#pragma once
// Generic marshalling of regular forwarded syscalls (design decision 5): the table's argument
// kinds say which guest memory a call reads and writes; this module copies it into a
// SyscallRequest and writes a SyscallReply's out-buffers back (protocol/job.capnp).
//
// Wire contract (job.capnp): every pointer argument that has guest memory behind it becomes a
// Buffer (in) and/or an OutBuf (out) named by its argument index; the deputy replaces that
// argument with a pointer to its home copy. Pointer arguments without a buffer travel as 0 (NULL
// pointers, SIGMASK, SIGMASK_PAIR). Details the deputy relies on:
//   - PATH buffers include their terminating NUL, so the deputy can pass the data as is.
//   - A length argument of a capped buffer is rewritten to the capped length, so the deputy may
//     size its buffer from the OutBuf alone.
//   - In/out arguments (INOUT_*) have a Buffer and an OutBuf with the same `arg`.
//   - Both lists are in ascending argument order.

#include <sys/types.h>

#include <cstdint>
#include <span>
#include <string>

#include "job.capnp.h"
#include "remote_ptr.h"
#include "syscall_table.h"

namespace mos {

// A guest's address space. Every failure (unmapped, protected, process gone) reads as EFAULT,
// the errno the guest sees for a bad pointer; callers check SECCOMP_IOCTL_NOTIF_ID_VALID
// themselves.
class GuestMemory {
 public:
  virtual ~GuestMemory() = default;

  // Copies `out.size()` bytes at `addr` into `out`. Returns 0, or EFAULT unless every byte was
  // read.
  [[nodiscard]] virtual int read(RemotePtr<void> addr, std::span<uint8_t> out) = 0;

  // Copies `data` to `addr`. Returns 0, or EFAULT unless every byte was written (bytes before a
  // fault may have been written, as with the kernel's copy_to_user).
  [[nodiscard]] virtual int write(RemotePtr<void> addr, std::span<const uint8_t> data) = 0;

  // Reads the NUL-terminated string at `addr` into `out`, without the NUL. Returns 0; EFAULT if
  // a byte before the NUL is unreadable; ENAMETOOLONG if the first `max` bytes hold no NUL (so
  // with max = PATH_MAX this is the kernel's getname(): at most 4095 characters). Reads up to
  // each page boundary, so a string that ends just before an unmapped page is fine.
  [[nodiscard]] virtual int readString(RemotePtr<char> addr, size_t max, std::string& out);
};

// The memory of process `pid` (any thread id of it), through process_vm_readv(2) and
// process_vm_writev(2). Needs ptrace access to `pid` (PTRACE_MODE_ATTACH_REALCREDS).
class ProcessMemory final : public GuestMemory {
 public:
  explicit ProcessMemory(pid_t pid) : pid_(pid) {}
  [[nodiscard]] int read(RemotePtr<void> addr, std::span<uint8_t> out) override;
  [[nodiscard]] int write(RemotePtr<void> addr, std::span<const uint8_t> data) override;

 private:
  pid_t pid_;
};

// Fills `req` (nr, args, in, out; not seq) for a forwarded call of `nr` with the guest's `args`,
// reading the guest memory that `specs` name. Buffers are capped at MAX_FORWARD_BYTES (a short
// read or write for the guest); PATH strings at PATH_MAX.
// Returns 0, or the errno the guest sees without the call being forwarded: EFAULT (unreadable
// input), ENAMETOOLONG (a path without a NUL in PATH_MAX bytes), EINVAL (an in/out array or fd
// set larger than MAX_FORWARD_BYTES, or a negative socklen). On failure `req` holds garbage.
// Preconditions: `specs` are a regular row's args or dynamicArgSpecs' result.
[[nodiscard]] int marshalRequest(int nr, const ArgSpec (&specs)[6], const uint64_t (&args)[6],
                                 GuestMemory& mem, proto::SyscallRequest::Builder req);

// Writes the out-buffers of `reply` into the guest, for a request that marshalRequest built from
// the same `nr`, `specs` and `args` (the guest's original ones):
//   OUT_BUF          min(ret, capacity) bytes when ret > 0
//   OUT_ARRAY        ret elements when ret > 0
//   OUT_STRUCT, INOUT_STRUCT, INOUT_ARRAY, INOUT_BITS   in full when ret >= 0
//   OUT_BUF_LENPTR   min(capacity, the returned socklen) bytes when ret >= 0
// Never writes more than the guest's buffer holds, whatever the reply says.
// Returns the guest-visible result: reply.ret, or -EFAULT if a write failed.
// Throws kj::Exception (FAILED) if the reply has fewer out-buffers than the request (a peer bug).
[[nodiscard]] int64_t unmarshalReply(int nr, const ArgSpec (&specs)[6], const uint64_t (&args)[6],
                                     proto::SyscallReply::Reader reply, GuestMemory& mem);

// The argument kinds of one call of `entry` with `args`:
//   handler NONE     the row's args (always true)
//   IOCTL            by request: the terminal requests (TCGETS, TCSETS*, TIOCGWINSZ, TIOCSWINSZ,
//                    TIOCGPGRP, TIOCSPGRP, TIOCSCTTY, TIOCNOTTY, FIONREAD, FIONBIO, FIOCLEX,
//                    FIONCLEX, TCFLSH, TCXONC, TCSBRK, ...) and _IOC-encoded requests of pointer-
//                    free families ('T' such as TIOCGPTN, 'f' such as FS_IOC_GETFLAGS, block 0x12)
//                    by their encoded size and direction
//   FCNTL            F_GETLK/F_SETLK/F_SETLKW/F_OFD_* (struct flock, 32 bytes), F_GETOWN_EX/
//                    F_SETOWN_EX (8 bytes), F_GET/SET_(FILE_)RW_HINT (8 bytes); the rest values
//   PSELECT          the three fd_sets by nfds, the timespec in and out, the sigmask ignored
//   other handlers   false (they marshal themselves)
// Returns false when the call cannot be marshalled generically: for IOCTL an unknown request
// (the guest sees ENOTTY), for FCNTL an unknown command (EINVAL).
[[nodiscard]] bool dynamicArgSpecs(const SyscallEntry& entry, const uint64_t (&args)[6],
                                   ArgSpec (&out)[6]);

}  // namespace mos
