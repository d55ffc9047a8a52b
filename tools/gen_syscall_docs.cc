// gen_syscall_docs: prints docs/syscalls.md, the supported-syscalls page (gVisor's compatibility
// page), from the syscall table. `ninja -C build syscall-docs` regenerates the committed copy;
// `--check FILE` fails when FILE differs from what the table says.

#include <asm/unistd.h>
#include <errno.h>
#include <string.h>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "syscall_table.h"

namespace mos {
namespace {

std::string classNames(uint32_t classes) {
  static constexpr std::pair<uint32_t, const char*> NAMES[] = {
      {DESC, "desc"},   {FILE, "file"}, {PROC, "proc"}, {SIGNAL, "signal"}, {MEMORY, "memory"},
      {NETWORK, "net"}, {TIME, "time"}, {IPC, "ipc"},   {OTHER, "other"},
  };
  std::string out;
  for (auto [bit, name] : NAMES) {
    if (classes & bit) {
      out += out.empty() ? "" : " ";
      out += name;
    }
  }
  return out;
}

std::string argText(const ArgSpec& a) {
  switch (a.kind) {
    case ArgKind::IN_BUF:
    case ArgKind::OUT_BUF: return fmt::format("{}[a{}]", argKindName(a.kind), a.lenArg);
    case ArgKind::IN_STRUCT:
    case ArgKind::OUT_STRUCT:
    case ArgKind::INOUT_STRUCT: return fmt::format("{}({})", argKindName(a.kind), a.size);
    case ArgKind::INOUT_ARRAY:
    case ArgKind::OUT_ARRAY:
      return fmt::format("{}[a{}×{}]", argKindName(a.kind), a.lenArg, a.size);
    case ArgKind::INOUT_BITS: return fmt::format("INOUT_BITS[a{}]", a.lenArg);
    case ArgKind::OUT_BUF_LENPTR: return fmt::format("OUT_BUF_LENPTR[*a{}]", a.lenArg);
    case ArgKind::SIGMASK: return fmt::format("SIGMASK[a{}]", a.lenArg);
    case ArgKind::NONE: return "(handler)";
    default: return argKindName(a.kind);
  }
}

std::string argsText(const SyscallEntry& e) {
  int last = 5;
  while (last >= 0 && e.args[last].kind == ArgKind::NONE) {
    --last;
  }
  std::string out;
  for (int i = 0; i <= last; ++i) {
    out += (i ? ", " : "") + argText(e.args[i]);
  }
  return out;
}

std::string handlerNote(const SyscallEntry& e) {
  switch (e.handler) {
    case HandlerId::NONE: return "";
    case HandlerId::IDS: return "answered from the job's id cache (home ids)";
    case HandlerId::MMAP:
      return "MAP_ANONYMOUS runs locally; file-backed mappings come from the remote content cache";
    case HandlerId::EXEC: return "performed at home: the job comes home (design decision 2)";
    case HandlerId::FORK:
      return "mirrored: the deputy forks at home, the guest's kernel forks here at the home pid";
    case HandlerId::IOV: return "the iovec array is flattened into one buffer";
    case HandlerId::KILL: return "signals to the job itself are delivered locally";
    case HandlerId::SET_TID_ADDRESS: return "returns the home tid";
    case HandlerId::IOCTL: return "argument kind by request (terminal and _IOC-encoded requests)";
    case HandlerId::FCNTL: return "argument kind by command (struct flock for locks)";
    case HandlerId::PSELECT: return "fd_sets and timeout forwarded; the sigmask applies locally";
    case HandlerId::SOCKMSG: return "msghdr, its iovecs and control data are marshalled";
    case HandlerId::OPEN:
      return "the job's own /proc files (maps, status, ...) are snapshots of the guest's";
    case HandlerId::SIGACTION:
      return "a new SIGCHLD disposition is mirrored to the deputy (SIG_IGN, SA_NOCLDWAIT)";
    case HandlerId::SAME_IDS:
      return "succeeds when it changes nothing (the job's own ids); a real change fails with EPERM";
    case HandlerId::MEMFD:
      return "made on the node (a node-local descriptor); a memfd of the same name holds its "
             "number at home";
  }
  return "";
}

std::string notes(const SyscallEntry& e) {
  std::string out;
  if (e.route == Route::DENY) {
    const char* name = strerrorname_np(e.err);
    out = fmt::format("**{}**: {}", name ? name : std::to_string(e.err).c_str(), e.why);
  } else {
    out = handlerNote(e);
  }
  const char* view = nullptr;
  switch (e.view) {
    case HomeView::NONE: break;
    case HomeView::CLOSE_RANGE: view = "the deputy's own descriptors stay open"; break;
    case HomeView::POLL: view = "entries naming a deputy descriptor report POLLNVAL"; break;
    case HomeView::SELECT: view = "sets naming a deputy descriptor fail with EBADF"; break;
    case HomeView::SCM_RIGHTS:
      view = "SCM_RIGHTS naming a deputy descriptor fails with EBADF";
      break;
    case HomeView::FD_LISTING: view = "/proc/self/fd listings omit the deputy's descriptors"; break;
    case HomeView::EXE_LINK: view = "/proc/self/exe reads the job's executable"; break;
  }
  if (view != nullptr) {
    out += std::string(out.empty() ? "" : "; ") + "at home: " + view;
  }
  const char* onNode = nullptr;
  switch (e.onNode) {
    case OnNode::NONE:
    case OnNode::KERNEL:  // said once above the table
    case OnNode::RELATIVE_REFUSED: break;
    case OnNode::CLOSE: onNode = "a node-local descriptor is closed at home and on the node"; break;
    case OnNode::DUP:
      onNode = "a node-local descriptor is duplicated at home and on the node";
      break;
    case OnNode::SHM_PATH:
      onNode = "paths in /dev/shm/ run on the node, in the job's /dev/shm";
      break;
    case OnNode::SHM_OPEN:
      onNode = "/dev/shm/NAME is opened on the node, in the job's /dev/shm (node-local)";
      break;
  }
  if (onNode != nullptr) {
    out += std::string(out.empty() ? "" : "; ") + onNode;
  }
  if (e.route == Route::LOCAL && (e.classes & IPC) && e.nr != __NR_futex &&
      e.nr != __NR_futex_waitv) {
    out += std::string(out.empty() ? "" : "; ") + "in the job's own IPC namespace on the node";
  }
  if (e.atHome == AtHome::HELPER) {
    out += "; the supervisor sends it home itself, with these arguments";
  }
  if (e.restart == ERESTARTNOHAND) {
    out += std::string(out.empty() ? "" : "; ") +
           "interrupted by a signal: ERESTARTNOHAND (EINTR after a handler, even with SA_RESTART)";
  }
  if (e.eintrWhenWoken) {
    out += std::string(out.empty() ? "" : "; ") +
           "fails with EINTR whatever wakes it: issued again after a signal session or a "
           "migration's capture woke it with no signal to take";
  }
  if (e.restart == NEVER_INTERRUPTED) {
    out += std::string(out.empty() ? "" : "; ") +
           "never cut short by a signal (it never blocks): runs at home whatever is pending";
  }
  return out;
}

std::string render() {
  std::ostringstream o;
  auto table = syscallTable();
  size_t counts[4] = {};
  for (const SyscallEntry& e : table) {
    counts[static_cast<int>(e.route)]++;
  }
  o << "# Supported system calls (x86-64)\n\n"
    << "<!-- Generated by tools/gen_syscall_docs from runtime/syscall_table.cc. Do not edit:\n"
    << "     run `ninja -C build syscall-docs`. -->\n\n"
    << "A guest (the user part of a job running on a remote node) runs under a seccomp filter\n"
    << "derived from this table. Each system call takes one of four routes:\n\n"
    << "| route | where it runs | how |\n"
    << "|---|---|---|\n"
    << "| LOCAL | the remote node's kernel | the filter returns ALLOW: anonymous memory, futex, "
       "signal masks and dispositions, clocks, sleeps, getrandom, exit |\n"
    << "| FORWARD | the deputy, at home | the supervisor copies the argument buffers, the deputy "
       "executes the call in the job's home process (its fds, cwd, credentials), the results "
       "are written back |\n"
    << "| EMULATE | the supervisor | answered without a round trip (ids from the job's cache) |\n"
    << "| DENY | nowhere | fails with the errno shown; the supervisor logs the name once per job "
       "|\n"
    << "\n"
    << "The deputy executes a request only when the row's *at home* column allows it: `ARGS` "
       "with the row's argument kinds (a buffer only where a kind is a pointer, large enough for "
       "what the call touches), `MSGHDR` a msghdr whose pointers all name buffers of the "
       "request, `HELPER` a call the supervisor sends home as a step of its own handler; every "
       "other request (`NEVER`, no row, a buffer the row does not declare) is refused with the "
       "row's errno, or ENOSYS, and logged once. A forwarded call that a signal interrupts at "
       "home answers ERESTARTSYS (the kernel then restarts it or returns EINTR as SA_RESTART "
       "says), or ERESTARTNOHAND where the notes say so.\n\n"
    << "A number without a row is denied with ENOSYS and logged once per job. x32 numbers "
       "(`__X32_SYSCALL_BIT`) reach the supervisor and are denied with ENOSYS; a call through "
       "the i386 entry (`int 0x80`) kills the guest.\n\n"
    << "A FORWARD row without a handler is *regular*: its argument kinds say everything and one "
       "generic marshaller forwards it. Argument kinds: `FD` a descriptor of the job's home fd "
       "table; `NEW_FD` a descriptor number the call assigns; `VAL` a plain value; `PATH` a "
       "NUL-terminated path (at most PATH_MAX); `STRING` a "
       "NUL-terminated string that is not a path (xattr names, symlink targets); "
       "`IN_BUF[aN]`/`OUT_BUF[aN]` bytes whose length is argument N (out-buffers are trimmed "
       "to the result); `*_STRUCT(n)` n bytes, NULL stays NULL; `*_ARRAY[aN×n]` argument N "
       "elements of n bytes; `INOUT_BITS[aN]` an fd_set of argument N descriptors; "
       "`OUT_BUF_LENPTR[*aN]` bytes whose capacity is the socklen_t argument N points to; "
       "`SIGMASK[aN]` and `SIGMASK_PAIR` a call's temporary signal mask, applied in the "
       "guest and passed home as NULL; `(handler)` decoded by the handler. A single call moves "
       "at most "
    << (MAX_FORWARD_BYTES >> 20) << " MiB each way; larger reads and writes are short.\n\n"
    << "Memory shared between the processes of a job lives on the node where they run "
       "(docs/design.md): System V IPC runs in the job's own IPC namespace there; files of "
       "/dev/shm/ (POSIX shm, sem_open) live in the job's directory on the node, and memfds are "
       "made there. Their descriptors are *node-local*: the guest's own fd table holds the file, "
       "the home fd table a placeholder memfd at the same number. A call that takes a node-local "
       "descriptor and no path is run by the guest's own kernel; the notes say where a row does "
       "more.\n\n"
    << fmt::format("{} rows: {} local, {} forwarded, {} emulated, {} denied.\n\n", table.size(),
                   counts[static_cast<int>(Route::LOCAL)], counts[static_cast<int>(Route::FORWARD)],
                   counts[static_cast<int>(Route::EMULATE)], counts[static_cast<int>(Route::DENY)])
    << "The *tested by* column names the conformance program (`tests/syscalls/NAME.cc`) that "
       "checks the row, natively and under mosrun on a remote node; the programs Meson builds "
       "are exactly the ones named here (a unit test compares the lists).\n\n"
    << "| nr | name | route | handler | at home | classes | arguments | tested by | notes |\n"
    << "|---:|---|---|---|---|---|---|---|---|\n";
  for (const SyscallEntry& e : table) {
    o << fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", e.nr, e.name,
                     routeName(e.route), e.handler == HandlerId::NONE ? "" : handlerName(e.handler),
                     e.atHome == AtHome::NEVER ? "" : atHomeName(e.atHome), classNames(e.classes),
                     argsText(e), e.test != nullptr ? e.test : "", notes(e));
  }
  return o.str();
}

}  // namespace
}  // namespace mos

