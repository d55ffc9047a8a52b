#pragma once
// What a forwarded call's trace event shows of the memory its arguments point to (issue 7,
// docs/design.md "Tracing"): taken from the request and the reply the forwarding already built,
// never read from the guest again for tracing.

#include <cstdint>
#include <string>
#include <vector>

#include "job.capnp.h"
#include "syscall_table.h"
#include "trace_channel.h"

namespace mos::remote {

// The in-buffers of `request` (marshalRequest's, for the guest's `args` and the kinds `specs`)
// as payloads of `trace`: paths and strings without their NUL, an IN_BUF with the length the guest
// asked for (the request may carry less: MAX_FORWARD_BYTES), structs as sent.
// Preconditions: trace.active().
void traceRequestPayloads(TraceCall& trace, const ArgSpec (&specs)[6], const uint64_t (&args)[6],
                          proto::SyscallRequest::Reader request);

// The out-buffers of `reply` as payloads of `trace`, as far as they were written back into the
// guest for a call whose guest-visible result is `result` (unmarshalReply's rules: nothing on
// failure, `result` bytes of an OUT_BUF, `result` elements of an OUT_ARRAY, the rest whole). An
// in/out argument's payload becomes what was written back.
// Preconditions: trace.active().
void traceReplyPayloads(TraceCall& trace, const ArgSpec (&specs)[6],
                        proto::SyscallRequest::Reader request, proto::SyscallReply::Reader reply,
                        int64_t result);

// execve(2)/execveat(2) as strace shows them: the path (argument `pathArg`), then for `isArgv`
// the argv strings, each with its NUL, as argument pathArg + 1's payload; else the number of
// environment strings as argument pathArg + 2's (4 bytes; trace_format shows `/* N vars */`).
// Preconditions: trace.active().
void traceExecStrings(TraceCall& trace, int pathArg, const std::string& path, bool isArgv,
                      const std::vector<std::string>& strings);

}  // namespace mos::remote
