#include "uv_event_port.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <kj/debug.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>

namespace mos {

namespace {

// Closes a heap-allocated libuv handle and frees it from the close callback.
template <typename Handle>
void closeAndFree(Handle* handle) {
  uv_close(reinterpret_cast<uv_handle_t*>(handle),
           [](uv_handle_t* h) { delete reinterpret_cast<Handle*>(h); });
}

void checkUv(int rc, const char* what) {
  KJ_REQUIRE(rc == 0, "libuv call failed", what, uv_strerror(rc));
}

void setNonBlocking(int fd) {
  int flags;
  KJ_SYSCALL(flags = fcntl(fd, F_GETFL));
  if ((flags & O_NONBLOCK) == 0) {
    KJ_SYSCALL(fcntl(fd, F_SETFL, flags | O_NONBLOCK));
  }
}

}  // namespace

sockaddr_in makeSockaddr(uint32_t address, uint16_t port) {
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(address);
  sin.sin_port = htons(port);
  return sin;
}

// ---------------------------------------------------------------------------------------------
// UvEventPort

UvEventPort::UvEventPort(uv_loop_t* loop) : loop_(loop) {
  async_ = new uv_async_t;
  checkUv(uv_async_init(loop_, async_, &UvEventPort::onAsync), "uv_async_init");
  async_->data = this;
  // Referenced only inside wait(): a foreign uv_run(UV_RUN_DEFAULT) may end when nothing else is
  // active.
  uv_unref(reinterpret_cast<uv_handle_t*>(async_));
  idle_ = new uv_idle_t;
  checkUv(uv_idle_init(loop_, idle_), "uv_idle_init");
  idle_->data = this;
  // Always active but unreferenced: it runs in every loop iteration without keeping the loop
  // alive, and decides there whether the iteration may block (onPrepare).
  prepare_ = new uv_prepare_t;
  checkUv(uv_prepare_init(loop_, prepare_), "uv_prepare_init");
  prepare_->data = this;
  checkUv(uv_prepare_start(prepare_, &UvEventPort::onPrepare), "uv_prepare_start");
  uv_unref(reinterpret_cast<uv_handle_t*>(prepare_));
  kjLoop_ = kj::heap<kj::EventLoop>(*this);
}

UvEventPort::~UvEventPort() noexcept(false) {
  kjLoop_ = nullptr;
  uv_prepare_stop(prepare_);
  closeAndFree(prepare_);
  uv_idle_stop(idle_);
  closeAndFree(idle_);
  closeAndFree(async_);
  // Runs the close callbacks (and whatever else is ready) so the loop can be closed after us.
  uv_run(loop_, UV_RUN_NOWAIT);
}

bool UvEventPort::wait() {
  inKjWait_ = true;
  KJ_DEFER(inKjWait_ = false);
  uv_ref(reinterpret_cast<uv_handle_t*>(async_));
  // KJ calls wait() when its queue is empty, so this normally blocks until the next libuv event
  // or timer; onPrepare() makes the final decision right before libuv polls.
  uv_run(loop_, kjLoop_->isRunnable() ? UV_RUN_NOWAIT : UV_RUN_ONCE);
  uv_unref(reinterpret_cast<uv_handle_t*>(async_));
  return woken_.exchange(false);
}

bool UvEventPort::poll() {
  inKjWait_ = true;
  KJ_DEFER(inKjWait_ = false);
  uv_run(loop_, UV_RUN_NOWAIT);
  return woken_.exchange(false);
}

void UvEventPort::setRunnable(bool runnable) {
  // Only a hint. KJ reports transitions, and not all of them: inside one Promise::wait() it calls
  // setRunnable(true) when the first event is queued but never setRunnable(false) when the queue
  // drains, so an idle handle left in step with this flag would make every later uv_run() poll
  // with a zero timeout (100% CPU while idle). Starting the idle handle here keeps a foreign
  // uv_run() alive and awake for the queued work; onPrepare() has the last word in every
  // iteration, from the KJ queue itself.
  if (runnable) {
    uv_idle_start(idle_, &UvEventPort::onIdle);
  } else {
    uv_idle_stop(idle_);
  }
}

void UvEventPort::wake() const {
  woken_.store(true);
  uv_async_send(async_);
}

void UvEventPort::onAsync(uv_async_t*) {
  // Nothing to do: wait() returns after this turn and reports woken_.
}

void UvEventPort::onPrepare(uv_prepare_t* handle) {
  // libuv runs prepare callbacks right before it computes the poll timeout (zero while an idle
  // handle is active, else until the next timer or forever) and blocks in epoll_wait(2).
  auto* self = static_cast<UvEventPort*>(handle->data);
  if (self->kjLoop_.get() == nullptr) {
    return;
  }
  if (!self->inKjWait_) {
    // Under a foreign uv_run(): nobody else will run what KJ has queued, so run it now.
    self->kjLoop_->run();
  }
  // Block only if KJ has nothing queued (a callback of this iteration, e.g. a timer, may have
  // queued something even inside wait()).
  if (self->kjLoop_->isRunnable()) {
    uv_idle_start(self->idle_, &UvEventPort::onIdle);
  } else {
    uv_idle_stop(self->idle_);
  }
}

void UvEventPort::onIdle(uv_idle_t*) {
  // Nothing to do: an active idle handle only keeps libuv from blocking; the next onPrepare()
  // (or KJ's own loop, inside wait()) runs the queued work.
}

namespace {

// Owns a running uv_timer_t for the life of the promise it is attached to.
class TimerGuard {
 public:
  TimerGuard(uv_loop_t* loop, uint64_t ms, kj::Own<kj::PromiseFulfiller<void>> fulfiller)
      : fulfiller_(kj::mv(fulfiller)), timer_(new uv_timer_t) {
    checkUv(uv_timer_init(loop, timer_), "uv_timer_init");
    timer_->data = this;
    checkUv(uv_timer_start(
                timer_,
                [](uv_timer_t* t) {
                  auto* self = static_cast<TimerGuard*>(t->data);
                  if (self != nullptr) {
                    self->fulfiller_->fulfill();
                  }
                },
                ms, 0),
            "uv_timer_start");
  }
  ~TimerGuard() {
    uv_timer_stop(timer_);
    timer_->data = nullptr;
    closeAndFree(timer_);
  }
  KJ_DISALLOW_COPY(TimerGuard);

