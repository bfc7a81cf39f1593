// Text data for a character-level language model: the corpus, a byte tokenizer,
// token files, a windowed token dataset and the unigram baseline.
//
// The corpus is real text that a Debian package ships: the English fortune-cookie
// files of `fortunes` and `fortunes-min` (43 files, 2,576,674 bytes, 114 distinct bytes),
// installed by scripts/bootstrap.sh. fortunes_corpus_text() concatenates them in a
// fixed order, so every machine with the package builds the same bytes.
// prepare_text_corpus(.., 0.1) makes its last 257,667 bytes -- the end of
// `startrek`, then `tao` .. `zippy` -- validation, so validation is a somewhat
// different mix than train: its unigram baseline is 3.3756 nats/token (perplexity
// 29.24), the number a character-level model must beat.
//
// CharTokenizer is byte-level: its vocabulary is the sorted set of distinct bytes of
// the text it was built from, token id = rank of the byte in that set. Any byte
// string made of those bytes round-trips exactly (UTF-8 characters become several
// tokens; nothing is normalised).
//
// Token file (.tok), all integers little-endian:
//   offset  0  6 bytes  magic "DTTOK1"
//   offset  6  u16      dtype code, 1 = u16 tokens (the only one)
//   offset  8  u64      token count N
//   offset 16  u32      vocabulary size V (1..65536); every token is < V
//   offset 20  u32      reserved, 0
//   offset 24  N x u16  the tokens
// Missing or unreadable files are IoError; a bad magic, dtype, size, a truncated
// body, trailing bytes or a token >= V are DataFormatError naming the file and the
// byte offset of the problem. Writers go through a temporary file + rename, and
// their output is a function of their input, so several ranks on one host may
// prepare the same folder at once.
//
// Data parallelism: TokenDataset draws a GLOBAL batch from the caller's Generator,
// the same on every rank; with DpSlice{rank, size} a rank keeps rows rank::size of
// it. Every rank must use the same seed and draw the same sequence of batches, so a
// dp=2 run consumes exactly the windows of the 1-process run with the same global
// batch.
//
// Deliberately not here: BPE or other subword tokenizers, streaming corpora larger
// than memory, document boundaries (the fortune separator "%" lines stay in the text).
//
// Thread-safety: CharTokenizer and TokenDataset are immutable after construction;
// sample_batch mutates only the Generator passed in.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "dtrain/engine/random.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::data {

// ---- the corpus ----

inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";
inline constexpr const char* kFortunesPackages = "fortunes fortunes-min";
// The data files of Debian 12's fortunes + fortunes-min (1:1.99.1-7.3), in corpus order.
inline constexpr std::array<const char*, 43> kFortunesFiles = {
    "art",           "ascii-art",  "computers", "cookie",       "debian",   "definitions",
    "disclaimer",    "drugs",      "education", "ethnic",       "food",     "fortunes",
    "goedel",        "humorists",  "kids",      "knghtbrd",     "law",      "linux",
    "linuxcookie",   "literature", "love",      "magic",        "medicine", "men-women",
    "miscellaneous", "news",       "paradoxum", "people",       "perl",     "pets",
    "platitudes",    "politics",   "pratchett", "riddles",      "science",  "songs-poems",
    "sports",        "startrek",   "tao",       "translate-me", "wisdom",   "work",
    "zippy"};

// The paths of the corpus files in `dir`, in corpus order. Throws IoError naming
// the missing file and the Debian packages to install when any is absent.
std::vector<std::string> find_fortunes_files(const std::string& dir = kFortunesDir);

// The whole corpus: the files of find_fortunes_files(dir) concatenated.
std::string fortunes_corpus_text(const std::string& dir = kFortunesDir);

// Writes fortunes_corpus_text(dir) to out_path (tmp + rename) and returns out_path.
std::string write_fortunes_corpus(const std::string& out_path,
                                  const std::string& dir = kFortunesDir);

// ---- tokenizer ----

class CharTokenizer {
 public:
  // The vocabulary of `text`: its distinct bytes, sorted. Throws InvalidArgument
  // for an empty text.
  static CharTokenizer from_text(std::string_view text);
  // `bytes`: the vocabulary, strictly increasing byte values (as stored in the JSON).
  explicit CharTokenizer(std::vector<uint8_t> bytes);

  // Throws InvalidArgument naming the byte and its offset when a byte of `text` is
  // not in the vocabulary.
  std::vector<int32_t> encode(std::string_view text) const;
  // Throws InvalidArgument naming the position of an id outside [0, vocab_size()).
  std::string decode(std::span<const int32_t> tokens) const;
  int64_t vocab_size() const { return static_cast<int64_t>(bytes_.size()); }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

