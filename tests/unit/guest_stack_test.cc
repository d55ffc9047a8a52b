// Guest stacks (remote/guest_stack.h, mostrace -k): a real process trapped in a seccomp user
// notification (the filter flags of a guest), unwound from its perf-sampled registers, compared
// with gdb's backtrace of the same program at the same syscall run natively. Needs root (perf
// samples in kernel context, process_vm_readv) and gdb; says so and passes without them.

#include "guest_stack.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <kj/debug.h>

#include <chrono>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <capnp/serialize.h>

#include "seccomp_unotify.h"
#include "trace_channel.h"

namespace mos::remote {
namespace {

using namespace std::chrono_literals;

// A child running STACK_PROGRAM under a filter that notifies write(2), with the flags a guest's
// filter has (WAIT_KILLABLE_RECV). Its stdin and stdout are pipes of the test.
struct TrappedChild {
  pid_t pid = -1;
  kj::Own<KernelUnotify> listener;
  kj::AutoCloseFd stdinWrite, stdoutRead;

  TrappedChild() {
    int in[2], out[2], ready[2], go[2];
    KJ_SYSCALL(pipe2(in, O_CLOEXEC));
    KJ_SYSCALL(pipe2(out, O_CLOEXEC));
    KJ_SYSCALL(pipe2(ready, O_CLOEXEC));
    KJ_SYSCALL(pipe2(go, O_CLOEXEC));
    pid_t pid = fork();
    KJ_ASSERT(pid >= 0);
    if (pid == 0) {
      dup2(in[0], 0);
      dup2(out[1], 1);
      close(ready[0]);
      close(go[1]);
      struct sock_filter code[] = {
          BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
          BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_write, 0, 1),
          BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
          BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      };
      struct sock_fprog prog = {sizeof(code) / sizeof(code[0]), code};
      prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
      long fd =
          syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                  SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, &prog);
      if (fd < 0) {
        _exit(120);
      }
      close(ready[1]);  // close(2) is not trapped: tells the test the listener exists
      // The listener is close-on-exec: wait until the test has its copy (EOF on `go`).
      char wait;
      (void)!read(go[0], &wait, 1);
      execl(STACK_PROGRAM, STACK_PROGRAM, nullptr);
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    close(ready[1]);
    close(go[0]);
    kj::AutoCloseFd goWrite(go[1]);
    char byte;
    (void)!read(ready[0], &byte, 1);  // EOF once the filter is installed (or the child died)
    close(ready[0]);
    TrappedChild& child = *this;
    child.pid = pid;
    child.stdinWrite = kj::AutoCloseFd(in[1]);
    child.stdoutRead = kj::AutoCloseFd(out[0]);
    // The listener is the child's descriptor that names a seccomp notify file.
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
    KJ_ASSERT(pidfd >= 0);
    kj::AutoCloseFd ownedPidfd(pidfd);
    for (const auto& entry : std::filesystem::directory_iterator(fmt::format("/proc/{}/fd", pid))) {
      std::error_code ec;
      auto target = std::filesystem::read_symlink(entry.path(), ec);
      if (!ec && target.string().find("seccomp notify") != std::string::npos) {
        int n = std::stoi(entry.path().filename().string());
        int fd = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, n, 0));
        KJ_ASSERT(fd >= 0);
        child.listener = kj::heap<KernelUnotify>(kj::AutoCloseFd(fd));
      }
    }
    KJ_ASSERT(child.listener.get() != nullptr, "no listener in the child");
    goWrite = nullptr;  // the child may exec now
  }
  KJ_DISALLOW_COPY(TrappedChild);

  // Waits until the program blocks in its read of stdin (syscall 0).
  void waitForRead() {
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(fmt::format("/proc/{}/syscall", pid));
      std::string nr;
      std::error_code ec;
      auto exe = std::filesystem::read_symlink(fmt::format("/proc/{}/exe", pid), ec);
      if (in >> nr && nr == "0" && !ec && exe.filename() == "stack_program") {
        return;
      }
      std::this_thread::sleep_for(1ms);
    }
    FAIL("the program did not reach its read of stdin");
  }

  seccomp_notif receive() {
    struct pollfd pfd = {listener->fd(), POLLIN, 0};
    REQUIRE(poll(&pfd, 1, 10000) == 1);
    seccomp_notif notif = {};
    REQUIRE(listener->receive(notif) == 0);
    return notif;
  }

  // Lets the trapped write run, then checks the program's output and exit status.
  void finish(uint64_t id) {
    seccomp_notif_resp resp = {};
    resp.id = id;
    resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
    REQUIRE(listener->send(resp) == 0);
    char text[16] = {};
    REQUIRE(read(stdoutRead.get(), text, sizeof(text)) == 6);
    CHECK(std::string(text) == "stack\n");
    stdinWrite = nullptr;  // no second write
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    pid = -1;
  }

  ~TrappedChild() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
};

