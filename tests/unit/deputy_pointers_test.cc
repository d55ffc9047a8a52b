// The deputy's pointer fixups (protocol/job.capnp, struct Pointer) and auxiliary buffer slots,
// as the supervisor uses them for sendmsg(2) and recvmsg(2): hand-built SyscallRequests through
// Deputy::handle, checked against the other end of real sockets (bytes, passed descriptors,
// source addresses, msg_flags).

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <capnp/message.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "deputy.h"
#include "deputy_harness.h"

using namespace mos;
using namespace mos::deputy;
using namespace mos::deputy::testing;

namespace {

// Slots as the supervisor's sendmsg/recvmsg handler lays them out.
constexpr int MSGHDR = 1, NAME = 6, IOVEC = 7, DATA = 8, CONTROL = 9;

template <typename T>
std::string bytesOf(const T& value) {
  return std::string(reinterpret_cast<const char*>(&value), sizeof(value));
}

template <typename T>
T valueOf(capnp::Data::Reader bytes) {
  T value;
  REQUIRE(bytes.size() == sizeof(T));
  memcpy(&value, bytes.begin(), sizeof(T));
  return value;
}

std::string textOf(capnp::Data::Reader bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

// A msghdr as the supervisor sends it: guest pointers replaced by the fixups (here: garbage that
// must never reach the kernel), one iovec.
msghdr remoteMsghdr(size_t namelen, size_t controllen) {
  msghdr msg = {};
  msg.msg_name = namelen > 0 ? reinterpret_cast<void*>(0xdead0000) : nullptr;
  msg.msg_namelen = static_cast<socklen_t>(namelen);
  msg.msg_iov = reinterpret_cast<iovec*>(0xdead1000);
  msg.msg_iovlen = 1;
  msg.msg_control = controllen > 0 ? reinterpret_cast<void*>(0xdead2000) : nullptr;
  msg.msg_controllen = controllen;
  return msg;
}

std::string iovecOf(size_t length) {
  iovec v = {reinterpret_cast<void*>(0xdead3000), length};
  return bytesOf(v);
}

}  // namespace

TEST_CASE("deputy sendmsg with pointer fixups delivers bytes and a descriptor",
          "[deputy][pointers][socket]") {
  Harness h;
  int sv[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  auto* cm = reinterpret_cast<cmsghdr*>(control);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &p[1], sizeof(int));
  std::string data = "vector";

  auto m = h.run({__NR_sendmsg,
                  {uint64_t(sv[0]), 0, 0},
                  {{MSGHDR, bytesOf(remoteMsghdr(0, sizeof control))},
                   {IOVEC, iovecOf(data.size())},
                   {DATA, data},
                   {CONTROL, std::string(control, sizeof control)}},
                  {},
                  {{MSGHDR, offsetof(msghdr, msg_iov), IOVEC},
                   {MSGHDR, offsetof(msghdr, msg_control), CONTROL},
                   {IOVEC, offsetof(iovec, iov_base), DATA}}});
  CHECK(replyOf(m).getRet() == 6);
  CHECK(replyOf(m).getOut().size() == 0);

  char got[16] = {};
  alignas(cmsghdr) char rcontrol[CMSG_SPACE(sizeof(int))] = {};
  iovec riov = {got, sizeof got};
  msghdr rmsg = {};
  rmsg.msg_iov = &riov;
  rmsg.msg_iovlen = 1;
  rmsg.msg_control = rcontrol;
  rmsg.msg_controllen = sizeof rcontrol;
  REQUIRE(recvmsg(sv[1], &rmsg, MSG_CMSG_CLOEXEC) == 6);
  CHECK(std::string(got, 6) == "vector");
  cmsghdr* rcm = CMSG_FIRSTHDR(&rmsg);
  REQUIRE(rcm != nullptr);
  CHECK(rcm->cmsg_type == SCM_RIGHTS);
  int passed;
  memcpy(&passed, CMSG_DATA(rcm), sizeof passed);
  CHECK(passed != p[1]);
  CHECK(write(passed, "!", 1) == 1);
  char c = 0;
  CHECK(read(p[0], &c, 1) == 1);
  CHECK(c == '!');
  close(passed);
  close(p[0]);
  close(p[1]);
  close(sv[0]);
  close(sv[1]);
}

TEST_CASE("deputy recvmsg returns trimmed data, a passed descriptor and the msghdr",
          "[deputy][pointers][socket]") {
  Harness h;
  int sv[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  // The peer sends 5 bytes with the pipe's write end.
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  char text[] = "hello";
  iovec iov = {text, 5};
  msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &p[1], sizeof(int));
  REQUIRE(sendmsg(sv[1], &msg, 0) == 5);

  constexpr uint32_t CONTROL_SPACE = 64;
  auto m =
      h.run({__NR_recvmsg,
             {uint64_t(sv[0]), 0, MSG_CMSG_CLOEXEC},
             {{MSGHDR, bytesOf(remoteMsghdr(0, CONTROL_SPACE))}, {IOVEC, iovecOf(100)}},
             {{MSGHDR, sizeof(msghdr), false}, {DATA, 100, true}, {CONTROL, CONTROL_SPACE, false}},
             {{MSGHDR, offsetof(msghdr, msg_iov), IOVEC},
              {MSGHDR, offsetof(msghdr, msg_control), CONTROL},
              {IOVEC, offsetof(iovec, iov_base), DATA}}});
  auto r = replyOf(m);
  REQUIRE(r.getRet() == 5);
  REQUIRE(r.getOut().size() == 3);
  // trimToRet: only the received bytes travel back.
  CHECK(textOf(r.getOut()[1]) == "hello");
  auto home = valueOf<msghdr>(r.getOut()[0]);
  CHECK(home.msg_controllen == CMSG_SPACE(sizeof(int)));
  CHECK((home.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) == 0);
  // Control data is not trimmed; the descriptor number is one of this (the home) process.
  REQUIRE(r.getOut()[2].size() == CONTROL_SPACE);
  auto* rcm = reinterpret_cast<const cmsghdr*>(r.getOut()[2].begin());
  CHECK(rcm->cmsg_level == SOL_SOCKET);
  CHECK(rcm->cmsg_type == SCM_RIGHTS);
  int passed;
  memcpy(&passed, CMSG_DATA(rcm), sizeof passed);
  CHECK(fcntl(passed, F_GETFD) == FD_CLOEXEC);
  CHECK(write(passed, "x", 1) == 1);
  char c = 0;
  CHECK(read(p[0], &c, 1) == 1);
  CHECK(c == 'x');
  close(passed);
  close(p[0]);
  close(p[1]);
  close(sv[0]);
  close(sv[1]);
}

TEST_CASE("deputy recvmsg of a datagram reports its source and MSG_TRUNC",
          "[deputy][pointers][socket]") {
  Harness h;
  int u1 = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  int u2 = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  REQUIRE(u1 >= 0);
  REQUIRE(u2 >= 0);
  sockaddr_in a1 = {}, a2 = {};
  a1.sin_family = a2.sin_family = AF_INET;
  a1.sin_addr.s_addr = a2.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(u1, reinterpret_cast<sockaddr*>(&a1), sizeof a1) == 0);
  REQUIRE(bind(u2, reinterpret_cast<sockaddr*>(&a2), sizeof a2) == 0);
  socklen_t len = sizeof a1;
  REQUIRE(getsockname(u1, reinterpret_cast<sockaddr*>(&a1), &len) == 0);
  len = sizeof a2;
  REQUIRE(getsockname(u2, reinterpret_cast<sockaddr*>(&a2), &len) == 0);
  REQUIRE(sendto(u1, "0123456789", 10, 0, reinterpret_cast<sockaddr*>(&a2), sizeof a2) == 10);

