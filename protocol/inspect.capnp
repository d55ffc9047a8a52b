@0xb7a4c2e19f3d5a61;
# Deputy inspection (issue 7, `mps -d`): what Node.inspectJob and Node.inspectGuest (node.capnp)
# answer. Ordinals are append-only.
#
# Where the facts come from (docs/design.md, "Inspection"): nothing asks the deputy anything. The
# deputy and the supervisor keep counters in their job records (runtime/job_registry.h,
# JobStats: relaxed atomics in a shared-mapped file of the run dir, written only by their owner),
# and mosd, which runs as root on the same node, reads those records and the deputy's /proc
# entry. So a deputy blocked in a forwarded call (a read of an empty pipe) answers as well as an
# idle one, and the deputy holds no extra descriptor, thread or socket for inspection.
#
# Units: times are CLOCK_REALTIME nanoseconds since the epoch (…Ns) or microseconds (…Us);
# sizes are bytes.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("mos::proto");

struct FdInfo {
  # One descriptor of the job's home process, as the home kernel sees it.
  fd @0 :Int32;
  target @1 :Data;        # readlink(/proc/PID/fd/N): a path, "pipe:[123]", "socket:[456]", ...
  flags @2 :UInt32;       # /proc/PID/fdinfo/N "flags" (open(2) flags, octal there; O_CLOEXEC
                          # included)
  offset @3 :UInt64;      # /proc/PID/fdinfo/N "pos"
  deputy @4 :Bool;        # one of the deputy's own descriptors (the job channel, its log): the
                          # job never sees it (it is hidden from the job's /proc/self/fd)
}

struct CallInFlight {
  # A forwarded call the deputy is executing at home now.
  tid @0 :Int32;          # the thread as the job sees it (home tid)
  nr @1 :Int32;           # x86-64 syscall number
  name @2 :Text;          # its name in the syscall table
  args @3 :List(UInt64);  # the six raw arguments as the deputy runs them (pointers are the
                          # deputy's copies of the buffers)
  startNs @4 :UInt64;     # when it began
  elapsedUs @5 :UInt64;   # how long it has run when mosd answered
}

struct RouteStats {
  route @0 :Text;         # "forwarded", "emulated", "localAnswer", "denied" (TraceRoute names);
                          # "home" for the deputy's own execution time
  calls @1 :UInt64;
  totalUs @2 :UInt64;     # sum of latencies: trap to answer on the remote node; the time
                          # executing for "home"
  maxUs @3 :UInt64;
}

struct Signals {
  # Signal sets of the home process (/proc/PID/status), bit (n-1) for signal n.
  pending @0 :UInt64;     # SigPnd | ShdPnd
  blocked @1 :UInt64;     # SigBlk
  ignored @2 :UInt64;     # SigIgn
  caught @3 :UInt64;      # SigCgt
}

struct GuestView {
  # The remote side of a job process: its supervisor's record on the node where it runs.
  found @0 :Bool;         # false: no record of that process here (a child of a fork has none
                          # yet, or it left); the other fields are then zero
  node @1 :UInt32;
  remotePid @2 :Int32;    # the guest's pid on that node
  routes @3 :List(RouteStats);   # the four trace routes
  cacheHits @4 :UInt64;   # files found in the node's content cache (no transfer)
  cacheMisses @5 :UInt64; # files fetched from home into the cache
  cacheBytes @6 :UInt64;  # bytes fetched into the cache
  bytesIn @7 :UInt64;     # job-channel bytes the supervisor received (replies, file data)
  bytesOut @8 :UInt64;    # job-channel bytes it sent (requests, JobStart with the image)
  stayReason @9 :Text;    # "" when none is recorded
  sinceNs @10 :UInt64;    # when the guest started there
}

struct DeputyView {
  # The deputy's view of one job process (Node.inspectJob on its home node).
  error @0 :Text;         # non-empty: no such job process here (then nothing else is set)
  homePid @1 :Int32;
  homeNode @2 :UInt32;
  command @3 :Text;
  state @4 :Text;         # "home", "migrating", "remote", "exited"
  node @5 :UInt32;        # where the user part runs (homeNode when at home)
  sinceNs @6 :UInt64;     # since when it runs there
  remotePid @7 :Int32;
  cwd @8 :Data;           # readlink(/proc/PID/cwd)
  fds @9 :List(FdInfo);   # ascending
  signals @10 :Signals;
  inFlight @11 :List(CallInFlight);
  home @12 :RouteStats;   # calls executed at home: count, time spent executing
  syscalls @13 :UInt64;   # forwarded calls answered so far
  bytesIn @14 :UInt64;    # job-channel bytes the deputy received (requests)
  bytesOut @15 :UInt64;   # job-channel bytes it sent (replies, signals, file data)
  stayReason @16 :Text;   # why it cannot migrate now: "" when none is recorded
}
