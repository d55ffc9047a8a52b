@0xd1e4f6a3b2c58e17;
# The trace stream of forwarded system calls (issue 7): what `mostrace` and any other tool
# subscribes to. The supervisor that routes a guest's calls publishes one TraceEvent per trapped
# call to its node's mosd (runtime/trace_channel.h); mosd hands them to the subscribers of the
# job (Node.traceJob in node.capnp). Ordinals are append-only.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("mos::proto");

enum TraceRoute {
  forwarded @0;    # executed by the deputy at home, result written back into the guest
  emulated @1;     # answered by the supervisor without a round trip (ids from the cache)
  localAnswer @2;  # run or answered on the remote node (file-backed mmap from the content cache,
                   # the job's own /proc files)
  denied @3;       # refused by the syscall table; `result` is the errno the guest saw
}

struct ArgPayload {
  # The bytes an argument points to, as the supervisor already has them: never read from the
  # guest for tracing alone.
  arg @0 :UInt8;      # 0-5: which argument of the call
  data @1 :Data;      # a prefix of the bytes: paths and strings without their NUL, in-buffers
                      # as sent home, out-buffers and out-structs as written back after the reply
  length @2 :UInt64;  # how many bytes the argument holds in full (data may be shorter: the
                      # publisher keeps at most TraceFilter.payloadBytes of each)
}

struct StackFrame {
  # One frame of a guest's stack, unwound on the remote node from the trapped thread's
  # registers (remote/guest_stack.h) and symbolised from the ELF symbol tables of the job's own
  # files (the content cache's copies).
  ip @0 :UInt64;           # frame 0: the address after the syscall instruction; others: the
                           # return address into the frame
  module @1 :Data;         # the file mapped at ip, named by its home path; empty if anonymous
  symbol @2 :Text;         # the function symbol containing ip (gdb's choice among aliases);
                           # empty when none
  offset @3 :UInt64;       # ip minus the symbol's address, bytes
}

struct TraceEvent {
  homePid @0 :Int32;       # the process as the job sees it (its home pid)
  tid @1 :Int32;           # the thread as the job sees it (home tid; equals homePid when single)
  node @2 :UInt32;         # the node where the call was trapped (where the user part runs)
  homeNode @3 :UInt32;     # the job's home node
  nr @4 :Int32;            # x86-64 syscall number (runtime/syscall_table.h names it)
  args @5 :List(UInt64);   # the 6 raw argument registers, as trapped
  payloads @6 :List(ArgPayload);  # decoded argument contents, at most one per argument
  stack @17 :List(StackFrame);    # the guest's user-space call stack at the trap, innermost
                                  # first (mostrace -k); empty unless a subscriber of the job asked
                                  # for stacks (TraceFilter.stacks)
  result @7 :Int64;        # what the guest saw: >= 0, or -errno
  route @8 :TraceRoute;
  startNs @9 :UInt64;      # CLOCK_REALTIME of the trap on `node`, nanoseconds since the epoch
  totalUs @10 :UInt32;     # trap to answer, microseconds
  homeUs @11 :UInt32;      # time the deputy spent executing it at home, microseconds (0 unless
                           # forwarded)
  transitUs @12 :UInt32;   # totalUs minus homeUs: marshalling and the network, microseconds
  seq @13 :UInt64;         # per-publisher sequence number, from 1
  lost @14 :UInt64;        # events this publisher dropped so far (no room in mosd's socket)
  resultUnknown @15 :Bool; # the guest's own kernel ran the call after the supervisor let it
                           # continue (a file-backed mmap from the content cache, a signal the
                           # job sends itself): `result` is 0 and means nothing (strace's `?`)
  jobPid @16 :Int32;       # the job the event belongs to (the home pid Node.traceJob names): the
                           # job's first process, also for the events of its forked processes,
                           # whose own home pid is `homePid`; 0 from an older publisher: homePid
}

struct TraceFilter {
  syscalls @0 :List(Int32);  # syscall numbers to deliver; empty: all
  failedOnly @1 :Bool;       # only calls whose result is an error (strace -Z)
  payloadBytes @2 :UInt32;   # bytes of each payload wanted (strace -s); 0: the default, 32
  stacks @3 :Bool;           # the guest's stack at each call (mostrace -k, strace -k): the
                             # supervisor unwinds only while at least one subscriber asks
}

interface TraceSink {
  # Implemented by the subscriber. mosd calls it at most once at a time per subscription and
  # batches what arrives meanwhile (Cap'n Proto 0.9.2 has no `stream` flow control); when a
  # subscriber falls more than 4096 events behind, the oldest are dropped and counted.
  events @0 (events :List(TraceEvent), dropped :UInt64) -> ();
  # `dropped`: events mosd discarded for this subscriber since the previous call.
  ended @1 (reason :Text) -> ();
  # The job ended or left this node ("job 1234 exited", "job 1234 left node 2"); no more calls.
}

interface TraceSubscription {
  # Held by the subscriber: dropping it (or the connection) ends the subscription, and the
  # publisher's hot path goes back to one predictable branch once no subscriber is left.
  stats @0 () -> (delivered :UInt64, dropped :UInt64, queued :UInt64);
  # Reads every event the node's publishers have sent so far first, so `delivered + queued`
  # counts each event published before the call that this subscription will get: a subscriber
  # that knows the job has exited waits for that many, then detaches without losing the tail.
  # `delivered`: events in TraceSink.events calls that returned; `dropped`: events discarded for
  # falling behind; `queued`: accepted and not yet delivered (in flight or waiting).
}
