@0xc35f9ae36e908632;
# The node service: control-plane Cap'n Proto RPC served by every mosd (bootstrap interface of a
# connection that starts with the "UMOSRPC1" hello, see job.capnp). Tools (mps, mosrun's node
# check) and peers use it. Ordinals are append-only.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("mos::proto");

using Trace = import "trace.capnp";
using Inspect = import "inspect.capnp";

struct NodeStatus {
  nodeId @0 :UInt32;
  version @1 :Text;
  load @2 :Float64;        # 1-minute load average of the node
  guests @3 :UInt32;       # guests supervised on this node now
  cpus @4 :UInt32;
}

struct JobInfo {
  homePid @0 :Int32;       # the job's pid on its home node
  command @1 :Text;
  node @2 :UInt32;         # where the user part runs now (the home node id when at home)
  state @3 :Text;          # "home", "migrating", "remote", "exited"
  syscalls @4 :UInt64;     # forwarded syscalls so far
  remotePid @5 :Int32;     # the guest's pid on `node`, 0 when at home
  homeNode @6 :UInt32;     # the job's home node
  parentPid @7 :Int32;     # listJobs: the process's parent at home (its home kernel's); 0 unknown
  threads @8 :UInt32;      # threads of the process (listJobs: its home process; listGuests: the
                           # guest); 0 unknown
  stay @9 :Text;           # listGuests: why the guest stays on this node ("shares memory with
                           # 4250 (MAP_SHARED|MAP_ANONYMOUS)", "maps System V shm"); listJobs:
                           # the deputy's own reason ("locked by mosrun -L"); "" none
  moves @10 :UInt32;       # listJobs: how often the running user part moved to another node
                           # (migrate; a move home counts; an exec's trip home and back to the
                           # same node does not)
  trail @11 :List(UInt32); # listJobs: the nodes it has run on, oldest first (the last 16)
}

interface Node {
  status @0 () -> (status :NodeStatus);
  listJobs @1 () -> (jobs :List(JobInfo));
  # Jobs whose home is this node.
  listGuests @2 () -> (jobs :List(JobInfo));
  # Guests whose user part runs on this node now.
  traceJob @3 (homePid :Int32, homeNode :UInt32, filter :Trace.TraceFilter,
               sink :Trace.TraceSink) -> (subscription :Trace.TraceSubscription);
  # Subscribes `sink` to the calls of job `homePid` of node `homeNode` (0: this node) that are
  # trapped on this node (the job's guest runs here). Call it on the node where the job runs
  # (JobInfo.node); events flow until the subscription is dropped or the job leaves
  # (TraceSink.ended, not sent yet). A job whose guest has not arrived yet is traced from its
  # first call here (mosrun --trace subscribes before the job starts).
  inspectJob @4 (pid :Int32) -> (view :Inspect.DeputyView);
  # The deputy's view of job process `pid` of this node (mps -d): its record, fd table, cwd and
  # signals at home, the calls it is executing. view.error says why there is none ("no job
  # process with pid 42 has its home on node 1"). The remote numbers come from inspectGuest on
  # the node where it runs (view.node).
  inspectGuest @5 (homePid :Int32, homeNode :UInt32) -> (view :Inspect.GuestView);
  # The remote side of job process `homePid` of node `homeNode` whose guest runs on this node:
  # its supervisor's counters per route, content cache and channel bytes (view.found false when
  # this node has no record of it).
}
