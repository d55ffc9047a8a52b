@0xd954fe0036eb34b6;
# The migration stream (design decision 9): what libmigrate's captureImage() writes and
# restoreImage() reads, for a checkpoint file and for every move to a node (JobStart.imageStreamed, job.capnp).
# The byte layout around these messages is documented in protocol/migration.md:
#
#   stream := MAGIC  header  frame*  end
#   MAGIC  := the 8 bytes "UMOSIMG\n"
#   header := one Cap'n Proto message (standard framing, unpacked): ImageHeader
#   frame  := one Cap'n Proto message Frame{pages} followed by pages*4096 raw bytes
#   end    := one Cap'n Proto message Frame{end}; nothing may follow it in a file
#
# Nothing of the stream is ever held whole in memory: the header describes the process, the
# page runs follow in address order, each page once. Ordinals are append-only; `version` changes
# only when a reader of an older version would restore a wrong process from a newer stream.
#
# Units: addresses and sizes in bytes, pages of 4096 bytes, times in microseconds.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("mos::proto");

using Image = import "image.capnp";

const migrationVersion :UInt32 = 1;

struct SigAction {
  # One disposition as rt_sigaction(2) returns it in the kernel's layout (struct
  # kernel_sigaction: handler, flags, restorer, mask). SIG_DFL entries are not recorded.
  signo @0 :UInt32;
  handler @1 :UInt64;    # SIG_IGN is 1
  flags @2 :UInt64;      # SA_* including SA_RESTORER
  restorer @3 :UInt64;
  mask @4 :UInt64;       # bit (n-1) for signal n
}

struct PendingSignal {
  # One queued signal with its siginfo (PTRACE_PEEKSIGINFO), re-queued on restore with
  # rt_tgsigqueueinfo (thread) or rt_sigqueueinfo (process), in the order it was queued.
  shared @0 :Bool;       # process-wide queue (PTRACE_PEEKSIGINFO_SHARED)
  siginfo @1 :Data;      # the 128-byte siginfo_t
}

struct TimerValue {
  # struct itimerval (getitimer(2)); both zero: disarmed.
  intervalUs @0 :UInt64;
  valueUs @1 :UInt64;
}

struct Thread {
  # One task of the process (single-threaded processes: exactly one).
  tid @0 :Int32;             # the id the job sees
  regs @1 :Data;             # struct user_regs_struct (NT_PRSTATUS), fs_base/gs_base included,
                             # with the syscall-restart and rseq-abort fixups applied: resuming
                             # at these registers re-issues an interrupted call
  xstate @2 :Data;           # NT_X86_XSTATE, XSAVE layout of the source CPU
  sigBlocked @3 :UInt64;     # bit (n-1) for signal n
  pending @4 :List(PendingSignal);   # this thread's queue (shared ones are in the process)
  altStackSp @5 :UInt64;     # sigaltstack(2): ss_sp, ss_flags, ss_size
  altStackFlags @6 :UInt32;
  altStackSize @7 :UInt64;
  rseqAddr @8 :UInt64;       # rseq(2) registration (PTRACE_GET_RSEQ_CONFIGURATION), 0: none
  rseqSize @9 :UInt32;
  rseqSignature @10 :UInt32;
  robustListHead @11 :UInt64;  # get_robust_list(2), 0: none
  robustListLen @12 :UInt64;
  tidAddress @13 :UInt64;    # set_tid_address(2), read with prctl(PR_GET_TID_ADDRESS); 0: none
  tidAddressKnown @14 :Bool; # false when this kernel cannot tell (no CONFIG_CHECKPOINT_RESTORE)
}

struct OpenFile {
  # One descriptor of the job's fd table, as a checkpoint resumes it: by path and offset.
  fd @0 :Int32;
  kind @1 :Kind;
  path @2 :Data;             # readlink(/proc/PID/fd/N), raw bytes ("pipe:[123]" for a pipe)
  flags @3 :UInt32;          # open flags from fdinfo (access mode, O_APPEND, O_NONBLOCK...)
  closeOnExec @4 :Bool;
  offset @5 :Int64;          # fdinfo pos, bytes
  dev @6 :UInt64;            # identity of the file when it was captured
  ino @7 :UInt64;             # for a pipe: the pipe's inode, shared by its two ends
  unread @8 :UInt32;          # pipe: bytes queued in it when captured (FIONREAD)
  pipeData @9 :Data;          # pipe, read end, both ends the process's own: those queued bytes
                              # (read out by injection and written back at capture), written
                              # into the recreated pipe on restore
  pipeSize @10 :UInt32;       # pipe: its capacity in bytes (F_GETPIPE_SZ), 0 if unknown;
                              # restored with F_SETPIPE_SZ

  enum Kind {
    regular @0;              # reopened by path, checked by identity, seeked to offset
    directory @1;            # reopened by path
    device @2;               # character device: reopened by path (/dev/null, a tty)
    pipe @3;                 # recreated when both ends are the process's own, with its bytes;
                             # otherwise its other end belongs to another process: cannot
    socket @4;               # cannot be reopened
    other @5;                # anon inodes (eventfd, epoll, signalfd, timerfd...): cannot
  }
}

struct Cpu {
  # What the image's register state needs of the CPU that resumes it.
  xsaveFeatures @0 :UInt64;  # XCR0 bits in use (xstate bytes 464..471); the destination's
                             # XCR0 must cover them, or restore is refused
  xsaveSize @1 :UInt32;      # bytes of the NT_X86_XSTATE buffer
}

struct ImageHeader {
  version @0 :UInt32;        # migrationVersion of the writer
  arch @1 :Text;             # "x86_64"
  kernelRelease @2 :Text;    # uname -r of the source node, informative
  capturedAtNs @3 :Int64;    # CLOCK_REALTIME at capture
  sourcePid @4 :Int32;       # the process as its node saw it
  command @5 :Text;          # /proc/PID/comm
  argv @6 :List(Data);       # /proc/PID/cmdline, informative
  exe @7 :Image.FileRef;     # /proc/PID/exe
  cpu @8 :Cpu;

  mappings @9 :List(Image.Mapping);  # every VMA of /proc/PID/maps, in address order
  mm @10 :Image.MmLayout;    # includes brk
  auxv @11 :Data;
  threads @12 :List(Thread);

  sigActions @13 :List(SigAction);
  pending @14 :List(PendingSignal);  # the process-wide queue
  timerReal @15 :TimerValue;  # ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF
  timerVirtual @16 :TimerValue;
  timerProf @17 :TimerValue;
  personality @18 :UInt32;
  umask @19 :UInt32;
  cwd @20 :Data;
  files @21 :List(OpenFile);

  pageCount @22 :UInt64;     # pages the frames below carry in all (sum of Frame.pages.count)
  pagesUnhashed @23 :Bool;   # the end frame's digest leaves out the pages' own bytes (it covers
                             # MAGIC, this header and every frame message): a live move between
                             # nodes, whose pages TCP carries and the source sends straight from
                             # the process's memory. Never set in a checkpoint file.
}

struct Frame {
  union {
    pages :group {
      # `count` pages starting at `start` follow this message as raw bytes. Runs never cross a
      # mapping boundary, come in increasing address order and never overlap.
      start @0 :UInt64;
      count @1 :UInt32;
    }
    end :group {
      # The last message of a stream. `digest` is XXH3-128 (xxHash, canonical big-endian
      # bytes) of every byte of the stream before this message, MAGIC included (without the
      # pages' bytes when the header says pagesUnhashed).
      runs @2 :UInt64;
      pages @3 :UInt64;
      digest @4 :Data;
    }
  }
}
