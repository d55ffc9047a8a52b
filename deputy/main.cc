// mos-deputy(8): the home side of a migrated job. Started only by the migration agent, which
// injects execve(mos-deputy, argv) into the job's home process P (design decision 1); see
// docs/mos-deputy.8.md.

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <kj/debug.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "channel.h"
#include "deputy.h"
#include "fds.h"
#include "signals.h"
#include "startup.h"

namespace mos::deputy {
namespace {

// The deputy logs to a reserved duplicate of the stderr it started with, so its log never lands
// in a file the job later opens as fd 2.
std::atomic<int> logFd{-1};

class ReservedFdSink : public spdlog::sinks::base_sink<std::mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t formatted;
    formatter_->format(msg, formatted);
    int fd = logFd.load();
    size_t done = 0;
    while (fd >= 0 && done < formatted.size()) {
      ssize_t n = write(fd, formatted.data() + done, formatted.size() - done);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        return;
      }
      done += n;
    }
  }
  void flush_() override {}
};

void setUpLogging(ReservedFds& fds) {
  int copy = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 0);
  if (copy >= 0) {
    try {
      logFd = fds.moveHigh(copy, [](int oldFd, int newFd) {
        logFd = newFd;
        close(oldFd);
      });
    } catch (kj::Exception&) {
      logFd = -1;
    }
  }
  auto logger = std::make_shared<spdlog::logger>("mos-deputy", std::make_shared<ReservedFdSink>());
  logger->set_pattern("[mos-deputy %P] %l: %v");
  auto level = spdlog::level::warn;
  if (const char* env = getenv("UMOSIX_LOG")) {
    level = spdlog::level::from_str(env);
  }
  logger->set_level(level);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(logger);
}

// Our argv without the options of this start only: "--image PATH", and "--channel-fd FD" and
// "--started PID" of a start that `migrate` streamed (also in their "--opt=VALUE" forms). The
// next agent (an exec at home) appends its own --image; a later deputy must connect itself.
std::vector<std::string> argvWithoutImage(int argc, char** argv) {
  static const char* const once[] = {"--image", "--channel-fd", "--started"};
  std::vector<std::string> result;
  for (int i = 0; i < argc; i++) {
    std::string arg = argv[i];
    bool drop = false;
    for (const char* name : once) {
      if (arg == name) {
        i++;
        drop = true;
      } else if (arg.rfind(std::string(name) + "=", 0) == 0) {
        drop = true;
      }
    }
    if (!drop) {
      result.push_back(arg);
    }
  }
  return result;
}

