// Text corpus, CharTokenizer, token files, TokenDataset, unigram baseline; see text.h.
#include "dtrain/engine/data/text.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dtrain/common/error.h"

namespace dtrain::data {
namespace fs = std::filesystem;

namespace {

constexpr char kMagic[6] = {'D', 'T', 'T', 'O', 'K', '1'};
constexpr uint16_t kDTypeU16 = 1;
constexpr int64_t kMaxVocab = 65536;
constexpr const char* kTokenizerFormat = "dtrain-char-tokenizer";

// ---------------------------------------------------------------- files

std::string read_whole_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  DTRAIN_CHECK(in.good(), IoError, "{}: cannot open {}: {}", path, what, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  DTRAIN_CHECK(!in.bad(), IoError, "{}: read error", path);
  return ss.str();
}

// Writes `bytes` to a temporary file beside `path`, flushes it and renames it over
// `path`, so a reader never sees a half-written file.
void write_file_atomic(const std::string& path, std::string_view bytes) {
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmp.data());
  DTRAIN_CHECK(fd >= 0, IoError, "{}: cannot create a temporary file beside it: {}", path,
               std::strerror(errno));
  auto fail = [&](const char* what) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    DTRAIN_THROW(IoError, "{}: {} failed: {}", path, what, std::strerror(err));
  };
  const char* p = bytes.data();
  size_t n = bytes.size();
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("write");
    p += w;
    n -= static_cast<size_t>(w);
  }
  if (::fchmod(fd, 0644) != 0) fail("chmod");
  if (::fsync(fd) != 0) fail("fsync");
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    DTRAIN_THROW(IoError, "{}: close failed: {}", path, std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    DTRAIN_THROW(IoError, "{}: rename from {} failed: {}", path, tmp, std::strerror(err));
  }
}

void store_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t load_le(const std::string& in, size_t offset, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    v |= uint64_t{static_cast<unsigned char>(in[offset + static_cast<size_t>(i)])} << (8 * i);
  }
  return v;
}

void check_tokens(std::span<const int32_t> tokens, int64_t vocab_size, const char* who) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    DTRAIN_CHECK(tokens[i] >= 0 && tokens[i] < vocab_size, InvalidArgument,
                 "{}: token {} at position {} is outside [0, {})", who, tokens[i], i, vocab_size);
  }
}

}  // namespace

// ---------------------------------------------------------------- corpus

std::vector<std::string> find_fortunes_files(const std::string& dir) {
  std::vector<std::string> paths;
  for (const char* name : kFortunesFiles) {
    fs::path p = fs::path(dir) / name;
    std::error_code ec;
    DTRAIN_CHECK(fs::is_regular_file(p, ec), IoError,
                 "text corpus not found: {} is missing; install the Debian packages '{}' "
                 "(scripts/bootstrap.sh does: apt-get install fortunes)",
                 p.string(), kFortunesPackages);
    paths.push_back(p.string());
  }
  return paths;
}

std::string fortunes_corpus_text(const std::string& dir) {
  std::string text;
  for (const std::string& path : find_fortunes_files(dir)) {
    text += read_whole_file(path, "fortune file");
  }
  return text;
}

std::string write_fortunes_corpus(const std::string& out_path, const std::string& dir) {
  write_file_atomic(out_path, fortunes_corpus_text(dir));
  return out_path;
}

// ---------------------------------------------------------------- tokenizer

CharTokenizer CharTokenizer::from_text(std::string_view text) {
  DTRAIN_CHECK(!text.empty(), InvalidArgument, "CharTokenizer: cannot build from an empty text");
  std::array<bool, 256> seen{};
  for (char c : text) seen[static_cast<unsigned char>(c)] = true;
  std::vector<uint8_t> bytes;
  for (int b = 0; b < 256; ++b) {
    if (seen[static_cast<size_t>(b)]) bytes.push_back(static_cast<uint8_t>(b));
  }
  return CharTokenizer(std::move(bytes));
}

CharTokenizer::CharTokenizer(std::vector<uint8_t> bytes) : bytes_(std::move(bytes)) {
  DTRAIN_CHECK(!bytes_.empty(), InvalidArgument, "CharTokenizer: empty vocabulary");
  ids_.fill(-1);
  for (size_t i = 0; i < bytes_.size(); ++i) {
    DTRAIN_CHECK(i == 0 || bytes_[i] > bytes_[i - 1], InvalidArgument,
                 "CharTokenizer: vocabulary bytes must be strictly increasing, byte {} at id {} "
                 "follows {}",
                 bytes_[i], i, bytes_[i - 1]);
    ids_[bytes_[i]] = static_cast<int32_t>(i);
  }
}

