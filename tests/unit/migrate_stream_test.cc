// The migration stream (libmigrate/image_stream.h, protocol/migration.md) and the resume checks
// (checkpoint.h checkResumable), without a process: streams are built in memory.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <capnp/message.h>
#include <kj/io.h>

#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint.h"
#include "image_stream.h"

namespace {

using mos::migrate::ImageReader;
using mos::migrate::ImageWriter;

// A header that checkResumable accepts on this machine: one thread, this CPU's xsave features
// (none), no vDSO, no files, cwd /.
void fillHeader(mos::proto::ImageHeader::Builder h, uint64_t pages) {
  h.setVersion(mos::proto::MIGRATION_VERSION);
  h.setArch("x86_64");
  h.initThreads(1);
  h.setCwd(kj::StringPtr("/").asBytes());
  h.setPageCount(pages);
}

std::vector<uint8_t> page(uint8_t value, size_t pages = 1) {
  return std::vector<uint8_t>(pages * 4096, value);
}

// Writes a stream with runs of 1 page at 0x10000 and 3 pages at 0x20000.
kj::Array<kj::byte> sampleStream(uint32_t version = mos::proto::MIGRATION_VERSION) {
  kj::VectorOutputStream out;
  ImageWriter writer(out);
  capnp::MallocMessageBuilder message;
  auto h = message.initRoot<mos::proto::ImageHeader>();
  fillHeader(h, 4);
  h.setVersion(version);
  writer.writeHeader(message);
  auto a = page(1), b = page(2, 3);
  writer.writePages(0x10000, a);
  writer.writePages(0x20000, b);
  writer.finish();
  CHECK(writer.pages() == 4);
  CHECK(writer.runs() == 2);
  return kj::heapArray(out.getArray());
}

std::string errorOf(kj::ArrayPtr<const kj::byte> bytes) {
  try {
    kj::ArrayInputStream in(bytes);
    ImageReader reader(in);
    reader.verifyToEnd();
  } catch (kj::Exception& e) {
    return e.getDescription().cStr();
  }
  return "";
}

}  // namespace

TEST_CASE("a stream reads back run by run", "[unit][migrate]") {
  auto bytes = sampleStream();
  REQUIRE(memcmp(bytes.begin(), "UMOSIMG\n", 8) == 0);
  kj::ArrayInputStream in(bytes);
  ImageReader reader(in);
  CHECK(reader.header().getPageCount() == 4);
  KJ_IF_MAYBE (run, reader.nextRun()) {
    CHECK(run->start == 0x10000);
    CHECK(run->count == 1);
    std::vector<uint8_t> got(4096);
    reader.readPages(got);
    CHECK(got == page(1));
  } else {
    FAIL("no first run");
  }
  KJ_IF_MAYBE (run, reader.nextRun()) {
    CHECK(run->start == 0x20000);
    CHECK(run->count == 3);
    std::vector<uint8_t> got(3 * 4096);
    reader.readPages(std::span<uint8_t>(got.data(), 4096));
    reader.readPages(std::span<uint8_t>(got.data() + 4096, 2 * 4096));
    CHECK(got == page(2, 3));
  } else {
    FAIL("no second run");
  }
  CHECK(reader.nextRun() == nullptr);
  CHECK(reader.pages() == 4);
}

TEST_CASE("damaged streams are refused by name", "[unit][migrate]") {
  auto bytes = sampleStream();
  CHECK(errorOf(bytes) == "");
  CHECK_THAT(errorOf(bytes.slice(0, 0)), Catch::StartsWith("not a umosix migration image"));
  CHECK_THAT(errorOf(kj::StringPtr("#!/bin/sh\necho\n").asBytes()),
             Catch::StartsWith("not a umosix migration image"));
  for (size_t cut : {size_t(12), size_t(100), bytes.size() / 2, bytes.size() - 1}) {
    INFO("cut at " << cut);
    CHECK_THAT(errorOf(bytes.slice(0, cut)), Catch::StartsWith("migration image truncated"));
  }
  auto flipped = kj::heapArray<kj::byte>(bytes);
  flipped[bytes.size() / 2] ^= 0x10;  // inside the second run's pages
  CHECK_THAT(errorOf(flipped), Catch::StartsWith("migration image corrupt: its digest"));
  auto trailing = kj::heapArray<kj::byte>(bytes.size() + 8);
  memcpy(trailing.begin(), bytes.begin(), bytes.size());
  memset(trailing.begin() + bytes.size(), 0, 8);
  CHECK_THAT(errorOf(trailing), Catch::StartsWith("migration image corrupt: bytes follow"));
}

