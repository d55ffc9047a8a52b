// Generic marshalling against a fake guest address space, and ProcessMemory against our own.

#include "marshal.h"

#include <asm/unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <capnp/message.h>
#include <catch2/catch.hpp>
#include <cstring>
#include <map>
#include <vector>

#include "fake_guest_memory.h"

using namespace mos;
using mos::testing::FakeMemory;

namespace {

const ArgSpec (&specsOf(int nr))[6] { return findSyscall(nr)->args; }

std::vector<uint8_t> bytes(const char* s) { return std::vector<uint8_t>(s, s + strlen(s) + 1); }

// A reply with `ret` and these out-buffers.
struct Reply {
  capnp::MallocMessageBuilder message;
  proto::SyscallReply::Builder b = message.initRoot<proto::SyscallReply>();
  Reply(int64_t ret, std::vector<std::vector<uint8_t>> outs) {
    b.setRet(ret);
    auto list = b.initOut(outs.size());
    for (size_t i = 0; i < outs.size(); ++i) {
      list.set(i, capnp::Data::Reader(outs[i].data(), outs[i].size()));
    }
  }
};

}  // namespace

TEST_CASE("a read of 10 bytes that returns 4 writes exactly 4 bytes", "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x1000, std::vector<uint8_t>(16, 0xee));
  const uint64_t args[6] = {5, 0x1000, 10, 0, 0, 0};
  capnp::MallocMessageBuilder m;
  auto req = m.initRoot<proto::SyscallRequest>();
  REQUIRE(marshalRequest(__NR_read, specsOf(__NR_read), args, mem, req) == 0);
  CHECK(req.getNr() == __NR_read);
  REQUIRE(req.getArgs().size() == 6);
  CHECK(req.getArgs()[0] == 5);
  CHECK(req.getArgs()[2] == 10);
  CHECK(req.getIn().size() == 0);
  REQUIRE(req.getOut().size() == 1);
  CHECK(req.getOut()[0].getArg() == 1);
  CHECK(req.getOut()[0].getSize() == 10);

  // The deputy returns the full buffer; only ret bytes may land.
  Reply reply(4, {{'a', 'b', 'c', 'd', 0, 0, 0, 0, 0, 0}});
  CHECK(unmarshalReply(__NR_read, specsOf(__NR_read), args, reply.b.asReader(), mem) == 4);
  REQUIRE(mem.writes.size() == 1);
  CHECK(mem.writes[0] == std::make_pair(uint64_t{0x1000}, size_t{4}));
  auto& guest = mem.at(0x1000);
  CHECK(std::string(guest.begin(), guest.begin() + 4) == "abcd");
  CHECK(guest[4] == 0xee);
  CHECK(guest[9] == 0xee);
}

TEST_CASE("a failed read writes nothing back", "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x1000, std::vector<uint8_t>(16, 0xee));
  const uint64_t args[6] = {5, 0x1000, 10, 0, 0, 0};
  Reply reply(-EBADF, {std::vector<uint8_t>(10, 0)});
  CHECK(unmarshalReply(__NR_read, specsOf(__NR_read), args, reply.b.asReader(), mem) == -EBADF);
  CHECK(mem.writes.empty());
}

TEST_CASE("a write from an unmapped buffer fails EFAULT without forwarding", "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x1000, std::vector<uint8_t>(16, 1));
  capnp::MallocMessageBuilder m;
  const uint64_t bad[6] = {1, 0x5000, 4, 0, 0, 0};
  CHECK(marshalRequest(__NR_write, specsOf(__NR_write), bad, mem,
                       m.initRoot<proto::SyscallRequest>()) == EFAULT);
  const uint64_t straddling[6] = {1, 0x1008, 16, 0, 0, 0};  // runs off the end of the region
  CHECK(marshalRequest(__NR_write, specsOf(__NR_write), straddling, mem,
                       m.initRoot<proto::SyscallRequest>()) == EFAULT);
  const uint64_t good[6] = {1, 0x1000, 16, 0, 0, 0};
  auto req = m.initRoot<proto::SyscallRequest>();
  REQUIRE(marshalRequest(__NR_write, specsOf(__NR_write), good, mem, req) == 0);
  REQUIRE(req.getIn().size() == 1);
  CHECK(req.getIn()[0].getArg() == 1);
  CHECK(req.getIn()[0].getData().size() == 16);
  CHECK(req.getOut().size() == 0);
}

