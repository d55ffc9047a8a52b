// The job record's trail (mps MOVES, --json trail): arrivals, moves, and the trail passed on to
// the next record of the same process (a deputy after an exec or a move), not to another one.
#include <unistd.h>

#include <filesystem>
#include <string>

#include <catch2/catch.hpp>

#include "job_registry.h"

namespace {

std::string tempRunDir() {
  std::string dir = std::filesystem::temp_directory_path() / "umosix-registry-test-XXXXXX";
  REQUIRE(mkdtemp(dir.data()) != nullptr);
  return dir;
}

}  // namespace

TEST_CASE("a record's trail counts moves between nodes, not repeats", "[unit][registry]") {
  std::string run = tempRunDir();
  pid_t self = getpid();
  {
    auto record = mos::OwnedJobRecord::create(run, "jobs", self, self, 1, "job");
    mos::noteArrival(record.get(), 2);
    mos::noteArrival(record.get(), 2);  // an exec's new program back on the same node
    mos::JobSnapshot job;
    mos::StatsSnapshot stats;
    REQUIRE(mos::readJobRecord(run, "jobs", self, job, stats));
    CHECK(job.moves == 1);
    CHECK(job.trail == std::vector<uint32_t>{1, 2});
  }
  {
    // The next deputy of this process (same pid, same start time): the trail goes on.
    auto record = mos::OwnedJobRecord::create(run, "jobs", self, self, 1, "job");
    mos::noteArrival(record.get(), 1);
    mos::noteArrival(record.get(), 3);
    auto jobs = mos::readJobRecords(run, "jobs");
    REQUIRE(jobs.size() == 1);
    CHECK(jobs[0].moves == 3);
    CHECK(jobs[0].trail == std::vector<uint32_t>{1, 2, 1, 3});
  }
  {
    // Another job whose home pid differs starts afresh at its home node.
    auto record = mos::OwnedJobRecord::create(run, "jobs", self, self + 1, 4, "other");
    mos::JobSnapshot job;
    mos::StatsSnapshot stats;
    REQUIRE(mos::readJobRecord(run, "jobs", self, job, stats));
    CHECK(job.moves == 0);
    CHECK(job.trail == std::vector<uint32_t>{4});
  }
  {
    // Only the last TRAIL_SLOTS arrivals are kept, oldest first; every move is counted.
    auto record = mos::OwnedJobRecord::create(run, "jobs", self, self + 2, 1, "bouncer");
    for (uint32_t i = 0; i < 40; i++) {
      mos::noteArrival(record.get(), 2 + i % 2);
    }
    mos::JobSnapshot job;
    mos::StatsSnapshot stats;
    REQUIRE(mos::readJobRecord(run, "jobs", self, job, stats));
    CHECK(job.moves == 40);
    REQUIRE(job.trail.size() == mos::JobRecord::TRAIL_SLOTS);
    CHECK(job.trail.back() == 3);
    CHECK(job.trail.front() == 2);
  }
  std::filesystem::remove_all(run);
}