// Function names of gdb's `bt` at the program's first write(2), run natively, with the ELF
// symbol tables only (no separate debug files, no debuginfod: the same tables the guest's
// files in the content cache have). Empty when gdb is missing.
std::vector<std::string> gdbBacktrace() {
  std::string command = fmt::format(
      "gdb -batch -nx -ex 'set debug-file-directory /nonexistent' "
      "-ex 'set debuginfod enabled off' -ex 'catch syscall write' -ex 'run < /dev/null' "
      "-ex bt {} 2>/dev/null",
      STACK_PROGRAM);
  ::FILE* gdb = popen(command.c_str(), "r");
  std::vector<std::string> names;
  if (gdb == nullptr) {
    return names;
  }
  // "#0  0x00007ffff7ecb350 in write () from /lib/..." or "#3  main () at stack_program.c:5"
  std::regex frame(R"(^#\d+\s+(?:0x[0-9a-f]+ in )?([^ ]+) \()");
  char line[1024];
  while (fgets(line, sizeof(line), gdb) != nullptr) {
    std::cmatch m;
    if (std::regex_search(line, m, frame)) {
      names.push_back(m[1].str());
    }
  }
  pclose(gdb);
  return names;
}

bool perfUsable() {
  try {
    GuestStackSampler probe(getpid());
    return true;
  } catch (kj::Exception& e) {
    WARN("perf events unusable here, skipped: " << e.getDescription().cStr());
    return false;
  }
}

TEST_CASE(
    "a thread trapped in a notification unwinds to main through the program's functions, "
    "as gdb shows natively",
    "[remote][stack]") {
  if (geteuid() != 0) {
    WARN("needs root (perf samples in kernel context), skipped");
    return;
  }
  if (!perfUsable()) {
    return;
  }
  std::vector<std::string> expected = gdbBacktrace();
  if (expected.empty()) {
    WARN("gdb unavailable, skipped");
    return;
  }
  REQUIRE(expected == std::vector<std::string>{"write", "inner", "outer", "main"});

  TrappedChild child;
  child.waitForRead();
  GuestStackSampler sampler(child.pid);
  REQUIRE(write(child.stdinWrite.get(), "x", 1) == 1);
  seccomp_notif notif = child.receive();
  REQUIRE(notif.data.nr == __NR_write);
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = notif.data.args[i];
  }
  auto regs = sampler.trappedRegs(notif.data.instruction_pointer, args, 5000);
  REQUIRE(regs != nullptr);
  KJ_IF_MAYBE (r, regs) {
    CHECK(r->ip == notif.data.instruction_pointer);
    CHECK(!r->partial);
    auto frames = unwindGuest(notif.pid, *r);
    std::vector<std::string> names;
    std::string shown;
    for (const StackFrame& f : frames) {
      names.push_back(f.symbol);
      shown += fmt::format("  {:#x} {}+{:#x} ({})\n", f.ip, f.symbol, f.offset, f.module);
    }
    INFO("unwound:\n" << shown);
    REQUIRE(names.size() >= expected.size());
    CHECK(std::vector<std::string>(names.begin(), names.begin() + expected.size()) == expected);
    CHECK(frames[0].module.find("libc.so") != std::string::npos);
    CHECK(frames[1].module.find("stack_program") != std::string::npos);
    CHECK(frames[0].ip == notif.data.instruction_pointer);
  }
  child.finish(notif.id);
}

