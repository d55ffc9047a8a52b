#include "image_stream.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <capnp/serialize.h>
#include <kj/debug.h>

namespace mos::migrate {

namespace {

constexpr size_t DIGEST_BYTES = sizeof(XXH128_canonical_t);  // 16: XXH3-128, big-endian

// Limits of the reader: a header of at most 256 MiB (a process has at most 65530 mappings by
// default, about 10 MiB of header), frames of a few words.
capnp::ReaderOptions headerOptions() {
  capnp::ReaderOptions o;
  o.traversalLimitInWords = 32ull << 20;
  o.nestingLimit = 16;
  return o;
}

capnp::ReaderOptions frameOptions() {
  capnp::ReaderOptions o;
  o.traversalLimitInWords = 1024;
  o.nestingLimit = 4;
  return o;
}

void initHash(XXH3_state_t* state) { XXH3_128bits_reset(state); }

void hash(XXH3_state_t* state, const void* data, size_t size) {
  XXH3_128bits_update(state, data, size);
}

// The digest of what `state` has seen, in its canonical (big-endian) bytes.
XXH128_canonical_t digestOf(const XXH3_state_t* state) {
  XXH128_canonical_t out;
  XXH128_canonicalFromHash(&out, XXH3_128bits_digest(state));
  return out;
}

// A stream error whose description is the sentence alone (no KJ condition text): it is shown to
// the user as it is.
[[noreturn]] void streamError(kj::String description) {
  throw kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::mv(description));
}

}  // namespace

// ImageWriter.

ImageWriter::ImageWriter(kj::OutputStream& out, PageDigest digest) : out_(out), digest_(digest) {
  initHash(&hash_);
}

void ImageWriter::write(const void* data, size_t size) {
  hash(&hash_, data, size);
  out_.write(data, size);
  bytes_ += size;
}

void ImageWriter::writeHeader(capnp::MessageBuilder& header) {
  if (digest_ == PageDigest::FRAMING) {
    header.getRoot<proto::ImageHeader>().setPagesUnhashed(true);
  }
  write(IMAGE_MAGIC, sizeof(IMAGE_MAGIC));
  kj::Array<capnp::word> words = capnp::messageToFlatArray(header);
  write(words.begin(), words.size() * sizeof(capnp::word));
}

void ImageWriter::writePages(uint64_t start, std::span<const uint8_t> bytes) {
  KJ_REQUIRE(start % IMAGE_PAGE == 0 && bytes.size() % IMAGE_PAGE == 0 && !bytes.empty() &&
             bytes.size() <= MAX_RUN_PAGES * IMAGE_PAGE);
  capnp::MallocMessageBuilder message(64);
  auto pages = message.initRoot<proto::Frame>().initPages();
  pages.setStart(start);
  pages.setCount(bytes.size() / IMAGE_PAGE);
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  write(words.begin(), words.size() * sizeof(capnp::word));
  if (digest_ == PageDigest::ALL) {
    write(bytes.data(), bytes.size());
  } else {
    out_.write(bytes.data(), bytes.size());
    bytes_ += bytes.size();
  }
  runs_ += 1;
  pages_ += bytes.size() / IMAGE_PAGE;
}

kj::Array<capnp::word> ImageWriter::runFrame(uint64_t start, uint32_t count) {
  KJ_REQUIRE(digest_ == PageDigest::FRAMING && start % IMAGE_PAGE == 0 && count > 0 &&
             count <= MAX_RUN_PAGES);
  capnp::MallocMessageBuilder message(64);
  auto pages = message.initRoot<proto::Frame>().initPages();
  pages.setStart(start);
  pages.setCount(count);
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  hash(&hash_, words.begin(), words.size() * sizeof(capnp::word));
  bytes_ += words.size() * sizeof(capnp::word) + uint64_t(count) * IMAGE_PAGE;
  runs_ += 1;
  pages_ += count;
  return words;
}