  auto m =
      h.run({__NR_recvmsg,
             {uint64_t(u2), 0, 0},
             {{MSGHDR, bytesOf(remoteMsghdr(sizeof(sockaddr_in), 0))}, {IOVEC, iovecOf(4)}},
             {{MSGHDR, sizeof(msghdr), false}, {NAME, sizeof(sockaddr_in), false}, {DATA, 4, true}},
             {{MSGHDR, offsetof(msghdr, msg_name), NAME},
              {MSGHDR, offsetof(msghdr, msg_iov), IOVEC},
              {IOVEC, offsetof(iovec, iov_base), DATA}}});
  auto r = replyOf(m);
  REQUIRE(r.getRet() == 4);
  REQUIRE(r.getOut().size() == 3);
  CHECK(textOf(r.getOut()[2]) == "0123");
  auto home = valueOf<msghdr>(r.getOut()[0]);
  CHECK((home.msg_flags & MSG_TRUNC) != 0);
  CHECK(home.msg_namelen == sizeof(sockaddr_in));
  auto from = valueOf<sockaddr_in>(r.getOut()[1]);
  CHECK(from.sin_port == a1.sin_port);
  CHECK(from.sin_addr.s_addr == htonl(INADDR_LOOPBACK));
  close(u1);
  close(u2);
}