int deputyMain(int argc, char** argv) {
  // Every signal stays pending until the loop opens them (signals.h): one that arrives during
  // startup is forwarded to the guest once it runs.
  blockAllSignals();
  ReservedFds fds;
  setUpLogging(fds);

  CLI::App app{"mos-deputy: the home side of a migrated umosix job"};
  DeputyOptions options;
  std::string imagePath;
  std::string keyPath = DEFAULT_KEY_PATH;
  app.add_option("--node", options.node, "the remote node running the guest")->required();
  app.add_option("--address", options.address, "its address")->required();
  app.add_option("--port", options.port, "its mosd port")->required();
  app.add_option("--home-node", options.homeNode, "this node's id")->required();
  app.add_option("--run-dir", options.runDir, "mosd's run directory")->required();
  app.add_option("--image", imagePath, "the migration image (unlinked once read)")->required();
  app.add_option("--key", keyPath, "the cluster key file (default /etc/umosix/cluster.key)");
  int channelFd = -1;
  pid_t startedAs = 0;
  app.add_option("--channel-fd", channelFd,
                 "`migrate PID NODE`: the job's connection to the node, already open in this "
                 "process (it streamed the image through it; --image is then the header alone)");
  app.add_option("--started", startedAs,
                 "with --channel-fd: the guest runs on the node already, as this pid there");
  app.add_flag("--locked", options.locked,
               "mosrun -L: the job stays on its node; `migrate` is refused (with its forks)");
  // A migration agent passes our arguments in UMOSIX_DEPUTY_ARGS (one per line) and leaves
  // argv to be the job's own, which is what ps shows for the job at home.
  std::vector<std::string> args;
  if (const char* packed = getenv("UMOSIX_DEPUTY_ARGS")) {
    args.push_back(argv[0]);
    std::string rest(packed);
    for (size_t start = 0; start < rest.size();) {
      size_t end = rest.find('\n', start);
      args.push_back(rest.substr(start, end == std::string::npos ? end : end - start));
      start = end == std::string::npos ? rest.size() : end + 1;
    }
  } else {
    args.assign(argv, argv + argc);
  }
  std::vector<char*> parsed;
  for (auto& a : args) {
    parsed.push_back(a.data());
  }
  try {
    app.parse(static_cast<int>(parsed.size()), parsed.data());
  } catch (const CLI::ParseError& e) {
    int status = app.exit(e);
    return status == 0 ? 0 : EXIT_CANNOT_RUN;
  }
  options.selfExe = readLink("/proc/self/exe");
  // Kept for a later move to another node; the job may change its directory meanwhile.
  options.keyPath = std::filesystem::absolute(keyPath).string();
  options.selfArgv = argvWithoutImage(static_cast<int>(parsed.size()), parsed.data());

  kj::Own<ImageFile> image;
  try {
    image = kj::heap<ImageFile>(imagePath);
  } catch (kj::Exception& e) {
    unlink(imagePath.c_str());
    printMosrunMessage("cannot read the migration image " + imagePath + ": " +
                       e.getDescription().cStr());
    return EXIT_CANNOT_RUN;
  }
  // Kept until the guest runs: if the node fails the start, the job runs on at home from it.
  auto header = image->header();
  options.jobExe = std::string(reinterpret_cast<const char*>(header.getExe().getPath().begin()),
                               header.getExe().getPath().size());
  options.command = imageCommand(header);
  // ps and top at home show the job's name, as for the native process (openMosix did the same).
  if (header.hasCommand()) {
    prctl(PR_SET_NAME, header.getCommand().cStr(), 0, 0, 0);
  }
  // A running job that `migrate` moved had its close-on-exec flags cleared so that its
  // descriptors survived the exec of this program: they are the job's again (its own later
  // execs at home depend on them). SIGCHLD's SA_NOCLDWAIT did not survive the exec either.
  bool noChildWait = false;
  for (auto file : header.getFiles()) {
    if (file.getCloseOnExec()) {
      fcntl(file.getFd(), F_SETFD, FD_CLOEXEC);
    }
  }
  for (auto action : header.getSigActions()) {
    if (action.getSigno() == SIGCHLD &&
        action.getHandler() != reinterpret_cast<uint64_t>(SIG_IGN) &&
        (action.getFlags() & SA_NOCLDWAIT) != 0) {
      noChildWait = true;
    }
  }
  int imageFd;
  try {
    imageFd = fds.moveHigh(image->releaseFd().release());
  } catch (kj::Exception& e) {
    printMosrunMessage(std::string("cannot keep the migration image open: ") +
                       e.getDescription().cStr());
    unlink(imagePath.c_str());
    return EXIT_CANNOT_RUN;
  }
  kj::AutoCloseFd imageOwner(imageFd);
  uint64_t headerEnd = image->headerEnd();

  kj::Own<Channel> channel;
  if (channelFd >= 0) {
    // `migrate PID NODE` streamed the image through this connection while the job was still
    // itself, and the guest runs: nothing to send, no way back to an image (it was the stream).
    image = nullptr;
    fds.remove(imageFd);
    imageOwner = nullptr;
    unlink(imagePath.c_str());
    int fd;
    try {
      fd = fds.moveHigh(channelFd);
    } catch (kj::Exception& e) {
      printMosrunMessage(std::string("cannot keep the job's connection: ") +
                         e.getDescription().cStr());
      return EXIT_CANNOT_RUN;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    // Urgent data from the supervisor (a cancel) raises SIGURG in this thread.
    struct f_owner_ex owner = {F_OWNER_TID, static_cast<pid_t>(gettid())};
    fcntl(fd, F_SETOWN_EX, &owner);
    channel = kj::heap<Channel>(kj::AutoCloseFd(fd));
  } else {
    std::optional<ClusterCredentials> credentials;
    try {
      credentials.emplace(ClusterCredentials{options.homeNode, ClusterKey::load(keyPath)});
    } catch (kj::Exception& e) {
      runOnAtHome(fds, imagePath, options.jobExe, e.getDescription().cStr());
    }

    std::string where = "node " + std::to_string(options.node) + " (" + options.address + ":" +
                        std::to_string(options.port) + ")";
    int fd = connectJobSocket(options.address, options.port, 5000, fds);
    bool refused = false;
    if (fd >= 0) {
      int err = sendHello(fd, *credentials, 5000);
      if (err < 0) {
        fds.remove(fd);
        close(fd);
        fd = err;
        refused = err == -EACCES;
      }
    }
    credentials.reset();
    if (refused) {
      runOnAtHome(fds, imagePath, options.jobExe,
                  where + " refused node " + std::to_string(options.homeNode) + " (is " + keyPath +
                      " the cluster's key?)");
    }
    if (fd < 0) {
      runOnAtHome(fds, imagePath, options.jobExe,
                  "cannot reach " + where + ": " + std::string(strerror(-fd)));
    }
    channel = kj::heap<Channel>(kj::AutoCloseFd(fd));
    try {
      capnp::MallocMessageBuilder start;
      fillJobStart(options.homeNode, options.command, start);
      channel->send(start);
      sendFileBytes(*channel, imageFd, 0, headerEnd);
    } catch (kj::Exception& e) {
      channel = nullptr;
      runOnAtHome(fds, imagePath, options.jobExe,
                  "cannot reach " + where + ": " + e.getDescription().cStr());
    }
    image = nullptr;
    spdlog::info("job {} ({}) sent to {}", getpid(), options.command, where);
  }
  installSignalHandlers();
  if (noChildWait) {
    mirrorChildDisposition(2);
  }
  Deputy deputy(std::move(options), fds, kj::mv(channel));
  if (channelFd >= 0) {
    deputy.guestStarted(startedAs);
  } else {
    // The frames follow when the supervisor asks (sendImage); the loop sends them.
    deputy.setImageToSend(kj::mv(imageOwner), headerEnd);
    deputy.setStartImagePath(imagePath);
  }
  deputy.run();
}

}  // namespace
}  // namespace mos::deputy

int main(int argc, char** argv) {
  int status = mos::deputy::deputyMain(argc, argv);
  _exit(status);
}
