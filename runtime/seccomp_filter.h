#pragma once
// The guest's seccomp filter, derived from the syscall table alone (design decisions 4 and 5).
// The program is installed into a guest by injection (the guest calls seccomp(2) itself), never
// into our own process, so this module only builds and exports it.

#include <linux/filter.h>

#include <vector>

namespace mos {

// Builds the guest's classic-BPF seccomp program (seccomp(2), SECCOMP_SET_MODE_FILTER):
//   - an architecture other than AUDIT_ARCH_X86_64 (i386 via int 0x80)  → SECCOMP_RET_KILL_PROCESS
//   - an x32 number (nr & __X32_SYSCALL_BIT)                          → SECCOMP_RET_USER_NOTIF,
//     so the supervisor reports it by name and fails it with ENOSYS
//   - a LOCAL row                                                     → SECCOMP_RET_ALLOW
//   - mmap with MAP_ANONYMOUS in its flags (the LOCAL row with handler MMAP) → SECCOMP_RET_ALLOW;
//     any other mmap                                                  → SECCOMP_RET_USER_NOTIF
//   - everything else (FORWARD, EMULATE, DENY, and numbers without a row) → SECCOMP_RET_USER_NOTIF
// The body is built with libseccomp (binary-tree optimisation) and exported; a short prefix in
// front of it sorts out the architecture and x32 before libseccomp's own checks, which would
// send x32 to the bad-arch action.
// Returns the instructions; install them with `struct sock_fprog{len, data()}` and
// SECCOMP_FILTER_FLAG_NEW_LISTENER. Throws kj::Exception if libseccomp fails (a bug).
std::vector<sock_filter> buildGuestFilter();

}  // namespace mos