TEST_CASE("without a sample, /proc/PID/syscall's ip and sp still give the trapped function",
          "[remote][stack]") {
  if (geteuid() != 0) {
    WARN("needs root, skipped");
    return;
  }
  TrappedChild child;
  child.waitForRead();
  REQUIRE(write(child.stdinWrite.get(), "x", 1) == 1);
  seccomp_notif notif = child.receive();
  GuestStacks stacks;  // its sampler is made now, after the thread went to sleep
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = notif.data.args[i];
  }
  auto frames = stacks.capture(notif.pid, notif.data.instruction_pointer, args);
  REQUIRE(!frames.empty());
  CHECK(frames[0].symbol == "write");
  CHECK(frames[0].ip == notif.data.instruction_pointer);
  child.finish(notif.id);
}

TEST_CASE(
    "PTRACE_INTERRUPT does not stop a thread waiting in a received notification until it "
    "is answered",
    "[remote][stack]") {
  // Why guest_stack.h samples registers with perf instead of ptrace-stopping the thread.
  if (geteuid() != 0) {
    WARN("needs root, skipped");
    return;
  }
  TrappedChild child;
  child.waitForRead();
  REQUIRE(write(child.stdinWrite.get(), "x", 1) == 1);
  seccomp_notif notif = child.receive();
  REQUIRE(ptrace(PTRACE_SEIZE, child.pid, 0, 0) == 0);
  REQUIRE(ptrace(PTRACE_INTERRUPT, child.pid, 0, 0) == 0);
  int status = 0;
  auto deadline = std::chrono::steady_clock::now() + 200ms;
  pid_t got = 0;
  while (got == 0 && std::chrono::steady_clock::now() < deadline) {
    got = waitpid(child.pid, &status, WNOHANG | __WALL);
    std::this_thread::sleep_for(5ms);
  }
  CHECK(got == 0);  // still in its killable wait
  seccomp_notif_resp resp = {};
  resp.id = notif.id;
  resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  REQUIRE(child.listener->send(resp) == 0);
  // The stop comes once the call returned: too late for the stack at the call.
  REQUIRE(waitpid(child.pid, &status, __WALL) == child.pid);
  CHECK(WIFSTOPPED(status));
  REQUIRE(ptrace(PTRACE_DETACH, child.pid, 0, 0) == 0);
  char text[16] = {};
  REQUIRE(read(child.stdoutRead.get(), text, sizeof(text)) == 6);
  child.stdinWrite = nullptr;
  REQUIRE(waitpid(child.pid, &status, 0) == child.pid);
  CHECK(WIFEXITED(status));
  child.pid = -1;
}

