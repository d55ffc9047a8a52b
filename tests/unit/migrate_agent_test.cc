// The migration Agent end to end on one machine: a child starts the Agent and execs a program;
// the agent captures it at the exec stop and turns the child into a deputy (a test stand-in that
// restores the image locally); the child's output and exit status must be the program's.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include <catch2/catch.hpp>
#include <kj/exception.h>

#include "migrate.h"

namespace {

struct Run {
  std::string output;
  int status = -1;
  pid_t agent = -1;
  int agentStatus = -1;
};

// Forks a child that starts an Agent and execs `program` (argv {program, arg...}); after a
// failed exec the child cancels the agent and exits 42. The test process is a child subreaper,
// so the orphaned agent becomes our child and is reaped here.
Run runUnderAgent(const std::string& deputy, const char* program, const char* arg1,
                  const char* arg2) {
  REQUIRE(prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  int out[2], info[2];
  REQUIRE(pipe2(out, O_CLOEXEC) == 0);
  REQUIRE(pipe2(info, O_CLOEXEC) == 0);
  std::string image = "/tmp/mos-agent-test-" + std::to_string(getpid()) + ".img";
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    dup2(out[1], 1);
    mos::migrate::AgentConfig config;
    config.deputyPath = deputy;
    config.deputyArgv = {"migrate_test_deputy"};
    config.imagePath = image;
    pid_t agentPid = -1;
    try {
      mos::migrate::Agent agent = mos::migrate::Agent::start(config);
      agentPid = agent.pid();
      (void)!write(info[1], &agentPid, sizeof(agentPid));
      execl(program, program, arg1, arg2, static_cast<char*>(nullptr));
      agent.cancel();
      _exit(42);
    } catch (kj::Exception& e) {
      fprintf(stderr, "Agent::start: %s\n", e.getDescription().cStr());
      _exit(100);
    }
  }
  close(out[1]);
  close(info[1]);
  Run run;
  REQUIRE(read(info[0], &run.agent, sizeof(run.agent)) == sizeof(run.agent));
  close(info[0]);
  char buf[4096];
  ssize_t n;
  while ((n = read(out[0], buf, sizeof(buf))) > 0) {
    run.output.append(buf, n);
  }
  close(out[0]);
  REQUIRE(waitpid(child, &run.status, 0) == child);
  REQUIRE(waitpid(run.agent, &run.agentStatus, 0) == run.agent);
  int status;
  CHECK(waitpid(-1, &status, WNOHANG) == -1);  // nothing else left
  CHECK(access(image.c_str(), F_OK) != 0);     // the deputy consumed the image
  return run;
}

}  // namespace

TEST_CASE("agent migrates echo into the deputy, which restores it", "[migrate][agent]") {
  Run run = runUnderAgent(MIGRATE_TEST_DEPUTY, "/bin/echo", "agent", "works");
  CHECK(run.output == "agent works\n");
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 0);
  REQUIRE(WIFEXITED(run.agentStatus));
  CHECK(WEXITSTATUS(run.agentStatus) == 0);
}

TEST_CASE("agent carries a program's exit status through the deputy", "[migrate][agent]") {
  Run run = runUnderAgent(MIGRATE_TEST_DEPUTY, "/bin/sh", "-c", "echo from sh; exit 7");
  CHECK(run.output == "from sh\n");
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 7);
}

TEST_CASE("failed exec with cancel leaves no agent behind", "[migrate][agent]") {
  Run run = runUnderAgent(MIGRATE_TEST_DEPUTY, "/nonexistent/program", "a", "b");
  CHECK(run.output.empty());
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 42);
  REQUIRE(WIFEXITED(run.agentStatus));
  CHECK(WEXITSTATUS(run.agentStatus) == 0);
  CHECK(kill(run.agent, 0) == -1);
}

TEST_CASE("a deputy that cannot be executed ends the job with status 125", "[migrate][agent]") {
  Run run = runUnderAgent("/nonexistent/mos-deputy", "/bin/echo", "never", "printed");
  CHECK(run.output.empty());
  REQUIRE(WIFEXITED(run.status));
  CHECK(WEXITSTATUS(run.status) == 125);
}

TEST_CASE("an exec retried at once after a cancelled one can be seized again", "[migrate][agent]") {
  // execvp's PATH search: each failed execve cancels its agent and the next one starts at once.
  // The old agent must have let go of the caller by then, or PTRACE_SEIZE fails with EPERM.
  REQUIRE(prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    mos::migrate::AgentConfig config;
    config.deputyPath = "/nonexistent/deputy";
    config.deputyArgv = {"migrate_test_deputy"};
    config.imagePath = "/tmp/mos-agent-retry-" + std::to_string(getpid()) + ".img";
    for (int round = 0; round < 50; round++) {
      try {
        mos::migrate::Agent agent = mos::migrate::Agent::start(config);
        execl("/nonexistent/program", "program", static_cast<char*>(nullptr));
        agent.cancel();
      } catch (kj::Exception& e) {
        fprintf(stderr, "round %d: Agent::start: %s\n", round, e.getDescription().cStr());
        _exit(100 + (round > 0));
      }
    }
    _exit(0);
  }
  int status = -1;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);  // 101: a later round found the caller still traced
  // Reap the agents (orphans of the child; we are their subreaper).
  while (waitpid(-1, nullptr, WNOHANG) > 0) {
  }
}
