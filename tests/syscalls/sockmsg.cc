// sendmsg(2) and recvmsg(2) in detail: destination and source addresses in msg_name (a short
// name buffer gets a cut address and the full length), data gathered from and scattered over
// several iovecs, MSG_TRUNC and MSG_CTRUNC in msg_flags, msg_controllen on return, SCM_RIGHTS,
// and the errors the kernel reports for a bad msghdr.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <vector>

#include "check.h"

namespace {

sockaddr_in boundUdp(int fd) {
  sockaddr_in a = {};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  CHECK(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  return a;
}

}  // namespace

int main() {
  // UDP: sendmsg with a destination and three iovecs; recvmsg with a source buffer and two.
  int u1 = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  int u2 = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  CHECK(u1 >= 0 && u2 >= 0);
  sockaddr_in a1 = boundUdp(u1), a2 = boundUdp(u2);
  char p1[] = "ab", p2[] = "", p3[] = "cdefg";
  iovec siov[3] = {{p1, 2}, {p2, 0}, {p3, 5}};
  msghdr smsg = {};
  smsg.msg_name = &a2;
  smsg.msg_namelen = sizeof a2;
  smsg.msg_iov = siov;
  smsg.msg_iovlen = 3;
  CHECK(sendmsg(u1, &smsg, 0) == 7);
  char r1[3] = {}, r2[10] = {};
  memset(r2, 'z', sizeof r2);
  iovec riov[2] = {{r1, 3}, {r2, sizeof r2}};
  sockaddr_in from = {};
  msghdr rmsg = {};
  rmsg.msg_name = &from;
  rmsg.msg_namelen = sizeof from + 8;  // larger than the address: set to its real length
  rmsg.msg_iov = riov;
  rmsg.msg_iovlen = 2;
  rmsg.msg_flags = -1;
  CHECK(recvmsg(u2, &rmsg, 0) == 7);
  CHECK(memcmp(r1, "abc", 3) == 0 && memcmp(r2, "defgzz", 6) == 0);
  CHECK(rmsg.msg_namelen == sizeof from);
  CHECK(from.sin_port == a1.sin_port && from.sin_addr.s_addr == htonl(INADDR_LOOPBACK));
  CHECK(rmsg.msg_flags == 0);
  CHECK(rmsg.msg_controllen == 0);

  // A datagram larger than the iovecs: cut, MSG_TRUNC in msg_flags; with the MSG_TRUNC flag the
  // call returns the real length. A short name buffer gets the address's first bytes.
  CHECK(sendto(u1, "0123456789", 10, 0, reinterpret_cast<sockaddr*>(&a2), sizeof a2) == 10);
  CHECK(sendto(u1, "9876543210", 10, 0, reinterpret_cast<sockaddr*>(&a2), sizeof a2) == 10);
  char small[4];
  iovec one = {small, sizeof small};
  unsigned char shortName[4] = {0xee, 0xee, 0xee, 0xee};
  msghdr tmsg = {};
  tmsg.msg_name = shortName;
  tmsg.msg_namelen = 2;
  tmsg.msg_iov = &one;
  tmsg.msg_iovlen = 1;
  CHECK(recvmsg(u2, &tmsg, 0) == 4);
  CHECK(memcmp(small, "0123", 4) == 0);
  CHECK((tmsg.msg_flags & MSG_TRUNC) != 0);
  CHECK(tmsg.msg_namelen == sizeof(sockaddr_in));
  sa_family_t family = AF_INET;
  CHECK(memcmp(shortName, &family, 2) == 0 && shortName[2] == 0xee);
  // msg_name NULL: msg_namelen is left alone.
  tmsg.msg_name = nullptr;
  tmsg.msg_namelen = 77;
  CHECK(recvmsg(u2, &tmsg, MSG_TRUNC) == 10);
  CHECK(memcmp(small, "9876", 4) == 0 && tmsg.msg_namelen == 77);
  CHECK((tmsg.msg_flags & MSG_TRUNC) != 0);
  CHECK_FAILS(recvmsg(u2, &tmsg, MSG_DONTWAIT), EAGAIN);
  close(u1);
  close(u2);

  // SCM_RIGHTS with too little control space: the descriptors that fit, MSG_CTRUNC.
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  int p[2];
  CHECK(pipe(p) == 0);
  int two[2] = {p[1], p[1]};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof two)] = {};
  char byte = 'x';
  iovec biov = {&byte, 1};
  msghdr cmsg = {};
  cmsg.msg_iov = &biov;
  cmsg.msg_iovlen = 1;
  cmsg.msg_control = control;
  cmsg.msg_controllen = sizeof control;
  cmsghdr* cm = CMSG_FIRSTHDR(&cmsg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof two);
  memcpy(CMSG_DATA(cm), two, sizeof two);
  CHECK(sendmsg(sv[0], &cmsg, 0) == 1);
  alignas(cmsghdr) char rcontrol[64];
  memset(rcontrol, 0x5a, sizeof rcontrol);
  char got = 0;
  iovec giov = {&got, 1};
  msghdr gmsg = {};
  gmsg.msg_iov = &giov;
  gmsg.msg_iovlen = 1;
  gmsg.msg_control = rcontrol;
  gmsg.msg_controllen = CMSG_LEN(sizeof(int));  // room for one descriptor
  CHECK(recvmsg(sv[1], &gmsg, MSG_CMSG_CLOEXEC) == 1 && got == 'x');
  CHECK((gmsg.msg_flags & MSG_CTRUNC) != 0);
  CHECK(gmsg.msg_controllen == CMSG_LEN(sizeof(int)));
  CHECK(static_cast<unsigned char>(rcontrol[CMSG_LEN(sizeof(int))]) == 0x5a);  // nothing beyond
  cmsghdr* rcm = CMSG_FIRSTHDR(&gmsg);
  CHECK(rcm != nullptr);
  if (rcm != nullptr) {
    int passed;
    memcpy(&passed, CMSG_DATA(rcm), sizeof passed);
    CHECK(fcntl(passed, F_GETFD) == FD_CLOEXEC);
    CHECK(write(passed, "!", 1) == 1);
    char c = 0;
    CHECK(read(p[0], &c, 1) == 1 && c == '!');
    close(passed);
  }
  // Nothing but data: msg_controllen 0, no flags.
  CHECK(send(sv[0], "yz", 2, 0) == 2);
  char two_bytes[2];
  iovec tiov = {two_bytes, 2};
  gmsg.msg_iov = &tiov;
  gmsg.msg_controllen = sizeof rcontrol;
  CHECK(recvmsg(sv[1], &gmsg, 0) == 2 && memcmp(two_bytes, "yz", 2) == 0);
  CHECK(gmsg.msg_controllen == 0 && gmsg.msg_flags == 0);

  // Errors the kernel finds in the msghdr.
  CHECK_FAILS(sendmsg(sv[0], nullptr, 0), EFAULT);
  msghdr bad = {};
  bad.msg_iov = reinterpret_cast<iovec*>(8);
  bad.msg_iovlen = 1;
  CHECK_FAILS(sendmsg(sv[0], &bad, 0), EFAULT);
  std::vector<iovec> many(1025, iovec{&byte, 1});
  bad.msg_iov = many.data();
  bad.msg_iovlen = many.size();
  CHECK_FAILS(sendmsg(sv[0], &bad, 0), EMSGSIZE);
  iovec faulty = {reinterpret_cast<void*>(8), 1};
  bad.msg_iov = &faulty;
  bad.msg_iovlen = 1;
  CHECK_FAILS(sendmsg(sv[0], &bad, 0), EFAULT);
  close(sv[0]);
  close(sv[1]);
  close(p[0]);
  close(p[1]);
  return conf::finish();
}