 private:
  kj::Own<kj::PromiseFulfiller<void>> fulfiller_;
  uv_timer_t* timer_;
};

}  // namespace

kj::Promise<void> UvEventPort::afterDelay(uint64_t ms) {
  auto paf = kj::newPromiseAndFulfiller<void>();
  auto guard = kj::heap<TimerGuard>(loop_, ms, kj::mv(paf.fulfiller));
  return paf.promise.attach(kj::mv(guard));
}

// ---------------------------------------------------------------------------------------------
// UvFdWatcher

UvFdWatcher::UvFdWatcher(UvEventPort& port, int fd) : fd_(fd), poll_(new uv_poll_t) {
  int rc = uv_poll_init(port.uvLoop(), poll_, fd);
  if (rc != 0) {
    delete poll_;
    poll_ = nullptr;
    KJ_FAIL_REQUIRE("uv_poll_init failed", fd, uv_strerror(rc));
  }
  poll_->data = this;
}

UvFdWatcher::~UvFdWatcher() { stop(); }

void UvFdWatcher::stop() {
  if (poll_ != nullptr) {
    // uv_poll_stop(3) removes the descriptor from epoll at once, so it may be closed after this.
    uv_poll_stop(poll_);
    poll_->data = nullptr;
    closeAndFree(poll_);
    poll_ = nullptr;
  }
}

kj::Promise<void> UvFdWatcher::whenReadable() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  readable_ = kj::mv(paf.fulfiller);
  update();
  return kj::mv(paf.promise);
}

kj::Promise<void> UvFdWatcher::whenWritable() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  writable_ = kj::mv(paf.fulfiller);
  update();
  return kj::mv(paf.promise);
}

kj::Promise<void> UvFdWatcher::whenHangup() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  hangup_ = kj::mv(paf.fulfiller);
  update();
  return kj::mv(paf.promise);
}