std::vector<int32_t> CharTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const auto b = static_cast<unsigned char>(text[i]);
    out[i] = ids_[b];
    DTRAIN_CHECK(out[i] >= 0, InvalidArgument,
                 "CharTokenizer::encode: byte 0x{:02x} at offset {} is not in the vocabulary "
                 "({} bytes)",
                 b, i, bytes_.size());
  }
  return out;
}

std::string CharTokenizer::decode(std::span<const int32_t> tokens) const {
  check_tokens(tokens, vocab_size(), "CharTokenizer::decode");
  std::string out(tokens.size(), '\0');
  for (size_t i = 0; i < tokens.size(); ++i) {
    out[i] = static_cast<char>(bytes_[static_cast<size_t>(tokens[i])]);
  }
  return out;
}

void CharTokenizer::save(const std::string& path) const {
  nlohmann::json j = {{"format", kTokenizerFormat}, {"version", 1}, {"bytes", bytes_}};
  write_file_atomic(path, j.dump() + "\n");
}

CharTokenizer CharTokenizer::load(const std::string& path) {
  const std::string text = read_whole_file(path, "tokenizer");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(DataFormatError, "{}: tokenizer file is not valid JSON: {}", path, e.what());
  }
  DTRAIN_CHECK(j.is_object() && j.value("format", "") == kTokenizerFormat, DataFormatError,
               "{}: not a tokenizer file (expected \"format\": \"{}\")", path, kTokenizerFormat);
  DTRAIN_CHECK(j.value("version", 0) == 1, DataFormatError,
               "{}: tokenizer version {} is not supported (only 1)", path, j.value("version", 0));
  DTRAIN_CHECK(j.contains("bytes") && j["bytes"].is_array() && !j["bytes"].empty(), DataFormatError,
               "{}: \"bytes\" must be a non-empty array", path);
  std::vector<uint8_t> bytes;
  for (size_t i = 0; i < j["bytes"].size(); ++i) {
    const auto& v = j["bytes"][i];
    DTRAIN_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= 255,
                 DataFormatError, "{}: bytes[{}] = {} is not a byte value 0..255", path, i,
                 v.dump());
    const auto b = static_cast<uint8_t>(v.get<int64_t>());
    DTRAIN_CHECK(bytes.empty() || b > bytes.back(), DataFormatError,
                 "{}: bytes[{}] = {} does not increase (previous {})", path, i, b, bytes.back());
    bytes.push_back(b);
  }
  return CharTokenizer(std::move(bytes));
}

// ---------------------------------------------------------------- token files

void write_token_file(const std::string& path, std::span<const int32_t> tokens,
                      int64_t vocab_size) {
  DTRAIN_CHECK(vocab_size >= 1 && vocab_size <= kMaxVocab, InvalidArgument,
               "write_token_file {}: vocab size {} is outside [1, {}] (u16 tokens)", path,
               vocab_size, kMaxVocab);
  check_tokens(tokens, vocab_size, "write_token_file");
  std::string out(kMagic, sizeof(kMagic));
  store_le(out, kDTypeU16, 2);
  store_le(out, tokens.size(), 8);
  store_le(out, static_cast<uint64_t>(vocab_size), 4);
  store_le(out, 0, 4);
  out.reserve(out.size() + 2 * tokens.size());
  for (int32_t t : tokens) store_le(out, static_cast<uint64_t>(t), 2);
  write_file_atomic(path, out);
}