  // {"format": "dtrain-char-tokenizer", "version": 1, "bytes": [10, 32, ...]}
  void save(const std::string& path) const;
  // Throws IoError (cannot open) or DataFormatError (what is wrong), naming the file.
  static CharTokenizer load(const std::string& path);

 private:
  std::vector<uint8_t> bytes_;      // id -> byte
  std::array<int32_t, 256> ids_{};  // byte -> id, -1 when absent
};

// ---- token files ----

inline constexpr int64_t kTokenFileHeaderBytes = 24;

struct TokenFile {
  std::vector<int32_t> tokens;
  int64_t vocab_size = 0;
};

// Throws InvalidArgument when vocab_size is outside [1, 65536] or a token outside
// [0, vocab_size); IoError when the file cannot be written.
void write_token_file(const std::string& path, std::span<const int32_t> tokens, int64_t vocab_size);
TokenFile read_token_file(const std::string& path);

// ---- corpus preparation ----

struct PreparedText {
  std::string vocab_path;  // <out_dir>/vocab.json
  std::string train_path;  // <out_dir>/train.tok
  std::string val_path;    // <out_dir>/val.tok
  int64_t text_bytes = 0;
  int64_t vocab_size = 0;
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
};

// Builds the tokenizer from the whole text and writes vocab.json, train.tok and
// val.tok into out_dir (created if needed). The LAST val_fraction of the text's
// bytes (rounded down) is validation, the rest train. Throws InvalidArgument unless
// 0 < val_fraction < 1 and both splits get at least 2 tokens; IoError when the text
// cannot be read or out_dir written.
PreparedText prepare_text_corpus(const std::string& text_path, const std::string& out_dir,
                                 double val_fraction = 0.1);

// What the text models train on: the text file `text_path`, or the fortunes corpus
// (written to cache_dir/fortunes/corpus.txt) when it is empty, prepared into
// cache_dir/fortunes. Deterministic, so every rank may call it.
PreparedText prepare_cached_corpus(const std::string& text_path, const std::string& cache_dir);

// ---- the dataset ----

struct TokenBatch {
  Tensor x;  // i64 [B, T]
  Tensor y;  // i64 [B, T], y[b][t] == token after x[b][t]
};

// Which rows of a global batch this process keeps: rows rank, rank+size, ...
struct DpSlice {
  int64_t rank = 0;
  int64_t size = 1;
};

class TokenDataset {
 public:
  // Throws InvalidArgument unless block_size >= 1 and there are at least
  // block_size + 1 tokens.
  TokenDataset(std::vector<int32_t> tokens, int64_t block_size);
  static TokenDataset from_file(const std::string& path, int64_t block_size);

  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t block_size() const { return block_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }

  // A global batch of `batch` windows at uniform random offsets in
  // [0, num_tokens - block_size), drawn in row order with gen.below(); rows
  // slice.rank::slice.size are returned ([batch / slice.size, T]). Throws
  // InvalidArgument unless batch >= 1 and slice.size divides it.
  TokenBatch sample_batch(int64_t batch, Generator& gen, DpSlice slice = {}) const;

  // Ordered evaluation: window w covers tokens [w*T, w*T + T] (x, then y shifted by
  // one); windows do not overlap. Eval batch i holds windows [i*batch, (i+1)*batch);
  // only full batches are served (the < batch windows at the tail are skipped).
  int64_t num_eval_windows() const { return (num_tokens() - 1) / block_; }
  // min(num_eval_windows() / batch, max_batches); max_batches < 0 means no limit.
  int64_t num_eval_batches(int64_t batch, int64_t max_batches = -1) const;
  // Rows slice.rank::slice.size of eval batch `index`.
  TokenBatch eval_batch(int64_t index, int64_t batch, DpSlice slice = {}) const;

 private:
  TokenBatch windows(std::span<const int64_t> offsets, int64_t batch, DpSlice slice) const;

  std::vector<int32_t> tokens_;
  int64_t block_;
};

// ---- the baseline a language model must beat ----

struct UnigramBaseline {
  double nats_per_token = 0;  // mean -ln p(val token), p = (count_train + 1) / (N + V)
  double perplexity = 0;      // exp(nats_per_token)
};

// Cross-entropy of `val` under the add-one-smoothed unigram distribution of
// `train`. Throws InvalidArgument for an empty val, vocab_size < 1 or a token
// outside [0, vocab_size).
UnigramBaseline unigram_baseline(std::span<const int32_t> train, std::span<const int32_t> val,
                                 int64_t vocab_size);

}  // namespace dtrain::data
