#include "seccomp_filter.h"

#include <asm/unistd.h>
#include <linux/audit.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <seccomp.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <kj/debug.h>
#include <kj/io.h>

#include "syscall_table.h"

namespace mos {
namespace {

// Owns a libseccomp context.
struct FilterContext {
  scmp_filter_ctx ctx;
  explicit FilterContext(uint32_t defaultAction) : ctx(seccomp_init(defaultAction)) {
    KJ_REQUIRE(ctx != nullptr, "seccomp_init failed");
  }
  ~FilterContext() { seccomp_release(ctx); }
  FilterContext(const FilterContext&) = delete;
  FilterContext& operator=(const FilterContext&) = delete;
};

void check(int rc, const char* what) {
  // libseccomp returns -errno.
  KJ_REQUIRE(rc == 0, "libseccomp failed", what, strerror(-rc));
}

// Builds the table-derived body with libseccomp and returns its exported BPF.
std::vector<sock_filter> buildBody() {
  FilterContext f(SCMP_ACT_NOTIFY);
  check(seccomp_attr_set(f.ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS), "ACT_BADARCH");
  // A binary tree over ~60 allowed numbers: at most ~7 comparisons instead of a linear chain.
  check(seccomp_attr_set(f.ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2), "CTL_OPTIMIZE");
  for (const SyscallEntry& e : syscallTable()) {
    if (e.route != Route::LOCAL) {
      continue;
    }
    if (e.handler == HandlerId::MMAP) {
      // Anonymous mappings stay local; a file-backed mapping goes to the supervisor, which maps
      // the file from the remote content cache.
      check(seccomp_rule_add(f.ctx, SCMP_ACT_ALLOW, e.nr, 1,
                             SCMP_A3(SCMP_CMP_MASKED_EQ, MAP_ANONYMOUS, MAP_ANONYMOUS)),
            e.name);
    } else if (e.handler == HandlerId::SIGACTION) {
      // Every signal but SIGCHLD, and any query, stay local; a new SIGCHLD disposition is seen
      // by the supervisor first (it decides whether the home kernel reaps the job's children).
      check(seccomp_rule_add(f.ctx, SCMP_ACT_ALLOW, e.nr, 1, SCMP_A0(SCMP_CMP_NE, SIGCHLD)),
            e.name);
      check(seccomp_rule_add(f.ctx, SCMP_ACT_ALLOW, e.nr, 1, SCMP_A1(SCMP_CMP_EQ, 0)), e.name);
    } else {
      KJ_ASSERT(e.handler == HandlerId::NONE, e.name);
      check(seccomp_rule_add(f.ctx, SCMP_ACT_ALLOW, e.nr, 0), e.name);
    }
  }

  // libseccomp 2.5.4 exports only to a file descriptor.
  int raw;
  KJ_SYSCALL(raw = memfd_create("mos-guest-filter", MFD_CLOEXEC));
  kj::AutoCloseFd fd(raw);
  check(seccomp_export_bpf(f.ctx, fd.get()), "seccomp_export_bpf");
  struct stat st;
  KJ_SYSCALL(fstat(fd.get(), &st));
  KJ_ASSERT(st.st_size > 0 && st.st_size % sizeof(sock_filter) == 0, st.st_size);
  std::vector<sock_filter> body(st.st_size / sizeof(sock_filter));
  size_t done = 0;
  while (done < static_cast<size_t>(st.st_size)) {
    ssize_t n;
    KJ_SYSCALL(
        n = pread(fd.get(), reinterpret_cast<char*>(body.data()) + done, st.st_size - done, done));
    KJ_ASSERT(n > 0, "short read of the exported filter");
    done += n;
  }
  return body;
}

constexpr sock_filter stmt(uint16_t code, uint32_t k) { return {code, 0, 0, k}; }
constexpr sock_filter jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) {
  return {code, jt, jf, k};
}

}  // namespace

std::vector<sock_filter> buildGuestFilter() {
  constexpr uint32_t X32_SYSCALL_BIT = 0x40000000;  // __X32_SYSCALL_BIT
  std::vector<sock_filter> prog = {
      stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
      jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
      stmt(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
      stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      jump(BPF_JMP | BPF_JSET | BPF_K, X32_SYSCALL_BIT, 0, 1),
      stmt(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
  };
  std::vector<sock_filter> body = buildBody();
  prog.insert(prog.end(), body.begin(), body.end());
  KJ_ASSERT(prog.size() <= BPF_MAXINSNS, prog.size());
  return prog;
}

}  // namespace mos