void ImageWriter::finish() {
  XXH128_canonical_t digest = digestOf(&hash_);
  capnp::MallocMessageBuilder message(64);
  auto end = message.initRoot<proto::Frame>().initEnd();
  end.setRuns(runs_);
  end.setPages(pages_);
  end.setDigest(kj::arrayPtr(digest.digest, sizeof(digest.digest)));
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  out_.write(words.begin(), words.size() * sizeof(capnp::word));
  bytes_ += words.size() * sizeof(capnp::word);
}

// ImageReader.

// Buffers, hashes what it hands out, and turns an early end of the stream into one clear error
// (kj::BufferedInputStreamWrapper throws its own "Premature EOF" instead).
class ImageReader::HashingInput final : public kj::InputStream {
 public:
  explicit HashingInput(kj::InputStream& inner) : inner_(inner) { initHash(&hash_); }

  size_t tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    size_t n = readSome(buffer, minBytes, maxBytes);
    if (n < minBytes) {
      truncated = true;
      streamError(kj::str("migration image truncated: the stream ends after ", total_,
                          " bytes, in the middle of ", what));
    }
    return n;
  }

  // At least `minBytes` unless the stream ends first, at most `maxBytes`; never throws on a
  // short read.
  size_t readSome(void* buffer, size_t minBytes, size_t maxBytes) {
    auto* out = static_cast<uint8_t*>(buffer);
    size_t n = 0;
    while (n < minBytes) {
      if (pos_ == len_ && maxBytes - n >= sizeof(buffer_)) {
        size_t got = inner_.tryRead(out + n, 1, maxBytes - n);  // large reads skip the buffer
        if (got == 0) {
          break;
        }
        n += got;
        continue;
      }
      if (fill() == 0) {
        break;
      }
      size_t k = std::min(len_ - pos_, maxBytes - n);
      memcpy(out + n, buffer_ + pos_, k);
      pos_ += k;
      n += k;
    }
    if (hashing) {
      hash(&hash_, out, n);
    }
    total_ += n;
    return n;
  }

  // True when nothing at all follows (end of file).
  bool atEnd() { return fill() == 0; }

  // What was read ahead and not handed out; dropped from the buffer.
  kj::Array<kj::byte> takeBuffered() {
    auto out = kj::heapArray<kj::byte>(buffer_ + pos_, len_ - pos_);
    pos_ = len_;
    return out;
  }

  const XXH3_state_t& state() const { return hash_; }
  uint64_t total() const { return total_; }

  const char* what = "the magic";
  bool truncated = false;
  bool hashing = true;  // false while the pages of a pagesUnhashed stream are read

 private:
  size_t fill() {
    if (pos_ == len_) {
      pos_ = 0;
      len_ = inner_.tryRead(buffer_, 1, sizeof(buffer_));
    }
    return len_ - pos_;
  }

  kj::InputStream& inner_;
  uint8_t buffer_[65536];
  size_t pos_ = 0;
  size_t len_ = 0;
  XXH3_state_t hash_;
  uint64_t total_ = 0;
};

ImageReader::ImageReader(kj::InputStream& in) : input_(kj::heap<HashingInput>(in)) {
  char magic[sizeof(IMAGE_MAGIC)] = {};
  size_t n = input_->readSome(magic, sizeof(magic), sizeof(magic));
  if (n != sizeof(magic) || memcmp(magic, IMAGE_MAGIC, sizeof(magic)) != 0) {
    streamError(kj::str("not a umosix migration image (it does not start with \"UMOSIMG\\n\")"));
  }
  input_->what = "the header";
  try {
    capnp::InputStreamMessageReader reader(*input_, headerOptions());
    header_ = kj::heap<capnp::MallocMessageBuilder>();
    header_->setRoot(reader.getRoot<proto::ImageHeader>());
  } catch (kj::Exception& e) {
    if (input_->truncated) {
      throw;
    }
    streamError(
        kj::str("migration image corrupt: its header does not parse (", e.getDescription(), ")"));
  }
  pagesUnhashed_ = header().getPagesUnhashed();
  uint32_t version = header().getVersion();
  if (version == 0) {
    streamError(kj::str("migration image corrupt: its header has no version"));
  }
  if (version > proto::MIGRATION_VERSION) {
    streamError(kj::str("migration image version ", version, " is newer than this umosix reads (",
                        proto::MIGRATION_VERSION, ")"));
  }
}