TEST_CASE("deputy rejects malformed pointers with EINVAL and runs nothing", "[deputy][pointers]") {
  Harness h;
  int sv[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  auto sendWith = [&](std::vector<PointerSpec> pointers) {
    Request call{__NR_sendmsg,
                 {uint64_t(sv[0]), 0, 0},
                 {{MSGHDR, bytesOf(remoteMsghdr(0, 0))}, {IOVEC, iovecOf(3)}, {DATA, "abc"}},
                 {},
                 std::move(pointers)};
    auto m = h.run(call);
    return replyOf(m).getRet();
  };
  // Past the end of the iovec (16 bytes): offset 9 + 8 > 16.
  CHECK(sendWith({{MSGHDR, offsetof(msghdr, msg_iov), IOVEC}, {IOVEC, 9, DATA}}) == -EINVAL);
  // A target slot without a buffer.
  CHECK(sendWith({{MSGHDR, offsetof(msghdr, msg_iov), IOVEC}, {IOVEC, 0, CONTROL}}) == -EINVAL);
  // A slot beyond 15.
  CHECK(sendWith({{MSGHDR, offsetof(msghdr, msg_iov), 16}}) == -EINVAL);
  // Nothing was sent by the rejected calls; a well-formed one still works.
  char c;
  CHECK(recv(sv[1], &c, 1, MSG_DONTWAIT) == -1);
  CHECK(sendWith({{MSGHDR, offsetof(msghdr, msg_iov), IOVEC},
                  {IOVEC, offsetof(iovec, iov_base), DATA}}) == 3);
  char got[4] = {};
  CHECK(recv(sv[1], got, sizeof got, MSG_DONTWAIT) == 3);
  CHECK(std::string(got, 3) == "abc");
  close(sv[0]);
  close(sv[1]);
}

TEST_CASE("deputy sendmsg passing a reserved descriptor fails with EBADF",
          "[deputy][pointers][fds]") {
  Harness h;
  int sv[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  int ours = h.deputy->channel().fd();
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  auto* cm = reinterpret_cast<cmsghdr*>(control);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &ours, sizeof(int));
  auto m = h.run({__NR_sendmsg,
                  {uint64_t(sv[0]), 0, 0},
                  {{MSGHDR, bytesOf(remoteMsghdr(0, sizeof control))},
                   {IOVEC, iovecOf(1)},
                   {DATA, "x"},
                   {CONTROL, std::string(control, sizeof control)}},
                  {},
                  {{MSGHDR, offsetof(msghdr, msg_iov), IOVEC},
                   {MSGHDR, offsetof(msghdr, msg_control), CONTROL},
                   {IOVEC, offsetof(iovec, iov_base), DATA}}});
  CHECK(replyOf(m).getRet() == -EBADF);
  char c;
  CHECK(recv(sv[1], &c, 1, MSG_DONTWAIT) == -1);
  // Without a msghdr buffer the guest's address never reaches the kernel.
  uint64_t guestAddress = reinterpret_cast<uint64_t>(&h);
  auto bare = h.run({__NR_sendmsg, {uint64_t(sv[0]), guestAddress, 0}, {}, {}, {}});
  CHECK(replyOf(bare).getRet() == -EFAULT);
  close(sv[0]);
  close(sv[1]);
}