TEST_CASE("a write to an unmapped out-buffer reads as EFAULT", "[runtime][marshal]") {
  FakeMemory mem;
  const uint64_t args[6] = {5, 0x9000, 10, 0, 0, 0};
  Reply reply(3, {{'x', 'y', 'z'}});
  CHECK(unmarshalReply(__NR_read, specsOf(__NR_read), args, reply.b.asReader(), mem) == -EFAULT);
}

TEST_CASE("buffers are capped at MAX_FORWARD_BYTES and the length argument follows",
          "[runtime][marshal]") {
  FakeMemory mem;
  const uint64_t args[6] = {5, 0x1000, 100u << 20, 0, 0, 0};
  capnp::MallocMessageBuilder m;
  auto req = m.initRoot<proto::SyscallRequest>();
  REQUIRE(marshalRequest(__NR_read, specsOf(__NR_read), args, mem, req) == 0);
  CHECK(req.getOut()[0].getSize() == MAX_FORWARD_BYTES);
  CHECK(req.getArgs()[2] == MAX_FORWARD_BYTES);
}

TEST_CASE("paths travel with their NUL; too long is ENAMETOOLONG, unmapped is EFAULT",
          "[runtime][marshal]") {
  FakeMemory mem;
  // Regions that strings live in are whole pages, as real mappings are: readString reads up to
  // the next page boundary at once.
  std::vector<uint8_t> path = bytes("/etc/hostname");
  path.resize(4096);
  mem.map(0x1000, path);
  mem.map(0x10000, std::vector<uint8_t>(8192, 'a'));
  // A string that ends exactly at the end of its region (a mapping's last byte is the NUL).
  std::vector<uint8_t> edge(4096, 'b');
  edge.back() = 0;
  mem.map(0x20000, edge);
  const ArgSpec(&specs)[6] = specsOf(__NR_openat);
  capnp::MallocMessageBuilder m;
  {
    const uint64_t args[6] = {static_cast<uint64_t>(AT_FDCWD), 0x1000, O_RDONLY, 0, 0, 0};
    auto req = m.initRoot<proto::SyscallRequest>();
    REQUIRE(marshalRequest(__NR_openat, specs, args, mem, req) == 0);
    REQUIRE(req.getIn().size() == 1);
    CHECK(req.getIn()[0].getArg() == 1);
    auto data = req.getIn()[0].getData();
    REQUIRE(data.size() == 14);
    CHECK(std::string(reinterpret_cast<const char*>(data.begin())) == "/etc/hostname");
    CHECK(data[13] == 0);
  }
  {
    const uint64_t args[6] = {static_cast<uint64_t>(AT_FDCWD), 0x10000, O_RDONLY, 0, 0, 0};
    CHECK(marshalRequest(__NR_openat, specs, args, mem, m.initRoot<proto::SyscallRequest>()) ==
          ENAMETOOLONG);
  }
  {
    const uint64_t args[6] = {static_cast<uint64_t>(AT_FDCWD), 0x20000, O_RDONLY, 0, 0, 0};
    auto req = m.initRoot<proto::SyscallRequest>();
    REQUIRE(marshalRequest(__NR_openat, specs, args, mem, req) == 0);
    CHECK(req.getIn()[0].getData().size() == 4096);
  }
  {
    const uint64_t args[6] = {static_cast<uint64_t>(AT_FDCWD), 0x30000, O_RDONLY, 0, 0, 0};
    CHECK(marshalRequest(__NR_openat, specs, args, mem, m.initRoot<proto::SyscallRequest>()) ==
          EFAULT);
  }
}

TEST_CASE("a NULL struct pointer stays NULL and nothing is written", "[runtime][marshal]") {
  FakeMemory mem;
  const uint64_t args[6] = {3, 0, 0, 0, 0, 0};
  capnp::MallocMessageBuilder m;
  auto req = m.initRoot<proto::SyscallRequest>();
  REQUIRE(marshalRequest(__NR_fstat, specsOf(__NR_fstat), args, mem, req) == 0);
  CHECK(req.getArgs()[1] == 0);
  CHECK(req.getIn().size() == 0);
  CHECK(req.getOut().size() == 0);
  Reply reply(-EFAULT, {});
  CHECK(unmarshalReply(__NR_fstat, specsOf(__NR_fstat), args, reply.b.asReader(), mem) == -EFAULT);
  CHECK(mem.writes.empty());
}

