#pragma once
// Deputy inspection (issue 7, mps -d; protocol/inspect.capnp): what mosd answers for
// Node.inspectJob and Node.inspectGuest, read from the job records of RUN_DIR
// (job_registry.h, JobStats) and, for a deputy, from its /proc entry. Nothing here talks to the
// deputy or the supervisor: they keep their counters in their records, and mosd (root, same
// node) reads them, so a deputy blocked in a forwarded call is inspected like an idle one.

#include <cstdint>
#include <string>

#include "inspect.capnp.h"

namespace mos {

// The deputy's view of job process `pid` whose home is this node (`nodeId`): its record
// RUN_DIR/jobs/<pid>, /proc/<pid>/{fd,fdinfo,cwd,status}. When there is no such job process,
// only view.error is set: "no process with pid 42", "process 42 is not a umosix job process (no
// job record on node 1)".
void inspectDeputy(const std::string& runDir, uint32_t nodeId, int32_t pid,
                   proto::DeputyView::Builder view);

// The remote side of job process `homePid` of node `homeNode` whose guest runs on this node
// (`nodeId`): its supervisor's record in RUN_DIR/guests. view.found is false without one.
void inspectGuest(const std::string& runDir, uint32_t nodeId, int32_t homePid, uint32_t homeNode,
                  proto::GuestView::Builder view);

// The trace route names, in JobStats::routes order.
inline constexpr const char* ROUTE_NAMES[] = {"forwarded", "emulated", "localAnswer", "denied"};

}  // namespace mos
