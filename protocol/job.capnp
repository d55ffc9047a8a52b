@0xe936ed4ca2d8a0d2;
# The job channel: one TCP connection per job between its deputy (home node) and its supervisor
# (remote node). It carries framed Cap'n Proto messages (capnp::writeMessage, unpacked), not RPC:
# each forwarded syscall is exactly one ToDeputy message and one ToRemote message, which is the
# floor the design brief sets (docs/design.md, "the job channel").
#
# A connection to mosd starts with an 8-byte hello that selects the service:
#   "UMOSRPC1"  Cap'n Proto two-party RPC, bootstrap interface Node (node.capnp)
#   "UMOSJOB1"  a job channel: the deputy then sends one JobStart, and the supervisor answers
#               with ToDeputy messages from then on.
# Between the hello and the service, the client proves cluster membership (runtime/cluster_auth.h,
# DESIGN.md decision 10); raw bytes, not Cap'n Proto:
#   mosd -> client  nonce   32 random bytes
#   client -> mosd  proof   HMAC-SHA256(cluster key, hello || nonce || id) (32 bytes) || id, where
#                           id is the client's node id, 4 bytes big-endian
#   mosd -> client  accept  1 byte 0x01; on refusal mosd closes the connection instead
# mosd checks that id is a map node whose address is the peer's, and the MAC. 5 s for it all.
# Ordinals are append-only.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("mos::proto");

using Image = import "image.capnp";

using Errno = UInt16;  # 0 on success; guest-visible failures travel here, never as exceptions
using Fd = Int32;      # a descriptor number in the job's home fd table

struct Ids {
  # Identity that the supervisor answers from this cache without a round trip (design
  # decision 4). Every id is a home id.
  pid @0 :Int32;
  tid @1 :Int32;
  uid @2 :UInt32;
  euid @3 :UInt32;
  gid @4 :UInt32;
  egid @5 :UInt32;
}

struct JobStart {
  # First message deputy → supervisor, after the "UMOSJOB1" hello.
  homeNode @0 :UInt32;
  ids @1 :Ids;
  obsoleteImage @2 :AnyPointer;
  # Was the one-message image (image.capnp MigrationImage, gone): never set; the image is the
  # migration stream after this message (`imageStreamed`).
  command @3 :Text;        # for logs and mps
  imageStreamed @4 :Bool;
  # The job's migration stream (protocol/migration.md, the same bytes as a checkpoint file)
  # follows this message on the channel as raw bytes, in two parts: MAGIC and the header at
  # once; the frames and the end frame when the supervisor asks with ToDeputy.sendImage, after
  # it has fetched the image's files (FetchFile round trips need the channel free of pages).
  # The supervisor restores the guest as the frames arrive; nothing holds the whole stream.
}

struct Buffer {
  # An input buffer: argument `arg` points at home to a copy of `data`.
  # Slots: `arg` 0..5 is a syscall argument; 6..15 is an auxiliary buffer that no argument names,
  # reached only through a Pointer (the iovecs, name and control data of a msghdr).
  arg @0 :UInt8;
  data @1 :Data;
}

struct OutBuf {
  # An output buffer: argument `arg` points at home to `size` bytes, zero filled, or to the
  # `data` of the in-buffer with the same `arg` when there is one (in/out arguments), extended
  # with zeros to `size`. The reply returns its bytes.
  # `arg` is a slot as in Buffer (0..5 an argument, 6..15 auxiliary).
  arg @0 :UInt8;
  size @1 :UInt32;
  trimToRet @2 :Bool;      # the reply carries only the first max(ret, 0) bytes (the data a
                           # recvmsg received); otherwise the row's kind decides (SyscallReply)
}

struct Pointer {
  # A pointer inside a buffer: before the call, the deputy writes the home address of buffer
  # `target` (its OutBuf blob when it has one, else its in copy) as a 64-bit value at byte
  # `offset` of buffer `into` (the one the kernel sees: its OutBuf blob, else its in copy).
  # A pointer outside `into`, or naming a slot without a buffer, makes the request malformed
  # (the reply is -EINVAL). Used for msghdr (sendmsg, recvmsg); meant for ioctls with pointers.
  into @0 :UInt8;          # slot of the buffer written into
  offset @1 :UInt32;       # bytes; offset + 8 <= that buffer's size
  target @2 :UInt8;        # slot of the buffer whose home address is written
}

