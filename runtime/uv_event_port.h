#pragma once
// KJ on libuv (design decision 8): one event loop per process, libuv's, with KJ's promises and
// Cap'n Proto RPC running on top of it through UvEventPort. Also here: what two-party RPC needs
// to run on that loop over a plain descriptor (UvFdStream), a TCP listener and a TCP connect with
// the loop's timers.
//
// Usage:
//   uv_loop_t loop; uv_loop_init(&loop);
//   {
//     mos::UvEventPort port(&loop);
//     kj::WaitScope waitScope(port.kjLoop());
//     ... promise.wait(waitScope);   // runs uv_run(UV_RUN_ONCE) while KJ has nothing to do
//   }
//   uv_loop_close(&loop);
//
// Either drive everything with Promise::wait() (KJ calls wait()/poll(), which run libuv), or run
// libuv yourself with uv_run(): a prepare handle runs what KJ has queued in every loop iteration,
// so promise continuations also run under uv_run().
//
// The loop sleeps when there is nothing to do (as KJ's UnixEventPort does): right before libuv
// blocks, the port asks the KJ loop whether it has work queued and lets libuv block until the
// next descriptor event or timer only when it has none. It never relies on the flag passed to
// setRunnable(), which KJ does not keep up to date inside Promise::wait().
//
// libuv is not reentrant: never call Promise::wait() (or anything that runs uv_run) from inside
// a libuv callback. A KJ continuation is fine: it runs from wait() or from the prepare handle.
//
// Every libuv handle allocated here is freed by its close callback, so after destroying these
// objects run the loop once more (the UvEventPort destructor does a UV_RUN_NOWAIT turn) before
// uv_loop_close(). Not thread safe, except UvEventPort::wake().

#include <kj/async-io.h>
#include <kj/async.h>
#include <kj/io.h>
#include <netinet/in.h>
#include <uv.h>

#include <atomic>
#include <cstdint>

namespace mos {

class UvEventPort final : public kj::EventPort {
 public:
  // Attaches to `loop`, which must outlive the port, and creates the KJ EventLoop (kjLoop()).
  explicit UvEventPort(uv_loop_t* loop);
  ~UvEventPort() noexcept(false);
  KJ_DISALLOW_COPY(UvEventPort);

  uv_loop_t* uvLoop() const { return loop_; }
  kj::EventLoop& kjLoop() { return *kjLoop_; }

  // kj::EventPort: wait() is one uv_run(UV_RUN_ONCE) (blocks until some libuv event, or does not
  // block if KJ has work queued), poll() is one uv_run(UV_RUN_NOWAIT). Both return true when
  // wake() was called since the last return of true.
  bool wait() override;
  bool poll() override;
  // A hint only: whether libuv may block is decided from KJ's queue itself right before it blocks.
  void setRunnable(bool runnable) override;
  // Thread safe: uv_async_send(3).
  void wake() const override;

  // Resolves after `ms` milliseconds of the loop's clock (uv_timer_t). Dropping the promise stops
  // the timer.
  kj::Promise<void> afterDelay(uint64_t ms);

  // Rejects with kj::Exception of type DISCONNECTED and `message` unless `promise` settles
  // within `ms` milliseconds (then `promise` is cancelled).
  template <typename T>
  kj::Promise<T> timeoutAfter(uint64_t ms, kj::String message, kj::Promise<T> promise) {
    return promise.exclusiveJoin(afterDelay(ms).then([message =
                                                          kj::mv(message)]() -> kj::Promise<T> {
      return kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__, kj::str(message));
    }));
  }

 private:
  static void onAsync(uv_async_t* handle);
  static void onIdle(uv_idle_t* handle);
  static void onPrepare(uv_prepare_t* handle);

  uv_loop_t* loop_;
  uv_async_t* async_;      // heap, freed by its close callback
  uv_idle_t* idle_;        // active only while KJ has work queued: libuv must not block
  uv_prepare_t* prepare_;  // always active, unreferenced: decides whether an iteration may block
  mutable std::atomic<bool> woken_{false};
  bool inKjWait_ = false;  // inside wait()/poll(): KJ is already running its own loop
  kj::Own<kj::EventLoop> kjLoop_;
};

// Watches one descriptor with a uv_poll_t and turns readiness into promises. Does not own the
// descriptor; stop() (or destruction) must happen before the descriptor is closed.
class UvFdWatcher {
 public:
  UvFdWatcher(UvEventPort& port, int fd);
  ~UvFdWatcher();
  KJ_DISALLOW_COPY(UvFdWatcher);

