#pragma once
// Tracing of forwarded system calls (issue 7, docs/design.md "Tracing"): one trapped call as
// plain data (TraceRecord, the C++ twin of protocol/trace.capnp's TraceEvent), its rendering as
// one line in strace's notation, the `-e trace=` / `--failed` filter and the `-c` summary.
//
// Arguments are decoded from the syscall table's argument kinds (syscall_table.h), so a new row
// is traced without new code: FD as a number (AT_FDCWD by name), PATH and STRING as quoted
// strings, IN_BUF and OUT_BUF as quoted prefixes cut at the string limit (`-s`) with strace's
// `"..."...`, structs as `{...}` (stat decoded), pointers the publisher did not capture in hex.
// A small table names the flags and constants of the common calls (open flags, PROT_*, MAP_*,
// AT_*, signals, whence); every other VAL is a decimal number.

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace mos {

// The route a trapped call took (protocol/trace.capnp TraceRoute, in the same order).
enum class TraceRoute : uint8_t { FORWARDED, EMULATED, LOCAL_ANSWER, DENIED };

// "forwarded", "emulated", "local", "denied".
const char* traceRouteName(TraceRoute route);

// The bytes one argument points to, as captured by the publisher.
struct TracePayload {
  bool present = false;  // false: only the raw address is known
  std::string data;      // a prefix of the bytes (paths without their NUL)
  uint64_t length = 0;   // bytes the argument holds in full (>= data.size())
};

// One frame of a guest stack (protocol/trace.capnp StackFrame; mostrace -k).
struct TraceFrame {
  uint64_t ip = 0;
  std::string module;  // home path of the mapped file; "" if anonymous
  std::string symbol;  // "" when unknown
  uint64_t offset = 0;
};

// One trapped call.
struct TraceRecord {
  int32_t pid = 0;  // as the job sees it (home pid)
  int32_t tid = 0;  // as the job sees it (home tid)
  uint32_t node = 0;
  uint32_t homeNode = 0;
  std::vector<TraceFrame> stack;  // -k: the guest's stack at the trap, innermost first
  int nr = 0;
  uint64_t args[6] = {};
  TracePayload payloads[6];
  int64_t result = 0;  // >= 0, or -errno
  TraceRoute route = TraceRoute::FORWARDED;
  uint64_t startNs = 0;        // CLOCK_REALTIME of the trap, ns since the epoch
  uint32_t totalUs = 0;        // trap to answer
  uint32_t homeUs = 0;         // at home (forwarded calls)
  uint32_t transitUs = 0;      // totalUs - homeUs
  bool resultUnknown = false;  // the guest's kernel ran it (CONTINUE): shown as `= ?`

  bool failed() const { return !resultUnknown && result < 0 && result >= -4095; }
};

// How lines look (strace's options of the same letters).
struct TraceFormatOptions {
  size_t stringLimit = 32;  // -s: bytes of a buffer or string shown before `...`
  bool durations = false;   // -T: ` <0.000123>` after the result (trap to answer, seconds), and
                            // for forwarded calls ` (home 0.000100, transit 0.000023)`
  bool relative = false;    // -r: seconds since the previous line, before it
  int timestamps = 0;       // -t: 1 wall clock, 2 with microseconds (-tt), 3 epoch seconds (-ttt)
  bool prefix = true;       // `[pid TID node N ROUTE] ` before the call
  bool stacks = false;      // -k: after the line, the guest's stack as strace -k shows it
};

// Renders records into lines; keeps the previous timestamp for -r.
class TraceFormatter {
 public:
  explicit TraceFormatter(TraceFormatOptions options) : options_(options) {}

  // One line without the newline: [timestamp ][prefix ]name(args) = result[ <T>]; with
  // `stacks`, followed by the stackLines() (the last without its newline).
  std::string line(const TraceRecord& record);

  // The call and result alone, exactly as strace prints them: `name(args)`, padded with spaces to
  // column 39, ` = `, the result (`-1 ENOENT (No such file or directory)` for failures).
  std::string call(const TraceRecord& record) const;

 private:
  TraceFormatOptions options_;
  uint64_t previousNs_ = 0;
};

// strace -k's lines for `record`'s stack, one per frame, each ending in a newline:
// ` > /lib/x86_64-linux-gnu/libc.so.6(write+0x14) [0x7f3c2a914350]` (`(+0x...)` without a symbol,
// `unexpected_backtracing_error` when the stack is empty).
std::string stackLines(const TraceRecord& record);

// `s` as strace quotes it: `"` ... `"` with \n \t \r \v \f \" \\ escapes, other bytes outside
// 0x20-0x7e in octal (3 digits when an octal digit follows), cut to `limit` bytes and followed by
// `...` when `s` is longer than the limit or `truncated` says it was cut already.
std::string quoteString(std::string_view s, size_t limit, bool truncated);

// "ENOENT", "ERESTARTSYS", ...; "E<n>" for unknown numbers.
std::string errnoName(int err);
// "SIGTERM", "SIGRTMIN+3", ...
std::string signalName(int sig);

// Which calls to show: strace's `-e trace=` and `-Z/--failed`.
class TraceFilter {
 public:
  // Everything.
  TraceFilter() = default;

  // `spec` is strace's `trace=` list: syscall names and classes (`file`, `%file`, `network`,
  // `process`, `signal`, `desc`, `memory`, `ipc`, `%clock`), comma separated, `!` in front
  // negating the whole set, `all`/`none`. A leading `trace=` is accepted. Throws
  // std::invalid_argument "invalid system call 'NAME'" for names that are neither.
  static TraceFilter parse(std::string_view spec);

  void setFailedOnly(bool failedOnly) { failedOnly_ = failedOnly; }
  bool failedOnly() const { return failedOnly_; }

  bool wantsSyscall(int nr) const;
  bool accepts(const TraceRecord& record) const;
  // The syscall numbers wanted, for TraceFilter.syscalls of the wire; empty for all.
  std::vector<int32_t> syscalls() const;

 private:
  bool all_ = true;
  bool negate_ = false;
  std::set<int> nrs_;
  bool failedOnly_ = false;
};

// `-c`: calls, errors and latency per syscall and per route.
class TraceSummary {
 public:
  void add(const TraceRecord& record);
  // strace -c's table (% time, seconds, usecs/call, calls, errors, syscall; sorted by time), then
  // one per route (calls, errors, seconds, usecs/call, home and transit usecs/call).
  std::string render() const;
  uint64_t calls() const { return calls_; }

 private:
  struct Row {
    uint64_t calls = 0, errors = 0, totalUs = 0, homeUs = 0, transitUs = 0;
  };
  std::map<std::string, Row> bySyscall_;
  std::map<TraceRoute, Row> byRoute_;
  uint64_t calls_ = 0;
};

}  // namespace mos