void UvFdWatcher::update() {
  if (poll_ == nullptr) {
    return;
  }
  auto waiting = [](kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>>& slot) {
    KJ_IF_MAYBE (f, slot) {
      if ((*f)->isWaiting()) {
        return true;
      }
      slot = nullptr;
    }
    return false;
  };
  int events = 0;
  if (waiting(readable_)) {
    events |= UV_READABLE;
  }
  if (waiting(writable_)) {
    events |= UV_WRITABLE;
  }
  // epoll always reports EPOLLHUP/EPOLLERR, and libuv hands them to the callback as whichever
  // events are requested. Asking for UV_PRIORITIZED (urgent data, which our peers never send)
  // lets us hear about a hangup without asking for readability, which would spin while unread
  // data sits in the socket.
  if (waiting(hangup_) && hangupWatchOk_) {
    events |= UV_PRIORITIZED;
  }
  if (events == watching_) {
    return;
  }
  watching_ = events;
  if (events == 0) {
    uv_poll_stop(poll_);
  } else {
    checkUv(uv_poll_start(poll_, events, &UvFdWatcher::onPoll), "uv_poll_start");
  }
}

void UvFdWatcher::fire(kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>>& slot) {
  KJ_IF_MAYBE (f, slot) {
    auto fulfiller = kj::mv(*f);
    slot = nullptr;
    fulfiller->fulfill();
  }
}

void UvFdWatcher::onPoll(uv_poll_t* handle, int status, int events) {
  auto* self = static_cast<UvFdWatcher*>(handle->data);
  if (self == nullptr) {
    return;
  }
  if (status < 0) {
    // POLLERR without urgent data: libuv has stopped the handle. Wake everyone; the next
    // syscall reports the error.
    self->watching_ = 0;
    self->fire(self->readable_);
    self->fire(self->writable_);
    self->fire(self->hangup_);
    self->update();
    return;
  }
  if (events & UV_READABLE) {
    self->fire(self->readable_);
  }
  if (events & UV_WRITABLE) {
    self->fire(self->writable_);
  }
  if (self->hangup_ != nullptr && (events & (UV_PRIORITIZED | UV_READABLE | UV_WRITABLE))) {
    pollfd pfd{self->fd_, POLLOUT, 0};
    if (::poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLHUP | POLLERR))) {
      self->fire(self->hangup_);
    } else if (events & UV_PRIORITIZED) {
      self->hangupWatchOk_ = false;  // real urgent data: stop asking, or we would spin
    }
  }
  self->update();
}

// ---------------------------------------------------------------------------------------------
// UvFdStream

namespace {
struct DisconnectPaf {
  kj::Own<kj::PromiseFulfiller<void>> fulfiller;
  kj::ForkedPromise<void> forked;
};
DisconnectPaf makeDisconnectPaf() {
  auto paf = kj::newPromiseAndFulfiller<void>();
  return DisconnectPaf{kj::mv(paf.fulfiller), paf.promise.fork()};
}
bool isSocket(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}
}  // namespace

UvFdStream::UvFdStream(UvEventPort& port, kj::AutoCloseFd fd)
    : fd_(kj::mv(fd)),
      isSocket_(isSocket(fd_.get())),
      watcher_(port, fd_.get()),
      disconnected_(nullptr) {
  setNonBlocking(fd_.get());
  auto paf = makeDisconnectPaf();
  disconnectFulfiller_ = kj::mv(paf.fulfiller);
  disconnected_ = kj::mv(paf.forked);
}

UvFdStream::~UvFdStream() noexcept(false) { watcher_.stop(); }

kj::AutoCloseFd UvFdStream::releaseFd() {
  watcher_.stop();
  return kj::mv(fd_);
}

kj::Promise<size_t> UvFdStream::tryRead(void* buffer, size_t minBytes, size_t maxBytes) {
  // evalNow: errors reach the caller as a rejected promise, never as a throw from here.
  return kj::evalNow(
      [&]() { return readLoop(static_cast<kj::byte*>(buffer), minBytes, maxBytes, 0); });
}