  // Resolve when the descriptor is (or may be: callers retry on EAGAIN) readable / writable. An
  // error condition on the descriptor resolves them too, so the next syscall reports it.
  kj::Promise<void> whenReadable();
  kj::Promise<void> whenWritable();
  // Resolves when the descriptor reports POLLHUP or POLLERR (for a socket: the connection is gone
  // in both directions, e.g. reset by the peer).
  kj::Promise<void> whenHangup();
  // Stops watching for good (epoll deregistration is immediate); pending promises never resolve.
  void stop();

 private:
  static void onPoll(uv_poll_t* handle, int status, int events);
  void update();
  void fire(kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>>& slot);

  int fd_;
  uv_poll_t* poll_;  // heap, freed by its close callback; nullptr once stopped
  int watching_ = 0;
  bool hangupWatchOk_ = true;  // false after a spurious UV_PRIORITIZED (real OOB data)
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> readable_;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> writable_;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> hangup_;
};

// A kj::AsyncIoStream over a connected stream descriptor (TCP or Unix socket, pipe), made
// non-blocking. Owns the descriptor. Errors are kj::Exceptions from KJ_FAIL_SYSCALL, so resets
// and broken pipes are of type DISCONNECTED. Writes use MSG_NOSIGNAL on sockets (no SIGPIPE).
class UvFdStream final : public kj::AsyncIoStream {
 public:
  UvFdStream(UvEventPort& port, kj::AutoCloseFd fd);
  ~UvFdStream() noexcept(false);
  KJ_DISALLOW_COPY(UvFdStream);

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  // Resolves when the descriptor hangs up or a write failed because the peer is gone.
  kj::Promise<void> whenWriteDisconnected() override;
  // shutdown(2) SHUT_WR / SHUT_RD; ENOTCONN is ignored.
  void shutdownWrite() override;
  void abortRead() override;
  void getsockopt(int level, int option, void* value, uint* length) override;
  void setsockopt(int level, int option, const void* value, uint length) override;
  void getsockname(struct sockaddr* addr, uint* length) override;
  void getpeername(struct sockaddr* addr, uint* length) override;
  kj::Maybe<int> getFd() const override { return fd_.get(); }

  // Stops watching and gives the descriptor away (still non-blocking). The stream must not be
  // used afterwards except to destroy it.
  kj::AutoCloseFd releaseFd();

 private:
  kj::Promise<size_t> readLoop(kj::byte* buffer, size_t minBytes, size_t maxBytes,
                               size_t alreadyRead);
  kj::Promise<void> writeLoop(kj::Array<iovec> iov, size_t first);
  void writeFailed();

  kj::AutoCloseFd fd_;
  bool isSocket_;
  UvFdWatcher watcher_;
  kj::Own<kj::PromiseFulfiller<void>> disconnectFulfiller_;
  kj::ForkedPromise<void> disconnected_;
  kj::Maybe<kj::Promise<void>> hangupTask_;  // watches for POLLHUP once someone asks
};

// A non-blocking listening TCP socket (SO_REUSEADDR, CLOEXEC) watched on the loop.
class UvTcpListener {
 public:
  struct Accepted {
    kj::AutoCloseFd fd;  // non-blocking, close-on-exec
    sockaddr_in peer;
  };

  // Binds `address` (port 0: the kernel picks one, see port()) and listens. Throws kj::Exception
  // (FAILED) described "cannot listen on A:P: strerror" (EADDRINUSE, EADDRNOTAVAIL, ...).
  UvTcpListener(UvEventPort& port, const sockaddr_in& address, int backlog = 128);
  KJ_DISALLOW_COPY(UvTcpListener);

  // The bound port, host byte order.
  uint16_t port() const;
  int fd() const { return fd_.get(); }

  // The next connection. Transient accept errors (ECONNABORTED, EMFILE, ...) are retried
  // after the next readiness; only one accept() may be pending at a time.
  kj::Promise<Accepted> accept();

 private:
  UvEventPort& port_;
  kj::AutoCloseFd fd_;
  UvFdWatcher watcher_;
};

// Connects a non-blocking TCP socket to `address`; with `source`, binds it there first (to pick
// the source address). Rejects with a DISCONNECTED kj::Exception whose description is
// "connect to ADDRESS:PORT: strerror" (ECONNREFUSED, ENETUNREACH, ...). No timeout: use
// UvEventPort::timeoutAfter().
kj::Promise<kj::Own<UvFdStream>> connectTcp(UvEventPort& port, const sockaddr_in& address,
                                            const sockaddr_in* source = nullptr);

// sockaddr_in for a host-order IPv4 address and port.
sockaddr_in makeSockaddr(uint32_t address, uint16_t port);

}  // namespace mos
