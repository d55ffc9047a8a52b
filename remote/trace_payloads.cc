#include "trace_payloads.h"

#include <algorithm>
#include <cstring>

namespace mos::remote {

void traceRequestPayloads(TraceCall& trace, const ArgSpec (&specs)[6], const uint64_t (&args)[6],
                          proto::SyscallRequest::Reader request) {
  for (auto in : request.getIn()) {
    uint8_t arg = in.getArg();
    if (arg >= 6) {
      continue;  // an auxiliary slot (sendmsg's parts)
    }
    auto data = in.getData();
    const ArgSpec& spec = specs[arg];
    switch (spec.kind) {
      case ArgKind::PATH:
      case ArgKind::PATH_OR_NULL:
      case ArgKind::STRING: {
        auto text = data.size() > 0 ? data.slice(0, data.size() - 1) : data;  // the NUL
        trace.payload(arg, text, text.size());
        break;
      }
      case ArgKind::IN_BUF:
        trace.payload(arg, data, std::max<uint64_t>(args[spec.lenArg], data.size()));
        break;
      default: trace.payload(arg, data, data.size()); break;
    }
  }
}

void traceReplyPayloads(TraceCall& trace, const ArgSpec (&specs)[6],
                        proto::SyscallRequest::Reader request, proto::SyscallReply::Reader reply,
                        int64_t result) {
  if (result < 0) {
    return;  // nothing was written back
  }
  auto wanted = request.getOut();
  auto got = reply.getOut();
  for (unsigned i = 0; i < wanted.size() && i < got.size(); i++) {
    uint8_t arg = wanted[i].getArg();
    if (arg >= 6) {
      continue;
    }
    auto data = got[i];
    size_t n = data.size();
    const ArgSpec& spec = specs[arg];
    switch (spec.kind) {
      case ArgKind::OUT_BUF: n = std::min<uint64_t>(n, uint64_t(result)); break;
      case ArgKind::OUT_ARRAY: n = std::min<uint64_t>(n, uint64_t(result) * spec.size); break;
      case ArgKind::OUT_BUF_LENPTR:
        // The kernel's socklen (the lenArg's own out-buffer) says how much of the address is real.
        for (unsigned k = 0; k < wanted.size() && k < got.size(); k++) {
          if (wanted[k].getArg() == spec.lenArg && got[k].size() >= sizeof(uint32_t)) {
            uint32_t returned;
            memcpy(&returned, got[k].begin(), sizeof returned);
            n = std::min<size_t>(n, returned);
          }
        }
        break;
      default: break;
    }
    trace.payload(arg, data.slice(0, n), n);
  }
}

void traceExecStrings(TraceCall& trace, int pathArg, const std::string& path, bool isArgv,
                      const std::vector<std::string>& strings) {
  auto bytes = [](const std::string& s) {
    return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
  };
  if (isArgv) {
    trace.payload(pathArg, bytes(path), path.size());
    std::string joined;
    for (const std::string& s : strings) {
      joined += s;
      joined += '\0';
    }
    trace.payload(pathArg + 1, bytes(joined), joined.size());
  } else {
    uint32_t count = uint32_t(strings.size());
    trace.payload(pathArg + 2, kj::arrayPtr(reinterpret_cast<const kj::byte*>(&count), 4), 4);
  }
}

}  // namespace mos::remote