kj::Promise<size_t> UvFdStream::readLoop(kj::byte* buffer, size_t minBytes, size_t maxBytes,
                                         size_t alreadyRead) {
  for (;;) {
    ssize_t n = ::read(fd_.get(), buffer, maxBytes);
    if (n < 0) {
      int error = errno;
      if (error == EINTR) {
        continue;
      }
      if (error == EAGAIN || error == EWOULDBLOCK) {
        return watcher_.whenReadable().then([this, buffer, minBytes, maxBytes, alreadyRead]() {
          return readLoop(buffer, minBytes, maxBytes, alreadyRead);
        });
      }
      KJ_FAIL_SYSCALL("read", error, fd_.get());
    }
    if (n == 0) {
      return alreadyRead;  // end of stream
    }
    alreadyRead += n;
    if (size_t(n) >= minBytes) {
      return alreadyRead;
    }
    buffer += n;
    minBytes -= n;
    maxBytes -= n;
  }
}

kj::Promise<void> UvFdStream::write(const void* buffer, size_t size) {
  auto iov = kj::heapArray<iovec>(1);
  iov[0] = iovec{const_cast<void*>(buffer), size};
  return kj::evalNow([&]() { return writeLoop(kj::mv(iov), 0); });
}

kj::Promise<void> UvFdStream::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  auto iov = kj::heapArray<iovec>(pieces.size());
  for (size_t i = 0; i < pieces.size(); i++) {
    iov[i] = iovec{const_cast<kj::byte*>(pieces[i].begin()), pieces[i].size()};
  }
  return kj::evalNow([&]() { return writeLoop(kj::mv(iov), 0); });
}

kj::Promise<void> UvFdStream::writeLoop(kj::Array<iovec> iov, size_t first) {
  for (;;) {
    while (first < iov.size() && iov[first].iov_len == 0) {
      first++;
    }
    if (first == iov.size()) {
      return kj::READY_NOW;
    }
    size_t count = kj::min(iov.size() - first, size_t(IOV_MAX));
    ssize_t n;
    if (isSocket_) {
      msghdr msg{};
      msg.msg_iov = &iov[first];
      msg.msg_iovlen = count;
      n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    } else {
      n = ::writev(fd_.get(), &iov[first], count);
    }
    if (n < 0) {
      int error = errno;
      if (error == EINTR) {
        continue;
      }
      if (error == EAGAIN || error == EWOULDBLOCK) {
        return watcher_.whenWritable().then(
            [this, iov = kj::mv(iov), first]() mutable { return writeLoop(kj::mv(iov), first); });
      }
      if (error == EPIPE || error == ECONNRESET) {
        writeFailed();
      }
      KJ_FAIL_SYSCALL("write", error, fd_.get());
    }
    size_t done = n;
    while (done > 0) {
      size_t step = kj::min(done, iov[first].iov_len);
      iov[first].iov_base = static_cast<kj::byte*>(iov[first].iov_base) + step;
      iov[first].iov_len -= step;
      done -= step;
      if (iov[first].iov_len == 0) {
        first++;
      }
    }
  }
}

void UvFdStream::writeFailed() {
  if (disconnectFulfiller_->isWaiting()) {
    disconnectFulfiller_->fulfill();
  }
}

kj::Promise<void> UvFdStream::whenWriteDisconnected() {
  // One hangup watch serves every caller; each holds a branch of the forked promise.
  if (hangupTask_ == nullptr) {
    hangupTask_ = watcher_.whenHangup().then([this]() { writeFailed(); }).eagerlyEvaluate(nullptr);
  }
  return disconnected_.addBranch();
}

void UvFdStream::shutdownWrite() {
  if (::shutdown(fd_.get(), SHUT_WR) < 0 && errno != ENOTCONN && errno != ENOTSOCK) {
    KJ_FAIL_SYSCALL("shutdown(SHUT_WR)", errno, fd_.get());
  }
}

void UvFdStream::abortRead() { ::shutdown(fd_.get(), SHUT_RD); }

void UvFdStream::getsockopt(int level, int option, void* value, uint* length) {
  socklen_t len = *length;
  KJ_SYSCALL(::getsockopt(fd_.get(), level, option, value, &len));
  *length = len;
}

void UvFdStream::setsockopt(int level, int option, const void* value, uint length) {
  KJ_SYSCALL(::setsockopt(fd_.get(), level, option, value, length));
}

void UvFdStream::getsockname(struct sockaddr* addr, uint* length) {
  socklen_t len = *length;
  KJ_SYSCALL(::getsockname(fd_.get(), addr, &len));
  *length = len;
}

void UvFdStream::getpeername(struct sockaddr* addr, uint* length) {
  socklen_t len = *length;
  KJ_SYSCALL(::getpeername(fd_.get(), addr, &len));
  *length = len;
}