TokenFile read_token_file(const std::string& path) {
  const std::string in = read_whole_file(path, "token file");
  const auto size = static_cast<uint64_t>(in.size());
  DTRAIN_CHECK(size >= kTokenFileHeaderBytes, DataFormatError,
               "{}: truncated header at byte offset {}: a token file header is {} bytes", path,
               size, kTokenFileHeaderBytes);
  DTRAIN_CHECK(std::memcmp(in.data(), kMagic, sizeof(kMagic)) == 0, DataFormatError,
               "{}: bad magic at byte offset 0: not a dtrain token file (expected \"DTTOK1\")",
               path);
  const uint64_t dtype = load_le(in, 6, 2);
  DTRAIN_CHECK(dtype == kDTypeU16, DataFormatError,
               "{}: dtype code {} at byte offset 6 is not supported (only 1 = u16)", path, dtype);
  const uint64_t count = load_le(in, 8, 8);
  TokenFile f;
  f.vocab_size = static_cast<int64_t>(load_le(in, 16, 4));
  DTRAIN_CHECK(f.vocab_size >= 1 && f.vocab_size <= kMaxVocab, DataFormatError,
               "{}: vocab size {} at byte offset 16 is outside [1, {}]", path, f.vocab_size,
               kMaxVocab);
  const uint64_t body = size - kTokenFileHeaderBytes;
  DTRAIN_CHECK(count <= body / 2, DataFormatError,
               "{}: truncated at byte offset {}: the header says {} tokens ({} bytes of body), "
               "the file has {} bytes of body",
               path, size, count, count * 2, body);
  DTRAIN_CHECK(body == count * 2, DataFormatError,
               "{}: {} unexpected bytes after the last token, at byte offset {}", path,
               body - count * 2, kTokenFileHeaderBytes + count * 2);
  f.tokens.resize(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t offset = kTokenFileHeaderBytes + 2 * i;
    f.tokens[i] = static_cast<int32_t>(load_le(in, offset, 2));
    DTRAIN_CHECK(f.tokens[i] < f.vocab_size, DataFormatError,
                 "{}: token {} at byte offset {} is {}, not below the vocab size {}", path, i,
                 offset, f.tokens[i], f.vocab_size);
  }
  return f;
}

// ---------------------------------------------------------------- preparation

PreparedText prepare_text_corpus(const std::string& text_path, const std::string& out_dir,
                                 double val_fraction) {
  DTRAIN_CHECK(val_fraction > 0 && val_fraction < 1, InvalidArgument,
               "prepare_text_corpus: val_fraction must be in (0, 1), got {}", val_fraction);
  const std::string text = read_whole_file(text_path, "text corpus");
  const auto n = static_cast<int64_t>(text.size());
  const auto n_val = static_cast<int64_t>(std::floor(static_cast<double>(n) * val_fraction));
  DTRAIN_CHECK(n_val >= 2 && n - n_val >= 2, InvalidArgument,
               "prepare_text_corpus {}: {} bytes with val_fraction {} gives {} train and {} "
               "validation tokens; each split needs at least 2",
               text_path, n, val_fraction, n - n_val, n_val);
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  DTRAIN_CHECK(!ec, IoError, "{}: cannot create folder: {}", out_dir, ec.message());

  const CharTokenizer tok = CharTokenizer::from_text(text);
  const std::vector<int32_t> ids = tok.encode(text);
  PreparedText r;
  r.vocab_path = (fs::path(out_dir) / "vocab.json").string();
  r.train_path = (fs::path(out_dir) / "train.tok").string();
  r.val_path = (fs::path(out_dir) / "val.tok").string();
  r.text_bytes = n;
  r.vocab_size = tok.vocab_size();
  r.train_tokens = n - n_val;
  r.val_tokens = n_val;
  const std::span<const int32_t> all(ids);
  tok.save(r.vocab_path);
  write_token_file(r.train_path, all.first(static_cast<size_t>(r.train_tokens)), r.vocab_size);
  write_token_file(r.val_path, all.last(static_cast<size_t>(r.val_tokens)), r.vocab_size);
  return r;
}

PreparedText prepare_cached_corpus(const std::string& text_path, const std::string& cache_dir) {
  const std::filesystem::path dir = std::filesystem::path(cache_dir) / "fortunes";
  std::filesystem::create_directories(dir);
  const std::string text =
      text_path.empty() ? write_fortunes_corpus((dir / "corpus.txt").string()) : text_path;
  return prepare_text_corpus(text, dir.string());
}

// ---------------------------------------------------------------- dataset

TokenDataset::TokenDataset(std::vector<int32_t> tokens, int64_t block_size)
    : tokens_(std::move(tokens)), block_(block_size) {
  DTRAIN_CHECK(block_ >= 1, InvalidArgument, "TokenDataset: block size must be >= 1, got {}",
               block_);
  DTRAIN_CHECK(num_tokens() >= block_ + 1, InvalidArgument,
               "TokenDataset: {} tokens are too few for block size {} (need block size + 1)",
               num_tokens(), block_);
}

