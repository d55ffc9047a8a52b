// socket(2), socketpair, bind, listen, connect, accept, accept4, getsockname, getpeername,
// sendto, recvfrom, sendmsg, recvmsg (with SCM_RIGHTS), setsockopt, getsockopt, shutdown, over
// AF_UNIX and loopback TCP and UDP. One process: connects complete in the kernel's backlog.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "check.h"

int main() {
  // A socketpair carries bytes and descriptors.
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  CHECK(send(sv[0], "ping", 4, 0) == 4);
  char buf[64] = {};
  CHECK(recv(sv[1], buf, sizeof buf, 0) == 4 && std::string(buf) == "ping");

  int p[2];
  CHECK(pipe(p) == 0);
  char part1[] = "vec", part2[] = "tor";
  iovec iov[2] = {{part1, 3}, {part2, 3}};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg = {};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &p[1], sizeof(int));
  CHECK(sendmsg(sv[0], &msg, 0) == 6);
  char in1[4] = {}, in2[8] = {};
  iovec riov[2] = {{in1, 2}, {in2, 8}};
  alignas(cmsghdr) char rcontrol[CMSG_SPACE(sizeof(int))] = {};
  msghdr rmsg = {};
  rmsg.msg_iov = riov;
  rmsg.msg_iovlen = 2;
  rmsg.msg_control = rcontrol;
  rmsg.msg_controllen = sizeof rcontrol;
  CHECK(recvmsg(sv[1], &rmsg, 0) == 6);
  CHECK(memcmp(in1, "ve", 2) == 0 && memcmp(in2, "ctor", 4) == 0);
  cmsghdr* rcm = CMSG_FIRSTHDR(&rmsg);
  CHECK(rcm != nullptr && rcm->cmsg_type == SCM_RIGHTS);
  if (rcm != nullptr) {
    int passed;
    memcpy(&passed, CMSG_DATA(rcm), sizeof passed);
    CHECK(passed != p[1] && write(passed, "!", 1) == 1);
    CHECK(read(p[0], buf, 1) == 1 && buf[0] == '!');
    close(passed);
  }
  CHECK(shutdown(sv[0], SHUT_WR) == 0);
  CHECK(recv(sv[1], buf, sizeof buf, 0) == 0);
  close(sv[0]);
  close(sv[1]);
  close(p[0]);
  close(p[1]);

  // A named AF_UNIX socket.
  sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  std::string path = conf::tmpPath("sock");
  snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  int srv = socket(AF_UNIX, SOCK_STREAM, 0);
  CHECK(srv >= 0);
  CHECK(bind(srv, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  CHECK_FAILS(
      bind(socket(AF_UNIX, SOCK_STREAM, 0), reinterpret_cast<sockaddr*>(&addr), sizeof addr),
      EADDRINUSE);
  CHECK(listen(srv, 4) == 0);
  int cli = socket(AF_UNIX, SOCK_STREAM, 0);
  CHECK(connect(cli, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  sockaddr_un got = {};
  socklen_t len = sizeof got;
  int acc = accept4(srv, reinterpret_cast<sockaddr*>(&got), &len, SOCK_CLOEXEC);
  CHECK(acc >= 0 && fcntl(acc, F_GETFD) == FD_CLOEXEC);
  CHECK(len == sizeof(sa_family_t) && got.sun_family == AF_UNIX);  // the client is unnamed
  len = sizeof got;
  CHECK(getsockname(srv, reinterpret_cast<sockaddr*>(&got), &len) == 0);
  CHECK(std::string(got.sun_path) == path);
  CHECK(len == offsetof(sockaddr_un, sun_path) + path.size() + 1);
  // A short buffer gets a truncated address and the full length.
  char tiny[6] = {};
  len = sizeof tiny;
  CHECK(getpeername(cli, reinterpret_cast<sockaddr*>(tiny), &len) == 0);
  CHECK(len == offsetof(sockaddr_un, sun_path) + path.size() + 1);
  CHECK(memcmp(tiny + 2, path.c_str(), 4) == 0);
  CHECK(write(cli, "unix", 4) == 4 && read(acc, buf, 4) == 4);
  close(acc);
  close(cli);
  close(srv);
  CHECK_FAILS(
      connect(socket(AF_UNIX, SOCK_STREAM, 0), reinterpret_cast<sockaddr*>(&addr), sizeof addr),
      ECONNREFUSED);

  // Loopback TCP.
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  CHECK(setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0);
  int val = 0;
  len = sizeof val;
  CHECK(getsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &val, &len) == 0 && val == 1 && len == sizeof val);
  len = sizeof val;
  CHECK(getsockopt(ls, SOL_SOCKET, SO_TYPE, &val, &len) == 0 && val == SOCK_STREAM);
  sockaddr_in sin = {};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(ls, reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0);
  CHECK(listen(ls, 4) == 0);
  len = sizeof sin;
  CHECK(getsockname(ls, reinterpret_cast<sockaddr*>(&sin), &len) == 0 && sin.sin_port != 0);
  int tc = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(setsockopt(tc, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0);
  CHECK(connect(tc, reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0);
  sockaddr_in peer = {};
  len = sizeof peer;
  int ta = accept(ls, reinterpret_cast<sockaddr*>(&peer), &len);
  CHECK(ta >= 0 && len == sizeof peer && peer.sin_addr.s_addr == htonl(INADDR_LOOPBACK));
  sockaddr_in mine = {};
  len = sizeof mine;
  CHECK(getsockname(tc, reinterpret_cast<sockaddr*>(&mine), &len) == 0);
  CHECK(mine.sin_port == peer.sin_port);
  CHECK(sendto(tc, "tcp data", 8, 0, nullptr, 0) == 8);
  memset(buf, 0, sizeof buf);
  CHECK(recvfrom(ta, buf, sizeof buf, MSG_WAITALL | MSG_DONTWAIT, nullptr, nullptr) == 8);
  CHECK(std::string(buf) == "tcp data");
  CHECK_FAILS(recv(ta, buf, sizeof buf, MSG_DONTWAIT), EAGAIN);
  close(tc);
  close(ta);
  close(ls);

  // UDP with source addresses.
  int u1 = socket(AF_INET, SOCK_DGRAM, 0), u2 = socket(AF_INET, SOCK_DGRAM, 0);
  sockaddr_in a1 = {}, a2 = {};
  a1.sin_family = a2.sin_family = AF_INET;
  a1.sin_addr.s_addr = a2.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(u1, reinterpret_cast<sockaddr*>(&a1), sizeof a1) == 0);
  CHECK(bind(u2, reinterpret_cast<sockaddr*>(&a2), sizeof a2) == 0);
  len = sizeof a1;
  CHECK(getsockname(u1, reinterpret_cast<sockaddr*>(&a1), &len) == 0);
  len = sizeof a2;
  CHECK(getsockname(u2, reinterpret_cast<sockaddr*>(&a2), &len) == 0);
  CHECK(sendto(u1, "dgram", 5, 0, reinterpret_cast<sockaddr*>(&a2), sizeof a2) == 5);
  sockaddr_in from = {};
  len = sizeof from;
  memset(buf, 0, sizeof buf);
  CHECK(recvfrom(u2, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&from), &len) == 5);
  CHECK(std::string(buf) == "dgram" && from.sin_port == a1.sin_port && len == sizeof from);
  // A datagram larger than the buffer is cut; MSG_TRUNC reports its real length.
  CHECK(sendto(u1, "0123456789", 10, 0, reinterpret_cast<sockaddr*>(&a2), sizeof a2) == 10);
  memset(buf, 'z', sizeof buf);
  CHECK(recvfrom(u2, buf, 4, MSG_TRUNC, nullptr, nullptr) == 10);
  CHECK(memcmp(buf, "0123zz", 6) == 0);
  close(u1);
  close(u2);
  return conf::finish();
}