// ---------------------------------------------------------------------------------------------
// UvTcpListener and connectTcp

namespace {
kj::AutoCloseFd makeTcpSocket() {
  int fd;
  KJ_SYSCALL(fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  return kj::AutoCloseFd(fd);
}

kj::AutoCloseFd bindListening(const sockaddr_in& address, int backlog) {
  auto fd = makeTcpSocket();
  int one = 1;
  KJ_SYSCALL(setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)));
  char text[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &address.sin_addr, text, sizeof(text));
  if (bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) < 0 ||
      listen(fd.get(), backlog) < 0) {
    int error = errno;
    kj::throwFatalException(kj::Exception(
        kj::Exception::Type::FAILED, __FILE__, __LINE__,
        kj::str("cannot listen on ", text, ":", ntohs(address.sin_port), ": ", strerror(error))));
  }
  return fd;
}
}  // namespace

UvTcpListener::UvTcpListener(UvEventPort& port, const sockaddr_in& address, int backlog)
    : port_(port), fd_(bindListening(address, backlog)), watcher_(port, fd_.get()) {}

uint16_t UvTcpListener::port() const {
  sockaddr_in sin{};
  socklen_t len = sizeof(sin);
  KJ_SYSCALL(::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&sin), &len));
  return ntohs(sin.sin_port);
}

kj::Promise<UvTcpListener::Accepted> UvTcpListener::accept() {
  for (;;) {
    Accepted result;
    socklen_t len = sizeof(result.peer);
    int fd = ::accept4(fd_.get(), reinterpret_cast<sockaddr*>(&result.peer), &len,
                       SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      result.fd = kj::AutoCloseFd(fd);
      return kj::mv(result);
    }
    int error = errno;
    if (error == EINTR || error == ECONNABORTED) {
      continue;
    }
    if (error == EAGAIN || error == EWOULDBLOCK || error == EMFILE || error == ENFILE ||
        error == ENOBUFS || error == ENOMEM || error == EPROTO || error == EPERM) {
      // Nothing queued: wait for readiness. Out of descriptors or memory: the queued connection
      // keeps the socket readable, so back off for a while instead of spinning.
      bool transient = error != EAGAIN && error != EWOULDBLOCK;
      kj::Promise<void> ready = transient ? port_.afterDelay(100) : watcher_.whenReadable();
      return ready.then([this]() { return accept(); });
    }
    KJ_FAIL_SYSCALL("accept4", error);
  }
}

namespace {
kj::Exception connectFailed(const kj::String& where, int error) {
  return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__,
                       kj::str("connect to ", where, ": ", strerror(error)));
}

kj::Promise<kj::Own<UvFdStream>> startConnect(UvEventPort& port, const sockaddr_in& address,
                                              const sockaddr_in* source) {
  auto fd = makeTcpSocket();
  char text[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &address.sin_addr, text, sizeof(text));
  auto where = kj::str(text, ":", ntohs(address.sin_port));
  if (source != nullptr) {
    KJ_SYSCALL(bind(fd.get(), reinterpret_cast<const sockaddr*>(source), sizeof(*source)));
  }
  int rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  if (rc == 0) {
    return kj::heap<UvFdStream>(port, kj::mv(fd));
  }
  if (errno != EINPROGRESS) {
    return connectFailed(where, errno);
  }
  auto watcher = kj::heap<UvFdWatcher>(port, fd.get());
  auto writable = watcher->whenWritable();
  return writable.then([&port, fd = kj::mv(fd), where = kj::mv(where),
                        watcher = kj::mv(watcher)]() mutable -> kj::Own<UvFdStream> {
    watcher->stop();
    int error = 0;
    socklen_t len = sizeof(error);
    KJ_SYSCALL(::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &len));
    if (error != 0) {
      kj::throwFatalException(connectFailed(where, error));
    }
    return kj::heap<UvFdStream>(port, kj::mv(fd));
  });
}
}  // namespace

kj::Promise<kj::Own<UvFdStream>> connectTcp(UvEventPort& port, const sockaddr_in& address,
                                            const sockaddr_in* source) {
  return kj::evalNow([&]() { return startConnect(port, address, source); });
}

}  // namespace mos