TEST_CASE("the trace hook puts the stack into the event only while a subscriber asks for it",
          "[remote][stack][trace]") {
  if (geteuid() != 0 || !perfUsable()) {
    WARN("needs root and perf events, skipped");
    return;
  }
  // mosd's end of the publishers' socket, and the job's control record, in a run dir of ours.
  char dir[] = "/tmp/guest_stack_test.XXXXXX";
  REQUIRE(mkdtemp(dir) != nullptr);
  std::string runDir = dir;
  KJ_DEFER(std::filesystem::remove_all(runDir));
  int hub = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  REQUIRE(hub >= 0);
  kj::AutoCloseFd ownedHub(hub);
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  strncpy(addr.sun_path, traceSocketPath(runDir).c_str(), sizeof(addr.sun_path) - 1);
  REQUIRE(bind(hub, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  REQUIRE(listen(hub, 4) == 0);
  TraceControl* control = mapTraceControl(runDir, 1, 4242);
  KJ_DEFER(unmapTraceControl(control));
  TracePublisher publisher(runDir, 1, 4242);

  TrappedChild child;
  child.waitForRead();
  GuestStacks stacks;
  // A first traced call with stacks wanted makes the sampler (its own stack comes from
  // /proc/PID/syscall); stacks are asked for before the trap, as a running subscription does.
  control->listeners = 1;
  control->stackListeners = 1;
  REQUIRE(write(child.stdinWrite.get(), "x", 1) == 1);
  seccomp_notif notif = child.receive();
  uint64_t args[6];
  for (int i = 0; i < 6; i++) {
    args[i] = notif.data.args[i];
  }
  {
    TraceCall trace(publisher, 4242, 4242, 2, 1, notif.data.nr, args);
    REQUIRE(trace.wantsStack());
    traceGuestStack(trace, stacks, notif,
                    [](const std::string& path) { return "/home-of" + path; });
    trace.finish(6, TraceRoute::FORWARDED);
  }
  CHECK(stacks.sampling());
  int connection = accept4(hub, nullptr, nullptr, SOCK_CLOEXEC);
  REQUIRE(connection >= 0);
  kj::AutoCloseFd ownedConnection(connection);
  auto receive = [&]() {
    kj::Array<capnp::word> buffer = kj::heapArray<capnp::word>(1 << 14);
    ssize_t n = recv(connection, buffer.begin(), buffer.size() * sizeof(capnp::word), 0);
    REQUIRE(n > 0);
    capnp::FlatArrayMessageReader reader(buffer.slice(0, size_t(n) / sizeof(capnp::word)));
    return fromProto(reader.getRoot<proto::TraceEvent>());
  };
  TraceRecord event = receive();
  REQUIRE(!event.stack.empty());
  CHECK(event.stack[0].symbol == "write");
  CHECK(event.stack[0].module.rfind("/home-of/", 0) == 0);
  CHECK(stackLines(event).rfind(" > /home-of/", 0) == 0);
  TraceFormatter withStacks({32, false, false, 0, false, true});
  std::string shown = withStacks.line(event);
  CHECK(shown.find("write(") == 0);
  CHECK(shown.find("\n > /home-of/") != std::string::npos);
  CHECK(shown.find("(write+0x") != std::string::npos);
  CHECK(shown.back() != '\n');
  // Answer it; the second write traps with the sampler in place: the whole stack, sampled.
  seccomp_notif_resp resp = {};
  resp.id = notif.id;
  resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
  REQUIRE(child.listener->send(resp) == 0);
  char firstText[8] = {};
  REQUIRE(read(child.stdoutRead.get(), firstText, sizeof(firstText)) == 6);
  REQUIRE(write(child.stdinWrite.get(), "y", 1) == 1);
  notif = child.receive();
  for (int i = 0; i < 6; i++) {
    args[i] = notif.data.args[i];
  }
  {
    TraceCall trace(publisher, 4242, 4242, 2, 1, notif.data.nr, args);
    traceGuestStack(trace, stacks, notif,
                    [](const std::string& path) { return "/home-of" + path; });
    trace.finish(6, TraceRoute::FORWARDED);
  }
  TraceRecord second = receive();
  std::vector<std::string> names;
  for (const TraceFrame& f : second.stack) {
    names.push_back(f.symbol);
  }
  REQUIRE(names.size() >= 4);
  CHECK(std::vector<std::string>(names.begin(), names.begin() + 4) ==
        std::vector<std::string>{"write", "inner", "outer", "main"});
  CHECK(second.stack[1].module == "/home-of" STACK_PROGRAM);
  child.finish(notif.id);

  // Stacks no longer wanted: the next traced call has none, and the samplers close.
  control->stackListeners = 0;
  {
    TraceCall trace(publisher, 4242, 4242, 2, 1, notif.data.nr, args);
    CHECK(!trace.wantsStack());
    traceGuestStack(trace, stacks, notif, nullptr);
    trace.finish(0, TraceRoute::FORWARDED);
  }
  CHECK(!stacks.sampling());
  CHECK(receive().stack.empty());
}

}  // namespace
}  // namespace mos::remote