struct SyscallRequest {
  # A forwarded syscall: the deputy executes `nr` with `args`, after replacing every argument
  # named by a Buffer or OutBuf with a pointer to its home copy.
  seq @0 :UInt64;          # the seccomp notification id; echoed in the reply
  nr @1 :Int32;            # x86-64 __NR_*
  args @2 :List(UInt64);   # exactly 6
  in @3 :List(Buffer);
  out @4 :List(OutBuf);
  pointers @5 :List(Pointer);  # applied after every buffer exists, in order
}

struct ExecRequest {
  # execve(2)/execveat(2) of the guest: performed at home by the deputy (design decision 2).
  # Success replaces the deputy, so the only reply is a SyscallReply on failure.
  seq @0 :UInt64;
  dirfd @1 :Fd;            # AT_FDCWD for execve
  path @2 :Data;
  argv @3 :List(Data);
  envp @4 :List(Data);
  flags @5 :Int32;         # execveat flags
  sigIgnored @6 :UInt64;   # the guest's SIG_IGN set, bit (n-1) for signal n: kept across exec
  sigBlocked @7 :UInt64;   # the guest's blocked mask: kept across exec
}

struct FetchFile {
  # Ask the deputy for a file's identity and, if wanted, its bytes (the remote content cache,
  # design decision 6). Exactly one of fd >= 0 or a non-empty path is used.
  id @0 :UInt64;
  fd @1 :Fd;               # -1 when `path` is used
  path @2 :Data;
  wantData @3 :Bool;
}

struct ForkRequest {
  # fork/vfork/clone of a process in the guest (design decision 3; docs/design.md, "Fork
  # mirroring"): the deputy forks. The parent deputy replies a SyscallReply with `seq` whose ret
  # is the child's home pid (or -errno). The child deputy opens its own job channel: a TCP
  # connection to `port` at the node's address (the job's supervisor listens there), on which it
  # sends the 8-byte hello "UMOSCHLD", then `token` (32 bytes, fresh per fork, known only to this
  # channel's ends) and its home pid (4 bytes, little-endian); from then on it is a job channel
  # of the child guest, without JobStart and `started`.
  seq @0 :UInt64;
  port @1 :UInt16;
  token @2 :Data;
  thread @3 :Bool;
  # clone with CLONE_THREAD (docs/design.md, "Threads"): the deputy starts a thread instead of
  # forking. The reply's ret is the new thread's home tid; the thread opens the channel as a
  # child does and sends its tid in the pid's place; it serves the guest thread made at that tid.
  tid @4 :Int32;
  # With `thread`, > 0: the home tid the deputy thread must have (a thread of a process that moved
  # here with its threads, restored at its home tid: docs/design.md, "Migration of a running
  # process", threads). The deputy waits until that tid is free at home (a deputy thread of the
  # previous node may still hold it), then creates the thread there (ns_last_pid); ret is -EBUSY
  # when it could not.
}

struct GuestExit {
  # The guest ended. The deputy ends the same way: exit(status) or death by `signal`.
  status @0 :Int32;        # exit status when signal == 0
  signal @1 :Int32;
  coreDumped @2 :Bool;
}

struct ToDeputy {
  union {
    syscall @0 :SyscallRequest;
    exec @1 :ExecRequest;
    fetchFile @2 :FetchFile;
    exit @3 :GuestExit;
    started @4 :Int32;     # the guest runs; value: its pid on the remote node (for mps, tests)
    failed @5 :Text;       # the supervisor could not start or continue the guest; ends the job
    stopped @6 :Int32;     # the guest entered a group stop by this signal (job control)
    continued @7 :Void;    # the guest left a group stop
    fork @8 :ForkRequest;
    childDisposition @9 :UInt8;
    # The guest set SIGCHLD's disposition: 0 a handler or SIG_DFL, 1 SIG_IGN, 2 SA_NOCLDWAIT
    # (with a handler or SIG_DFL). The deputy sets its own likewise, so the home kernel reaps
    # the job's children itself exactly when the guest's kernel would (wait(2), NOTES).
    sendImage @10 :Void;
    # After JobStart.imageStreamed: the supervisor has the header and every file it names;
    # the deputy sends the rest of the migration stream (frames, end) as raw bytes now.