TEST_CASE("a struct is written back in full on success", "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x4000, std::vector<uint8_t>(200, 0xee));
  const uint64_t args[6] = {3, 0x4000, 0, 0, 0, 0};
  capnp::MallocMessageBuilder m;
  auto req = m.initRoot<proto::SyscallRequest>();
  REQUIRE(marshalRequest(__NR_fstat, specsOf(__NR_fstat), args, mem, req) == 0);
  REQUIRE(req.getOut().size() == 1);
  CHECK(req.getOut()[0].getSize() == 144);
  Reply reply(0, {std::vector<uint8_t>(144, 0x11)});
  CHECK(unmarshalReply(__NR_fstat, specsOf(__NR_fstat), args, reply.b.asReader(), mem) == 0);
  CHECK(mem.at(0x4000)[143] == 0x11);
  CHECK(mem.at(0x4000)[144] == 0xee);
}

TEST_CASE("getsockname writes the address trimmed to the capacity and the full length",
          "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x1000, std::vector<uint8_t>(64, 0xee));  // the address buffer
  uint32_t capacity = 16;
  std::vector<uint8_t> len(4);
  memcpy(len.data(), &capacity, 4);
  mem.map(0x2000, len);  // the socklen
  const uint64_t args[6] = {4, 0x1000, 0x2000, 0, 0, 0};
  const ArgSpec(&specs)[6] = specsOf(__NR_getsockname);
  capnp::MallocMessageBuilder m;
  auto req = m.initRoot<proto::SyscallRequest>();
  REQUIRE(marshalRequest(__NR_getsockname, specs, args, mem, req) == 0);
  // The socklen goes in and out; the address only out, sized by the guest's socklen.
  REQUIRE(req.getIn().size() == 1);
  CHECK(req.getIn()[0].getArg() == 2);
  REQUIRE(req.getOut().size() == 2);
  CHECK(req.getOut()[0].getArg() == 1);
  CHECK(req.getOut()[0].getSize() == 16);
  CHECK(req.getOut()[1].getArg() == 2);
  CHECK(req.getOut()[1].getSize() == 4);

  // A unix socket address of 110 bytes: 16 fit, the length says 110.
  uint32_t full = 110;
  std::vector<uint8_t> fullLen(4);
  memcpy(fullLen.data(), &full, 4);
  Reply reply(0, {std::vector<uint8_t>(16, 0x22), fullLen});
  CHECK(unmarshalReply(__NR_getsockname, specs, args, reply.b.asReader(), mem) == 0);
  CHECK(mem.at(0x1000)[15] == 0x22);
  CHECK(mem.at(0x1000)[16] == 0xee);
  uint32_t seen;
  memcpy(&seen, mem.at(0x2000).data(), 4);
  CHECK(seen == 110);

  // A shorter address (8 bytes) writes 8.
  mem.at(0x1000).assign(64, 0xee);
  uint32_t shortLen = 8;
  memcpy(fullLen.data(), &shortLen, 4);
  Reply shorter(0, {std::vector<uint8_t>(16, 0x33), fullLen});
  CHECK(unmarshalReply(__NR_getsockname, specs, args, shorter.b.asReader(), mem) == 0);
  CHECK(mem.at(0x1000)[7] == 0x33);
  CHECK(mem.at(0x1000)[8] == 0xee);
}

TEST_CASE("recvfrom without a source address passes NULL for both", "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x1000, std::vector<uint8_t>(64, 0));
  const uint64_t args[6] = {4, 0x1000, 64, 0, 0, 0};
  capnp::MallocMessageBuilder m;
  auto req = m.initRoot<proto::SyscallRequest>();
  REQUIRE(marshalRequest(__NR_recvfrom, specsOf(__NR_recvfrom), args, mem, req) == 0);
  REQUIRE(req.getOut().size() == 1);
  CHECK(req.getOut()[0].getArg() == 1);
  CHECK(req.getArgs()[4] == 0);
  CHECK(req.getArgs()[5] == 0);
}