ImageReader::~ImageReader() noexcept(false) {}

uint64_t ImageReader::bytesRead() const { return input_->total(); }

kj::Array<kj::byte> ImageReader::takeReadAhead() { return input_->takeBuffered(); }

kj::Maybe<ImageReader::Run> ImageReader::nextRun() {
  KJ_REQUIRE(remaining_ == 0, "ImageReader: the previous run was not consumed");
  if (ended_) {
    return nullptr;
  }
  XXH3_state_t before;
  XXH3_copyState(&before, &input_->state());
  input_->what = "a frame";
  kj::Own<capnp::MallocMessageBuilder> copy;
  try {
    capnp::InputStreamMessageReader reader(*input_, frameOptions());
    copy = kj::heap<capnp::MallocMessageBuilder>(64);
    copy->setRoot(reader.getRoot<proto::Frame>());
  } catch (kj::Exception& e) {
    if (input_->truncated) {
      throw;
    }
    streamError(kj::str("migration image corrupt: frame ", runs_ + 1, " does not parse, at byte ",
                        input_->total(), " (", e.getDescription(), ")"));
  }
  auto frame = copy->getRoot<proto::Frame>().asReader();
  if (frame.isEnd()) {
    auto end = frame.getEnd();
    XXH128_canonical_t digest = digestOf(&before);
    auto expected = end.getDigest();
    if (expected.size() != DIGEST_BYTES ||
        memcmp(expected.begin(), digest.digest, DIGEST_BYTES) != 0) {
      streamError(kj::str("migration image corrupt: its digest does not match its contents"));
    }
    if (end.getRuns() != runs_ || end.getPages() != pages_ || pages_ != header().getPageCount()) {
      streamError(kj::str("migration image corrupt: it ends after ", runs_, " runs and ", pages_,
                          " pages, but says ", end.getRuns(), " runs and ", end.getPages(),
                          " pages (header: ", header().getPageCount(), ")"));
    }
    ended_ = true;
    return nullptr;
  }
  auto pages = frame.getPages();
  uint64_t start = pages.getStart();
  uint32_t count = pages.getCount();
  if (!(start % IMAGE_PAGE == 0 && count > 0 && count <= MAX_RUN_PAGES && start >= lastEnd_ &&
        start + uint64_t(count) * IMAGE_PAGE > start)) {
    streamError(kj::str("migration image corrupt: frame ", runs_ + 1,
                        " is not a valid page run (start ", kj::hex(start), ", ", count,
                        " pages)"));
  }
  lastEnd_ = start + uint64_t(count) * IMAGE_PAGE;
  remaining_ = uint64_t(count) * IMAGE_PAGE;
  runs_ += 1;
  pages_ += count;
  input_->what = "a page run";
  return Run{start, count};
}

void ImageReader::readPages(std::span<uint8_t> out) {
  KJ_REQUIRE(out.size() <= remaining_, "ImageReader: read past the run");
  input_->hashing = !pagesUnhashed_;
  KJ_DEFER(input_->hashing = true);
  input_->read(out.data(), out.size());
  remaining_ -= out.size();
}

void ImageReader::skipPages() {
  uint8_t buffer[65536];
  while (remaining_ > 0) {
    size_t n = kj::min(remaining_, sizeof(buffer));
    readPages(std::span<uint8_t>(buffer, n));
  }
}

void ImageReader::verifyToEnd() {
  while (nextRun() != nullptr) {
    skipPages();
  }
  if (!input_->atEnd()) {
    streamError(
        kj::str("migration image corrupt: bytes follow its end frame, at byte ", input_->total()));
  }
}

}  // namespace mos::migrate