    # A live move of the guest home (ToRemote.move; docs/design.md, "Migration of a running
    # process"). After a move request the supervisor answers with either `moveRefused` (nothing
    # changed: the guest runs on here) or the migration stream of the stopped guest in
    # `moveImage` chunks (the bytes of protocol/migration.md, in order, at most 1 MiB each)
    # followed by `moveImageEnd`. Syscall requests of the guest may still come before either.
    # The deputy then answers ToRemote.moveCommit or moveAbort; after a commit the supervisor
    # kills the guest, sends `moved` and ends; after an abort the guest runs on here.
    moveRefused @11 :Text;       # why the guest cannot move (threads, node-local objects...)
    moveImage @12 :Data;         # the next bytes of the migration stream
    moveImageEnd @13 :UInt64;    # the stream is complete: its length in bytes
    moved @14 :Void;             # the guest is gone from this node: the job is the deputy's now
    comeHome @15 :Text;
    # The guest needs what only home can give (the reason: "it maps a file shared and writable"):
    # the deputy starts a move home as for `migrate PID home` and answers ToRemote.move, or
    # ToRemote.moveAbort(why not) when the job cannot move (locked, threads, a move under way).
  }
  stoppedAfterContinues @16 :UInt32;
  # With `stopped`: how many SIGCONT (ToRemote.signal, not signalThread) this channel's
  # supervisor had received when it saw the stop. The deputy has sent more when a fg/bg at home
  # came after the stop: a SIGCONT on its way continues the guest, so the deputy must not stop.
}

struct SyscallReply {
  seq @0 :UInt64;
  ret @1 :Int64;           # the raw syscall result: >= 0, or -errno
  out @2 :List(Data);      # the OutBufs, same order as the request; trimmed to what the call wrote
                           # when the row says so, else full size
  interrupted @3 :Bool;    # a signal interrupted the deputy's call (ret is -EINTR); the
                           # supervisor decides whether the guest sees EINTR or a restart
  homeNs @4 :UInt64;       # nanoseconds the call took at home (CLOCK_MONOTONIC around the
                           # deputy's syscall, or its fork): what tracing reports as the time
                           # at home; 0 when nothing was executed (a refused request)
}

struct FileInfo {
  id @0 :UInt64;
  err @1 :Errno;
  ref @2 :Image.FileRef;
}

struct FileData {
  id @0 :UInt64;
  offset @1 :UInt64;
  data @2 :Data;           # at most 1 MiB per message
  last @3 :Bool;
}

struct MoveRequest {
  # `migrate PID home|NODE|checkpoint` reached the deputy: stream the guest's image home.
  target @0 :UInt32;       # the destination node id; 0: the home node
  checkpoint @1 :Bool;     # only a checkpoint: the deputy writes the image to a file and
                           # answers moveAbort, so the guest runs on where it is
}

struct ToRemote {
  union {
    reply @0 :SyscallReply;
    signal @1 :Int32;      # a signal reached the job's home process: deliver it to the guest
    fileInfo @2 :FileInfo;
    fileData @3 :FileData;
    move @8 :MoveRequest;  # sent before the reply of a call the request interrupted
    moveCommit @9 :Void;   # the stream arrived whole and resumable: end the guest
    moveAbort @10 :Text;   # the home node cannot resume the stream (why): the guest runs on
  }
  # With `signal` SIGCHLD: si_pid and si_status of the home kernel's siginfo (the home child).
  signalPid @4 :Int32;
  signalStatus @5 :Int32;
  signalThread @6 :Bool;
  # With `signal`: the home kernel directed it at this channel's deputy thread (tgkill, tkill;
  # si_code SI_TKILL), so it is queued on this channel's guest thread; otherwise on the guest
  # process (any thread that does not block it takes it).
  signalInfo @7 :Data;
  # With `signal`: the home kernel's siginfo_t (128 bytes, x86-64) as the deputy's handler received
  # it (si_code, si_pid, si_uid, si_status, si_value...); the guest queues it on itself.
}