int main(int argc, char** argv) {
  CLI::App app{"Prints docs/syscalls.md from the syscall table"};
  std::string output, check;
  std::vector<std::string> built;
  app.add_option("-o,--output", output, "write to this file instead of stdout");
  app.add_option("--check", check, "exit 1 if this file differs from the generated page");
  app.add_option("--check-conformance", built,
                 "exit 1 unless these conformance programs are exactly the ones the table names");
  CLI11_PARSE(app, argc, argv);
  if (!built.empty()) {
    std::set<std::string> named, have(built.begin(), built.end());
    for (const char* program : mos::conformancePrograms()) {
      named.insert(program);
    }
    for (auto& p : named) {
      if (!have.count(p)) {
        std::cerr << "the syscall table names conformance program " << p
                  << ", which tests/syscalls/meson.build does not build\n";
      }
    }
    for (auto& p : have) {
      if (!named.count(p)) {
        std::cerr << "tests/syscalls/meson.build builds " << p
                  << ", which no row of the syscall table names (the `test` column)\n";
      }
    }
    return named == have ? 0 : 1;
  }
  std::string page = mos::render();
  if (!check.empty()) {
    std::ifstream in(check);
    std::stringstream existing;
    existing << in.rdbuf();
    if (!in || existing.str() != page) {
      std::cerr << check << " is out of date: run `ninja -C build syscall-docs`\n";
      return 1;
    }
    return 0;
  }
  if (output.empty()) {
    std::cout << page;
    return 0;
  }
  std::ofstream out(output, std::ios::trunc);
  out << page;
  return out.good() ? 0 : 1;
}
