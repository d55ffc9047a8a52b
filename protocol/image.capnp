@0xdaf5519545c4aa4b;
# The migration image: everything libmigrate captures of a process's user part, and everything it
# needs to rebuild that user part in a fresh stub on another node. One format for every direction
# (home→remote, remote→remote, remote→home, checkpoint file). Ordinals are append-only.
#
# Units: addresses and sizes are bytes; page runs are page aligned (4096 bytes on x86-64).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("mos::proto");

struct FileRef {
  # Identity of a file on the node where the image was captured (the home node for a job).
  # The remote content cache is keyed by (homeNode, dev, ino, size, mtimeNs).
  path @0 :Data;       # absolute path as the source node resolved it; raw bytes, no trailing NUL
  dev @1 :UInt64;      # st_dev
  ino @2 :UInt64;      # st_ino
  size @3 :UInt64;     # st_size, bytes
  mtimeNs @4 :Int64;   # st_mtim in nanoseconds since the epoch
  mode @5 :UInt32;     # st_mode (file type and permission bits)
}

struct Mapping {
  # One VMA as /proc/PID/maps shows it.
  start @0 :UInt64;
  end @1 :UInt64;        # exclusive
  prot @2 :UInt32;       # PROT_READ | PROT_WRITE | PROT_EXEC
  shared @3 :Bool;       # MAP_SHARED (a first cut refuses to migrate shared writable file maps)
  kind @4 :Kind;
  file @5 :FileRef;      # kind == file
  offset @6 :UInt64;     # kind == file: file offset of `start`, bytes
  name @7 :Text;         # the maps path column, informative ("[stack]", "/usr/bin/python3.11")

  enum Kind {
    anonymous @0;
    file @1;
    stack @2;
    heap @3;
    vdso @4;
    vvar @5;
    vvarVclock @6;
    vsyscall @7;         # never restored: the kernel provides it
  }
}

struct PageRun {
  # Captured bytes of a contiguous range inside one mapping. Pages not covered by a run are
  # either zero (anonymous) or the file's own content (file mappings).
  start @0 :UInt64;
  data @1 :Data;         # length is a multiple of the page size
}

struct ThreadState {
  tid @0 :Int32;         # the id the job sees (a home tid)
  regs @1 :Data;         # struct user_regs_struct as PTRACE_GETREGSET NT_PRSTATUS returns it
                         # (includes fs_base and gs_base)
  xstate @2 :Data;       # the NT_X86_XSTATE buffer (XSAVE layout of the source CPU)
  sigBlocked @3 :UInt64; # blocked mask, bit (n-1) for signal n
  rseqAddr @4 :UInt64;   # registered struct rseq (rseq(2)), 0 if none
                         # (PTRACE_GET_RSEQ_CONFIGURATION); restore re-registers it
  rseqSize @5 :UInt32;   # its registered length, bytes
  rseqSignature @6 :UInt32;  # the abort signature it was registered with
}

struct MmLayout {
  # The mm fields of /proc/PID/stat that PR_SET_MM_MAP restores (prctl(2)).
  startCode @0 :UInt64;
  endCode @1 :UInt64;
  startData @2 :UInt64;
  endData @3 :UInt64;
  startBrk @4 :UInt64;
  brk @5 :UInt64;
  startStack @6 :UInt64;
  argStart @7 :UInt64;
  argEnd @8 :UInt64;
  envStart @9 :UInt64;
  envEnd @10 :UInt64;
}

struct MigrationImage {
  arch @0 :Text;             # "x86_64"
  kernelRelease @1 :Text;    # uname -r of the source node, informative
  mappings @2 :List(Mapping);
  pages @3 :List(PageRun);
  threads @4 :List(ThreadState);   # first cut: exactly one
  mm @5 :MmLayout;
  auxv @6 :Data;             # raw /proc/PID/auxv (pairs of UInt64)
  sigIgnored @7 :UInt64;     # dispositions that are SIG_IGN, bit (n-1) for signal n
  exe @8 :FileRef;           # /proc/PID/exe
  command @9 :Text;          # /proc/PID/comm
  argv @10 :List(Data);      # /proc/PID/cmdline split at NULs, informative (mps)
}
