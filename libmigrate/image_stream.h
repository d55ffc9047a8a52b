#pragma once
// The migration stream (protocol/migration.capnp, protocol/migration.md): MAGIC, an ImageHeader
// message, page-run frames, an end frame with an XXH3-128 digest of everything before it.
// The writer and the reader hold one frame at a time, never the stream.

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t by value, so a state can be copied
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include <capnp/message.h>
#include <kj/io.h>

#include "migration.capnp.h"

namespace mos::migrate {

// The first 8 bytes of every migration stream and checkpoint file.
constexpr char IMAGE_MAGIC[8] = {'U', 'M', 'O', 'S', 'I', 'M', 'G', '\n'};
constexpr size_t IMAGE_PAGE = 4096;
// The most pages one frame carries (1 MiB): the writer's and the reader's buffer size.
constexpr uint32_t MAX_RUN_PAGES = 256;

// What the end frame's digest covers (protocol/migration.md).
enum class PageDigest {
  ALL,     // every byte of the stream: checkpoint files, streams that are stored
  FRAMING  // everything but the pages' bytes (header.pagesUnhashed): a live move over TCP whose
           // pages the source process sends itself (sendPagesFromFd in checkpoint.h)
};

// Writes one stream to `out`. Usage: writeHeader, writePages (or runFrame) for each run in
// address order, finish. Throws whatever `out` throws.
class ImageWriter {
 public:
  explicit ImageWriter(kj::OutputStream& out, PageDigest digest = PageDigest::ALL);
  // MAGIC and the header message (a proto::ImageHeader root; with PageDigest::FRAMING its
  // pagesUnhashed is set here).
  void writeHeader(capnp::MessageBuilder& header);
  // One frame: `bytes.size()` is a multiple of 4096 and at most MAX_RUN_PAGES pages.
  void writePages(uint64_t start, std::span<const uint8_t> bytes);
  // The frame message of a run of `count` (1..MAX_RUN_PAGES) pages at `start` whose bytes the
  // caller puts on the stream itself, right after the returned words (which it also sends):
  // counted and hashed as writePages would, without the pages. Only with PageDigest::FRAMING.
  kj::Array<capnp::word> runFrame(uint64_t start, uint32_t count);
  // The end frame. Nothing may be written after it.
  void finish();

  uint64_t runs() const { return runs_; }
  uint64_t pages() const { return pages_; }
  uint64_t bytes() const { return bytes_; }

 private:
  void write(const void* data, size_t size);
  kj::OutputStream& out_;
  PageDigest digest_;
  XXH3_state_t hash_;
  uint64_t runs_ = 0;
  uint64_t pages_ = 0;
  uint64_t bytes_ = 0;
};

// Reads one stream from `in`. The constructor reads and checks MAGIC, the header and its version;
// nextRun() walks the frames and, at the end frame, checks the digest and the counts.
// Every failure throws kj::Exception (FAILED) whose description starts with what is wrong:
// "not a umosix migration image", "migration image truncated", "migration image corrupt",
// "migration image version N is newer than this umosix reads (1)".
class ImageReader {
 public:
  explicit ImageReader(kj::InputStream& in);
  ~ImageReader() noexcept(false);

  proto::ImageHeader::Reader header() { return header_->getRoot<proto::ImageHeader>().asReader(); }

  struct Run {
    uint64_t start;  // page aligned
    uint32_t count;  // pages, 1..MAX_RUN_PAGES
  };
  // The next page run, whose count*4096 bytes must then be consumed with readPages() (or
  // skipPages()) before the next call; null after the end frame, which has been verified.
  kj::Maybe<Run> nextRun();
  // Reads the current run's next `out.size()` bytes.
  void readPages(std::span<uint8_t> out);
  // Skips what remains of the current run.
  void skipPages();
  // Reads every remaining frame, checking the stream to its end (the digest, the counts) without
  // keeping anything. Then checks that nothing follows the end frame.
  void verifyToEnd();

  // The bytes this reader took from `in` beyond what it has consumed (it reads ahead up to
  // 64 KiB): after the end frame, whatever followed the stream on a channel. They are no longer
  // the reader's afterwards.
  kj::Array<kj::byte> takeReadAhead();

  uint64_t bytesRead() const;
  uint64_t runs() const { return runs_; }
  uint64_t pages() const { return pages_; }

 private:
  class HashingInput;
  kj::Own<HashingInput> input_;
  kj::Own<capnp::MallocMessageBuilder> header_;  // a copy: the stream reader is gone
  uint64_t remaining_ = 0;                       // bytes of the current run not yet consumed
  uint64_t runs_ = 0;
  uint64_t pages_ = 0;
  uint64_t lastEnd_ = 0;
  bool ended_ = false;
  bool pagesUnhashed_ = false;  // the header's: readPages() leaves the digest alone
};

}  // namespace mos::migrate