TEST_CASE("poll's array goes in and out, epoll_wait's comes back by element",
          "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x1000, std::vector<uint8_t>(24, 0x5));
  capnp::MallocMessageBuilder m;
  {
    const uint64_t args[6] = {0x1000, 3, 100, 0, 0, 0};
    auto req = m.initRoot<proto::SyscallRequest>();
    REQUIRE(marshalRequest(__NR_poll, specsOf(__NR_poll), args, mem, req) == 0);
    REQUIRE(req.getIn().size() == 1);
    CHECK(req.getIn()[0].getData().size() == 24);
    REQUIRE(req.getOut().size() == 1);
    CHECK(req.getOut()[0].getSize() == 24);
  }
  {
    mem.map(0x8000, std::vector<uint8_t>(12 * 4, 0xee));
    const uint64_t args[6] = {7, 0x8000, 4, static_cast<uint64_t>(-1), 0, 0};
    auto req = m.initRoot<proto::SyscallRequest>();
    REQUIRE(marshalRequest(__NR_epoll_wait, specsOf(__NR_epoll_wait), args, mem, req) == 0);
    CHECK(req.getOut()[0].getSize() == 48);
    Reply reply(1, {std::vector<uint8_t>(48, 0x44)});
    CHECK(unmarshalReply(__NR_epoll_wait, specsOf(__NR_epoll_wait), args, reply.b.asReader(),
                         mem) == 1);
    CHECK(mem.at(0x8000)[11] == 0x44);
    CHECK(mem.at(0x8000)[12] == 0xee);
  }
}

TEST_CASE("a reply with too few out-buffers is a peer bug", "[runtime][marshal]") {
  FakeMemory mem;
  mem.map(0x1000, std::vector<uint8_t>(16, 0));
  const uint64_t args[6] = {5, 0x1000, 10, 0, 0, 0};
  Reply reply(4, {});
  CHECK_THROWS(unmarshalReply(__NR_read, specsOf(__NR_read), args, reply.b.asReader(), mem));
}

