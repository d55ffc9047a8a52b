@0xdaf5519545c4aa4b;
# Parts of the migration image shared by protocol/migration.capnp (the stream: one format for
# every direction, design decision 9) and job.capnp (FileRef). The first, one-message image
# (MigrationImage, PageRun, ThreadState) is gone: the stream replaced it. Ordinals are
# append-only.
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