TEST_CASE("a live stream whose pages the source sends itself: digest over the framing only",
          "[unit][migrate]") {
  // What captureImage with sendPagesFromFd writes: the frames from the writer (runFrame), the
  // pages' bytes put on the stream beside it, as the process's injected sendmsg does.
  kj::VectorOutputStream out;
  ImageWriter writer(out, mos::migrate::PageDigest::FRAMING);
  capnp::MallocMessageBuilder message;
  fillHeader(message.initRoot<mos::proto::ImageHeader>(), 4);
  writer.writeHeader(message);
  auto a = page(1), b = page(2, 3);
  for (auto& [start, bytes] : {std::pair{0x10000ul, &a}, std::pair{0x20000ul, &b}}) {
    auto frame = writer.runFrame(start, bytes->size() / 4096);
    out.write(frame.asBytes().begin(), frame.asBytes().size());
    out.write(bytes->data(), bytes->size());
  }
  writer.finish();
  CHECK(writer.runs() == 2);
  CHECK(writer.pages() == 4);
  CHECK(writer.bytes() == out.getArray().size());  // pages included
  auto bytes = kj::heapArray(out.getArray());
  {
    kj::ArrayInputStream in(bytes);
    ImageReader reader(in);
    CHECK(reader.header().getPagesUnhashed());
    std::vector<uint8_t> got;
    KJ_IF_MAYBE (run, reader.nextRun()) {
      got.resize(run->count * 4096);
      reader.readPages(got);
      CHECK(got == a);
    }
    KJ_IF_MAYBE (run, reader.nextRun()) {
      got.resize(run->count * 4096);
      reader.readPages(got);
      CHECK(got == b);
    }
    CHECK(reader.nextRun() == nullptr);  // the digest and the counts match
  }
  // A page's bytes are not covered (TCP carries them); the framing still is, and a cut is seen.
  auto pageFlipped = kj::heapArray<kj::byte>(bytes);
  pageFlipped[bytes.size() / 2] ^= 0x10;  // inside the second run's pages
  CHECK(errorOf(pageFlipped) == "");
  CHECK_THAT(errorOf(bytes.slice(0, bytes.size() / 2)),
             Catch::StartsWith("migration image truncated"));
  // A checkpoint file keeps the whole digest: the same flip in a PageDigest::ALL stream fails.
  auto all = sampleStream();
  auto allFlipped = kj::heapArray<kj::byte>(all);
  allFlipped[all.size() / 2] ^= 0x10;
  CHECK_THAT(errorOf(allFlipped), Catch::StartsWith("migration image corrupt: its digest"));
  CHECK_FALSE([&] {
    kj::ArrayInputStream in(all);
    return ImageReader(in).header().getPagesUnhashed();
  }());
}

TEST_CASE("a stream of a newer version is refused", "[unit][migrate]") {
  auto bytes = sampleStream(mos::proto::MIGRATION_VERSION + 1);
  CHECK_THAT(errorOf(bytes), Catch::StartsWith("migration image version 2 is newer"));
}

TEST_CASE("checkResumable names what cannot be resumed here", "[unit][migrate]") {
  capnp::MallocMessageBuilder message;
  auto h = message.initRoot<mos::proto::ImageHeader>();
  fillHeader(h, 0);
  CHECK(mos::migrate::checkResumable(h.asReader()).empty());

  auto only = [&]() {
    auto problems = mos::migrate::checkResumable(h.asReader());
    REQUIRE(problems.size() == 1);
    return problems[0];
  };
  // An xsave feature this CPU does not have (bit 62 is reserved on every x86 CPU).
  h.getCpu().setXsaveFeatures(1ull << 62);
  CHECK_THAT(only(), Catch::StartsWith("this CPU's xsave state does not cover the image's"));
  h.getCpu().setXsaveFeatures(0);

  // A mapped file that changed since the capture.
  std::string path = std::filesystem::temp_directory_path() / "umosix-stream-test-XXXXXX";
  int fd = mkstemp(path.data());
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, "abcd", 4) == 4);
  struct stat st;
  REQUIRE(fstat(fd, &st) == 0);
  auto m = h.initMappings(1)[0];
  m.setStart(0x100000);
  m.setEnd(0x101000);
  m.setKind(mos::proto::Mapping::Kind::FILE);
  auto ref = m.initFile();
  ref.setPath(kj::StringPtr(path.c_str()).asBytes());
  ref.setDev(st.st_dev);
  ref.setIno(st.st_ino);
  ref.setSize(st.st_size);
  ref.setMtimeNs(int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec);
  CHECK(mos::migrate::checkResumable(h.asReader()).empty());
  REQUIRE(write(fd, "e", 1) == 1);
  CHECK_THAT(only(), Catch::Contains("changed since the image was taken"));
  close(fd);
  unlink(path.c_str());
  CHECK_THAT(only(), Catch::Contains("is gone"));
  h.initMappings(0);

  // Descriptors: a pipe beyond 0..2 is a reason, one at 0..2 is inherited.
  auto files = h.initFiles(2);
  files[0].setFd(1);
  files[0].setKind(mos::proto::OpenFile::Kind::PIPE);
  files[1].setFd(5);
  files[1].setKind(mos::proto::OpenFile::Kind::PIPE);
  files[1].setPath(kj::StringPtr("pipe:[1]").asBytes());
  CHECK_THAT(only(), Catch::StartsWith("fd 5: a pipe"));
  h.initFiles(0);

  // Threads come back with their ids, which must be free here; threads[0] is the leader.
  auto threads = h.initThreads(2);
  threads[0].setTid(h.getSourcePid());
  threads[1].setTid(getpid());  // taken: this test's own
  CHECK_THAT(only(), Catch::Contains(
                         kj::str("thread id ", getpid(), " of the image is in use here").cStr()));
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    _exit(0);
  }
  REQUIRE(waitpid(child, nullptr, 0) == child);
  threads[1].setTid(child);  // free again
  CHECK(mos::migrate::checkResumable(h.asReader()).empty());
  threads[0].setTid(h.getSourcePid() + 1);
  CHECK_THAT(only(), Catch::Contains("not its process's leader"));
}