TEST_CASE("ioctl, fcntl and pselect6 argument kinds depend on the request", "[runtime][marshal]") {
  const SyscallEntry& ioctlRow = *findSyscall(__NR_ioctl);
  ArgSpec out[6];
  {
    const uint64_t args[6] = {0, TCGETS, 0x1000, 0, 0, 0};
    REQUIRE(dynamicArgSpecs(ioctlRow, args, out));
    CHECK(out[2].kind == ArgKind::OUT_STRUCT);
    CHECK(out[2].size == 36);
  }
  {
    const uint64_t args[6] = {0, TIOCSWINSZ, 0x1000, 0, 0, 0};
    REQUIRE(dynamicArgSpecs(ioctlRow, args, out));
    CHECK(out[2].kind == ArgKind::IN_STRUCT);
    CHECK(out[2].size == 8);
  }
  {
    const uint64_t args[6] = {0, TIOCGPTN, 0x1000, 0, 0, 0};  // _IOR('T', 0x30, unsigned int)
    REQUIRE(dynamicArgSpecs(ioctlRow, args, out));
    CHECK(out[2].kind == ArgKind::OUT_STRUCT);
    CHECK(out[2].size == 4);
  }
  {
    const uint64_t args[6] = {0, FIOCLEX, 0, 0, 0, 0};
    REQUIRE(dynamicArgSpecs(ioctlRow, args, out));
    CHECK(out[2].kind == ArgKind::VAL);
  }
  {
    const uint64_t args[6] = {0, 0xdead, 0, 0, 0, 0};
    CHECK_FALSE(dynamicArgSpecs(ioctlRow, args, out));
    const uint64_t drm[6] = {0, _IOWR('d', 0x00, char[16]), 0, 0, 0, 0};  // a pointer family
    CHECK_FALSE(dynamicArgSpecs(ioctlRow, drm, out));
  }
  const SyscallEntry& fcntlRow = *findSyscall(__NR_fcntl);
  {
    const uint64_t args[6] = {3, F_GETLK, 0x1000, 0, 0, 0};
    REQUIRE(dynamicArgSpecs(fcntlRow, args, out));
    CHECK(out[2].kind == ArgKind::INOUT_STRUCT);
    CHECK(out[2].size == 32);
    const uint64_t getfl[6] = {3, F_GETFL, 0, 0, 0, 0};
    REQUIRE(dynamicArgSpecs(fcntlRow, getfl, out));
    CHECK(out[2].kind == ArgKind::VAL);
    const uint64_t ownEx[6] = {3, F_GETOWN_EX, 0x1000, 0, 0, 0};
    REQUIRE(dynamicArgSpecs(fcntlRow, ownEx, out));
    CHECK(out[2].kind == ArgKind::OUT_STRUCT);
    const uint64_t unknown[6] = {3, 9999, 0, 0, 0, 0};
    CHECK_FALSE(dynamicArgSpecs(fcntlRow, unknown, out));
  }
  {
    const uint64_t args[6] = {5, 0x1000, 0, 0, 0x2000, 0x3000};
    REQUIRE(dynamicArgSpecs(*findSyscall(__NR_pselect6), args, out));
    CHECK(out[1].kind == ArgKind::INOUT_BITS);
    CHECK(out[4].kind == ArgKind::INOUT_STRUCT);
    CHECK(out[5].kind == ArgKind::SIGMASK_PAIR);
    FakeMemory mem;
    mem.map(0x1000, std::vector<uint8_t>(8, 0x1f));
    mem.map(0x2000, std::vector<uint8_t>(16, 0));
    capnp::MallocMessageBuilder m;
    auto req = m.initRoot<proto::SyscallRequest>();
    REQUIRE(marshalRequest(__NR_pselect6, out, args, mem, req) == 0);
    CHECK(req.getArgs()[5] == 0);  // the sigmask never travels
    REQUIRE(req.getIn().size() == 2);
    CHECK(req.getIn()[0].getData().size() == 8);  // (5 + 63) / 64 words
    CHECK(req.getIn()[1].getArg() == 4);
  }
  CHECK_FALSE(dynamicArgSpecs(*findSyscall(__NR_readv), {}, out));
  CHECK(dynamicArgSpecs(*findSyscall(__NR_read), {}, out));
}

TEST_CASE("ProcessMemory reads and writes a live process and faults cleanly",
          "[runtime][marshal]") {
  ProcessMemory mem(getpid());
  char local[8] = "abcdefg";
  uint8_t got[8] = {};
  REQUIRE(mem.read(RemotePtr<void>(reinterpret_cast<uint64_t>(local)), got) == 0);
  CHECK(memcmp(got, local, 8) == 0);
  const uint8_t fresh[3] = {'X', 'Y', 'Z'};
  REQUIRE(mem.write(RemotePtr<void>(reinterpret_cast<uint64_t>(local)), fresh) == 0);
  CHECK(std::string(local) == "XYZdefg");

  // A string that ends on the last byte before an inaccessible page.
  long page = sysconf(_SC_PAGESIZE);
  auto* two = static_cast<char*>(
      mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  REQUIRE(two != MAP_FAILED);
  REQUIRE(mprotect(two + page, page, PROT_NONE) == 0);
  memset(two, 'q', page);
  two[page - 1] = 0;
  std::string s;
  CHECK(mem.readString(RemotePtr<char>(reinterpret_cast<uint64_t>(two + 10)), 4096, s) == 0);
  CHECK(s.size() == static_cast<size_t>(page - 11));
  two[page - 1] = 'q';  // now it runs into the hole
  CHECK(mem.readString(RemotePtr<char>(reinterpret_cast<uint64_t>(two + 10)), 8192, s) == EFAULT);
  CHECK(mem.readString(RemotePtr<char>(reinterpret_cast<uint64_t>(two)), 100, s) == ENAMETOOLONG);
  uint8_t buf[16];
  CHECK(mem.read(RemotePtr<void>(reinterpret_cast<uint64_t>(two + page - 8)), buf) == EFAULT);
  CHECK(mem.write(RemotePtr<void>(reinterpret_cast<uint64_t>(two + page)), fresh) == EFAULT);
  munmap(two, 2 * page);
}
