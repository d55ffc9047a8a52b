#pragma once
// Test harness shared by the deputy's in-process tests: a Deputy over one end of a socketpair,
// driven with hand-built SyscallRequests (slots, out-buffers, pointer fixups) from the other.

#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <capnp/message.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "deputy.h"

namespace mos::deputy::testing {

constexpr const char* JOB_EXE = "/usr/local/bin/the-job";

// An out-buffer of a request: argument or auxiliary slot, size in bytes, trimmed to ret or not.
struct OutSpec {
  int slot;
  uint32_t size;
  bool trimToRet = false;
};

// A pointer fixup: the home address of buffer `target` goes at byte `offset` of buffer `into`.
struct PointerSpec {
  int into;
  uint32_t offset;
  int target;
};

struct Request {
  int nr = 0;
  std::vector<uint64_t> args;
  std::vector<std::pair<int, std::string>> in;  // slot, bytes
  std::vector<OutSpec> out;
  std::vector<PointerSpec> pointers;
};

// A deputy over one end of a socketpair, driven in this process.
struct Harness {
  ReservedFds fds;
  kj::Own<Deputy> deputy;
  kj::Own<Channel> peer;
  uint64_t seq = 1;

  Harness() {
    int sv[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    int high = fds.moveHigh(sv[0]);
    DeputyOptions options;
    options.node = 2;
    options.homeNode = 1;
    options.jobExe = JOB_EXE;
    deputy = kj::heap<Deputy>(options, fds, kj::heap<Channel>(kj::AutoCloseFd(high)));
    peer = kj::heap<Channel>(kj::AutoCloseFd(sv[1]));
  }

  // The deputy's channel descriptor: one of its reserved fds.
  int reservedFd() { return deputy->channel().fd(); }

  kj::Own<capnp::MessageReader> run(const Request& call) {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<proto::ToDeputy>().initSyscall();
    request.setSeq(seq);
    request.setNr(call.nr);
    auto args = request.initArgs(6);
    for (size_t i = 0; i < call.args.size(); i++) {
      args.set(i, call.args[i]);
    }
    auto in = request.initIn(call.in.size());
    for (size_t i = 0; i < call.in.size(); i++) {
      in[i].setArg(call.in[i].first);
      in[i].setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(call.in[i].second.data()),
                                 call.in[i].second.size()));
    }
    auto out = request.initOut(call.out.size());
    for (size_t i = 0; i < call.out.size(); i++) {
      out[i].setArg(call.out[i].slot);
      out[i].setSize(call.out[i].size);
      out[i].setTrimToRet(call.out[i].trimToRet);
    }
    auto pointers = request.initPointers(call.pointers.size());
    for (size_t i = 0; i < call.pointers.size(); i++) {
      pointers[i].setInto(call.pointers[i].into);
      pointers[i].setOffset(call.pointers[i].offset);
      pointers[i].setTarget(call.pointers[i].target);
    }
    deputy->handle(message.getRoot<proto::ToDeputy>().asReader());
    auto reply = peer->receive();
    KJ_IF_MAYBE (r, reply) {
      auto root = (*r)->getRoot<proto::ToRemote>();
      REQUIRE(root.isReply());
      REQUIRE(root.getReply().getSeq() == seq);
      seq++;
      return kj::mv(*r);
    }
    FAIL("no reply");
    return {};
  }

  int64_t ret(const Request& call) {
    return run(call)->getRoot<proto::ToRemote>().getReply().getRet();
  }
};

proto::SyscallReply::Reader replyOf(kj::Own<capnp::MessageReader>& m) {
  return m->getRoot<proto::ToRemote>().getReply();
}

}  // namespace mos::deputy::testing