TokenDataset TokenDataset::from_file(const std::string& path, int64_t block_size) {
  return TokenDataset(read_token_file(path).tokens, block_size);
}

namespace {
void check_slice(int64_t batch, DpSlice slice, const char* who) {
  DTRAIN_CHECK(batch >= 1, InvalidArgument, "{}: batch must be >= 1, got {}", who, batch);
  DTRAIN_CHECK(slice.size >= 1 && slice.rank >= 0 && slice.rank < slice.size, InvalidArgument,
               "{}: dp rank {} is outside [0, {})", who, slice.rank, slice.size);
  DTRAIN_CHECK(batch % slice.size == 0, InvalidArgument,
               "{}: global batch {} is not divisible by the dp size {}", who, batch, slice.size);
}
}  // namespace

TokenBatch TokenDataset::windows(std::span<const int64_t> offsets, int64_t batch,
                                 DpSlice slice) const {
  const int64_t rows = batch / slice.size;
  const auto opts = TensorOptions{}.with_dtype(DType::i64);
  TokenBatch b{empty({rows, block_}, opts), empty({rows, block_}, opts)};
  int64_t* x = b.x.data<int64_t>();
  int64_t* y = b.y.data<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* src = tokens_.data() + offsets[static_cast<size_t>(slice.rank + r * slice.size)];
    for (int64_t t = 0; t < block_; ++t) {
      x[r * block_ + t] = src[t];
      y[r * block_ + t] = src[t + 1];
    }
  }
  return b;
}

TokenBatch TokenDataset::sample_batch(int64_t batch, Generator& gen, DpSlice slice) const {
  check_slice(batch, slice, "TokenDataset::sample_batch");
  const auto starts = static_cast<uint64_t>(num_tokens() - block_);
  std::vector<int64_t> offsets(static_cast<size_t>(batch));
  for (auto& o : offsets) o = static_cast<int64_t>(gen.below(starts));
  return windows(offsets, batch, slice);
}

int64_t TokenDataset::num_eval_batches(int64_t batch, int64_t max_batches) const {
  DTRAIN_CHECK(batch >= 1, InvalidArgument,
               "TokenDataset::num_eval_batches: batch must be >= 1, "
               "got {}",
               batch);
  const int64_t full = num_eval_windows() / batch;
  return max_batches < 0 ? full : std::min(full, max_batches);
}

TokenBatch TokenDataset::eval_batch(int64_t index, int64_t batch, DpSlice slice) const {
  check_slice(batch, slice, "TokenDataset::eval_batch");
  const int64_t n = num_eval_batches(batch);
  DTRAIN_CHECK(index >= 0 && index < n, InvalidArgument,
               "TokenDataset::eval_batch: index {} is outside [0, {}) ({} windows of {} tokens, "
               "batch {})",
               index, n, num_eval_windows(), block_, batch);
  std::vector<int64_t> offsets(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i)
    offsets[static_cast<size_t>(i)] = (index * batch + i) * block_;
  return windows(offsets, batch, slice);
}

// ---------------------------------------------------------------- baseline

UnigramBaseline unigram_baseline(std::span<const int32_t> train, std::span<const int32_t> val,
                                 int64_t vocab_size) {
  DTRAIN_CHECK(vocab_size >= 1, InvalidArgument, "unigram_baseline: vocab size {} < 1", vocab_size);
  DTRAIN_CHECK(!val.empty(), InvalidArgument, "unigram_baseline: empty validation set");
  check_tokens(train, vocab_size, "unigram_baseline (train)");
  check_tokens(val, vocab_size, "unigram_baseline (val)");
  std::vector<double> counts(static_cast<size_t>(vocab_size), 1.0);  // add-one
  for (int32_t t : train) counts[static_cast<size_t>(t)] += 1.0;
  const double log_total = std::log(static_cast<double>(train.size() + vocab_size));
  double nll = 0;
  for (int32_t t : val) nll += log_total - std::log(counts[static_cast<size_t>(t)]);
  UnigramBaseline r;
  r.nats_per_token = nll / static_cast<double>(val.size());
  r.perplexity = std::exp(r.nats_per_token);
  return r;
}

}  // namespace dtrain::data
