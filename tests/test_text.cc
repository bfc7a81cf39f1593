// Text data: CharTokenizer, token files (round trip and every corruption the reader
// must catch), TokenDataset batches (shift by one, determinism, dp slices, the
// ordered sweep), the unigram baseline against hand-computed values, and the real
// fortunes corpus prepared end to end.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/data/text.h"
#include "dtrain/engine/random.h"

namespace dtrain::data {
namespace {

namespace fs = std::filesystem;

class TextTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::path(::testing::TempDir()) / "dtrain_text_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }
  std::string dir_;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void spit(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// The message of the Error that f() throws; fails the test when it throws none or
// another kind.
template <typename F>
std::string error_of(ErrorKind kind, F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.message();
    return e.message();
  }
  ADD_FAILURE() << "no error thrown";
  return "";
}

// ---------------------------------------------------------------- tokenizer

TEST(CharTokenizer, AllBytesRoundTrip) {
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  CharTokenizer tok = CharTokenizer::from_text(all);
  EXPECT_EQ(tok.vocab_size(), 256);
  Generator g(3);
  std::string text;
  for (int i = 0; i < 5000; ++i) text.push_back(static_cast<char>(g.below(256)));
  text += std::string("\0\xff\0", 3);
  std::vector<int32_t> ids = tok.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  // With all 256 bytes the id is the byte value itself.
  for (size_t i = 0; i < text.size(); ++i) EXPECT_EQ(ids[i], static_cast<unsigned char>(text[i]));
  EXPECT_EQ(tok.decode(ids), text);
}

TEST(CharTokenizer, VocabIsSortedDistinctBytes) {
  const std::string text = std::string(
      "b\xff"
      "a\0b",
      5);
  CharTokenizer tok = CharTokenizer::from_text(text);
  EXPECT_EQ(tok.bytes(), (std::vector<uint8_t>{0, 'a', 'b', 0xff}));
  EXPECT_EQ(tok.encode(text), (std::vector<int32_t>{2, 3, 1, 0, 2}));
  EXPECT_EQ(tok.decode(tok.encode(text)), text);
  std::string msg = error_of(ErrorKind::kInvalidArgument, [&] { tok.encode("abc"); });
  EXPECT_NE(msg.find("0x63 at offset 2"), std::string::npos) << msg;
  msg = error_of(ErrorKind::kInvalidArgument, [&] { tok.decode(std::vector<int32_t>{0, 4}); });
  EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
  error_of(ErrorKind::kInvalidArgument, [&] { CharTokenizer::from_text(""); });
}

TEST_F(TextTest, TokenizerSaveLoad) {
  CharTokenizer tok = CharTokenizer::from_text(std::string("hello, world\n\0\x80", 15));
  tok.save(path("vocab.json"));
  CharTokenizer back = CharTokenizer::load(path("vocab.json"));
  EXPECT_EQ(back.bytes(), tok.bytes());

  spit(path("bad.json"), "{not json");
  std::string msg =
      error_of(ErrorKind::kDataFormat, [&] { CharTokenizer::load(path("bad.json")); });
  EXPECT_NE(msg.find("bad.json"), std::string::npos) << msg;
  spit(path("unsorted.json"),
       R"({"format":"dtrain-char-tokenizer","version":1,"bytes":[10,32,32]})");
  msg = error_of(ErrorKind::kDataFormat, [&] { CharTokenizer::load(path("unsorted.json")); });
  EXPECT_NE(msg.find("bytes[2]"), std::string::npos) << msg;
  spit(path("range.json"), R"({"format":"dtrain-char-tokenizer","version":1,"bytes":[10,256]})");
  msg = error_of(ErrorKind::kDataFormat, [&] { CharTokenizer::load(path("range.json")); });
  EXPECT_NE(msg.find("bytes[1] = 256"), std::string::npos) << msg;
  spit(path("other.json"), R"({"bytes":[1]})");
  error_of(ErrorKind::kDataFormat, [&] { CharTokenizer::load(path("other.json")); });
  msg = error_of(ErrorKind::kIo, [&] { CharTokenizer::load(path("missing.json")); });
  EXPECT_NE(msg.find("missing.json"), std::string::npos) << msg;
}

// ---------------------------------------------------------------- token files

TEST_F(TextTest, TokenFileRoundTripAndLayout) {
  std::vector<int32_t> tokens = {0, 1, 65535, 258, 7};
  write_token_file(path("a.tok"), tokens, 65536);
  TokenFile f = read_token_file(path("a.tok"));
  EXPECT_EQ(f.tokens, tokens);
  EXPECT_EQ(f.vocab_size, 65536);
  // The documented layout, byte by byte.
  const std::string bytes = slurp(path("a.tok"));
  ASSERT_EQ(bytes.size(), 24u + 2 * tokens.size());
  EXPECT_EQ(bytes.substr(0, 6), "DTTOK1");
  EXPECT_EQ(bytes.substr(6, 2), std::string("\x01\x00", 2));
  EXPECT_EQ(bytes.substr(8, 8), std::string("\x05\0\0\0\0\0\0\0", 8));
  EXPECT_EQ(bytes.substr(16, 4), std::string("\0\0\x01\0", 4));
  EXPECT_EQ(bytes.substr(24 + 4, 2), std::string("\xff\xff", 2));  // 65535
  EXPECT_EQ(bytes.substr(24 + 6, 2), std::string("\x02\x01", 2));  // 258

  write_token_file(path("empty.tok"), {}, 3);
  EXPECT_TRUE(read_token_file(path("empty.tok")).tokens.empty());
  error_of(ErrorKind::kInvalidArgument, [&] { write_token_file(path("x.tok"), tokens, 100); });
  error_of(ErrorKind::kInvalidArgument,
           [&] { write_token_file(path("x.tok"), std::vector<int32_t>{1}, 65537); });
}

TEST_F(TextTest, TokenFileCorruptionNamesFileAndOffset) {
  write_token_file(path("good.tok"), std::vector<int32_t>{1, 2, 3, 4}, 10);
  const std::string good = slurp(path("good.tok"));
  struct Case {
    std::string name;
    std::string bytes;
    std::string expect;  // a piece of the message
  };
  std::string bad_magic = good, bad_dtype = good, bad_vocab = good, bad_token = good;
  bad_magic[5] = '2';
  bad_dtype[6] = 2;
  bad_vocab[16] = 0;
  bad_token[24 + 4] = 10;  // token 2 = 10, not < vocab 10
  const std::vector<Case> cases = {
      {"short_header.tok", good.substr(0, 23), "truncated header at byte offset 23"},
      {"zero.tok", "", "byte offset 0"},
      {"magic.tok", bad_magic, "bad magic at byte offset 0"},
      {"dtype.tok", bad_dtype, "dtype code 2 at byte offset 6"},
      {"vocab.tok", bad_vocab, "vocab size 0 at byte offset 16"},
      {"body.tok", good.substr(0, good.size() - 1), "truncated at byte offset 31"},
      {"trailing.tok", good + "x", "1 unexpected bytes after the last token, at byte offset 32"},
      {"token.tok", bad_token, "token 2 at byte offset 28 is 10"},
  };
  for (const Case& c : cases) {
    spit(path(c.name), c.bytes);
    std::string msg = error_of(ErrorKind::kDataFormat, [&] { read_token_file(path(c.name)); });
    EXPECT_NE(msg.find(c.name), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": " << msg;
  }
  // A count that would overflow 2*count is caught, not allocated.
  std::string huge = good;
  for (int i = 8; i < 16; ++i) huge[static_cast<size_t>(i)] = '\xff';
  spit(path("huge.tok"), huge);
  error_of(ErrorKind::kDataFormat, [&] { read_token_file(path("huge.tok")); });
  std::string msg = error_of(ErrorKind::kIo, [&] { read_token_file(path("nope.tok")); });
  EXPECT_NE(msg.find("nope.tok"), std::string::npos) << msg;
}

// ---------------------------------------------------------------- dataset

std::vector<int32_t> iota_tokens(int32_t n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = i;
  return t;
}

std::vector<int64_t> values(const Tensor& t) {
  const int64_t* p = t.data<int64_t>();
  return std::vector<int64_t>(p, p + t.numel());
}

TEST(TokenDataset, BatchesAreShiftedWindowsAndDeterministic) {
  const int64_t T = 8, B = 16;
  TokenDataset ds(iota_tokens(100), T);
  Generator g1(42), g2(42), g3(43);
  TokenBatch a = ds.sample_batch(B, g1);
  TokenBatch b = ds.sample_batch(B, g2);
  TokenBatch c = ds.sample_batch(B, g3);
  EXPECT_EQ(a.x.dtype(), DType::i64);
  EXPECT_EQ(a.x.shape(), (Shape{B, T}));
  EXPECT_EQ(a.y.shape(), (Shape{B, T}));
  EXPECT_EQ(values(a.x), values(b.x));
  EXPECT_EQ(values(a.y), values(b.y));
  EXPECT_NE(values(a.x), values(c.x));
  const std::vector<int64_t> x = values(a.x), y = values(a.y);
  for (int64_t r = 0; r < B; ++r) {
    const int64_t start = x[static_cast<size_t>(r * T)];
    EXPECT_GE(start, 0);
    EXPECT_LE(start + T, 99);  // y's last token must exist
    for (int64_t t = 0; t < T; ++t) {
      EXPECT_EQ(x[static_cast<size_t>(r * T + t)], start + t);
      EXPECT_EQ(y[static_cast<size_t>(r * T + t)], start + t + 1);
    }
  }
}

TEST(TokenDataset, OffsetsCoverEveryStartExactly) {
  // 12 tokens, T=4: valid starts are 0..7 (start 7 ends y at token 11).
  TokenDataset ds(iota_tokens(12), 4);
  Generator g(1);
  std::set<int64_t> starts;
  for (int i = 0; i < 200; ++i) starts.insert(values(ds.sample_batch(4, g).x)[0]);
  EXPECT_EQ(starts, (std::set<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  // Exactly T+1 tokens: one window.
  TokenDataset tiny(iota_tokens(5), 4);
  EXPECT_EQ(values(tiny.sample_batch(2, g).y), (std::vector<int64_t>{1, 2, 3, 4, 1, 2, 3, 4}));
  error_of(ErrorKind::kInvalidArgument, [] { TokenDataset(iota_tokens(4), 4); });
  error_of(ErrorKind::kInvalidArgument, [] { TokenDataset(iota_tokens(4), 0); });
}

TEST(TokenDataset, DpRanksSplitTheGlobalBatch) {
  const int64_t T = 5, B = 12;
  TokenDataset ds(iota_tokens(300), T);
  for (int64_t dp : {2, 3, 4}) {
    Generator global_gen(7);
    std::vector<int64_t> gx, gy;
    for (int step = 0; step < 3; ++step) {
      TokenBatch global = ds.sample_batch(B, global_gen);
      gx = values(global.x);
      gy = values(global.y);
      // Each rank runs its own generator from the same seed, in lock step.
      for (int64_t r = 0; r < dp; ++r) {
        Generator g(7);
        TokenBatch local;
        for (int s = 0; s <= step; ++s) local = ds.sample_batch(B, g, DpSlice{r, dp});
        ASSERT_EQ(local.x.shape(), (Shape{B / dp, T}));
        const std::vector<int64_t> lx = values(local.x), ly = values(local.y);
        for (int64_t i = 0; i < B / dp; ++i) {
          const int64_t row = r + i * dp;
          for (int64_t t = 0; t < T; ++t) {
            EXPECT_EQ(lx[static_cast<size_t>(i * T + t)], gx[static_cast<size_t>(row * T + t)]);
            EXPECT_EQ(ly[static_cast<size_t>(i * T + t)], gy[static_cast<size_t>(row * T + t)]);
          }
        }
        EXPECT_EQ(g.get_state().state, global_gen.get_state().state);
      }
    }
  }
  Generator g(0);
  error_of(ErrorKind::kInvalidArgument, [&] { ds.sample_batch(10, g, DpSlice{0, 4}); });
  error_of(ErrorKind::kInvalidArgument, [&] { ds.sample_batch(8, g, DpSlice{4, 4}); });
}

TEST(TokenDataset, EvalSweepIsOrderedAndNonOverlapping) {
  const int64_t T = 4;
  TokenDataset ds(iota_tokens(42), T);  // (42-1)/4 = 10 windows
  EXPECT_EQ(ds.num_eval_windows(), 10);
  EXPECT_EQ(ds.num_eval_batches(3), 3);     // windows 9 (tail) skipped
  EXPECT_EQ(ds.num_eval_batches(3, 2), 2);  // limited
  EXPECT_EQ(ds.num_eval_batches(20), 0);
  std::vector<int64_t> seen;
  for (int64_t i = 0; i < ds.num_eval_batches(3); ++i) {
    TokenBatch b = ds.eval_batch(i, 3);
    std::vector<int64_t> x = values(b.x), y = values(b.y);
    for (size_t k = 0; k < x.size(); ++k) EXPECT_EQ(y[k], x[k] + 1);
    seen.insert(seen.end(), x.begin(), x.end());
  }
  ASSERT_EQ(seen.size(), 36u);
  for (size_t k = 0; k < seen.size(); ++k) EXPECT_EQ(seen[k], static_cast<int64_t>(k));
  // dp=3: rank r gets window r of each batch.
  TokenBatch r1 = ds.eval_batch(2, 3, DpSlice{1, 3});
  EXPECT_EQ(values(r1.x), (std::vector<int64_t>{28, 29, 30, 31}));
  error_of(ErrorKind::kInvalidArgument, [&] { ds.eval_batch(3, 3); });
}

// ---------------------------------------------------------------- baseline

TEST(UnigramBaseline, HandComputed) {
  // train "aab", val "ab", V = 2: p(a) = 3/5, p(b) = 2/5.
  UnigramBaseline u =
      unigram_baseline(std::vector<int32_t>{0, 0, 1}, std::vector<int32_t>{0, 1}, 2);
  EXPECT_NEAR(u.nats_per_token, -(std::log(0.6) + std::log(0.4)) / 2, 1e-12);
  EXPECT_NEAR(u.nats_per_token, 0.713558177, 1e-9);
  EXPECT_NEAR(u.perplexity, 1.0 / std::sqrt(0.24), 1e-12);
  // An unseen symbol keeps probability 1/(N+V): train "a", val "c", V = 3.
  u = unigram_baseline(std::vector<int32_t>{0}, std::vector<int32_t>{2}, 3);
  EXPECT_NEAR(u.nats_per_token, std::log(4.0), 1e-12);
  // No training data: the uniform distribution, ln V.
  u = unigram_baseline({}, std::vector<int32_t>{1, 2, 3}, 7);
  EXPECT_NEAR(u.nats_per_token, std::log(7.0), 1e-12);
  error_of(ErrorKind::kInvalidArgument, [] { unigram_baseline({}, {}, 3); });
  error_of(ErrorKind::kInvalidArgument,
           [] { unigram_baseline(std::vector<int32_t>{3}, std::vector<int32_t>{0}, 3); });
}

// The same quantity computed from val counts: sum_v c_val(v) * -ln p(v) / N_val.
double unigram_by_counts(const std::vector<int32_t>& train, const std::vector<int32_t>& val,
                         int64_t vocab) {
  std::map<int32_t, int64_t> ct, cv;
  for (int32_t t : train) ++ct[t];
  for (int32_t t : val) ++cv[t];
  double h = 0;
  for (const auto& [v, n] : cv) {
    const double p = (ct[v] + 1.0) / (static_cast<double>(train.size()) + vocab);
    h -= static_cast<double>(n) * std::log(p);
  }
  return h / static_cast<double>(val.size());
}

// ---------------------------------------------------------------- the real corpus

TEST_F(TextTest, PrepareSplitsAtTheEnd) {
  spit(path("t.txt"), "abcabcabcXY");  // 11 bytes, val_fraction 0.2 -> 2 val bytes
  PreparedText p = prepare_text_corpus(path("t.txt"), path("out"), 0.2);
  EXPECT_EQ(p.text_bytes, 11);
  EXPECT_EQ(p.vocab_size, 5);
  EXPECT_EQ(p.train_tokens, 9);
  EXPECT_EQ(p.val_tokens, 2);
  CharTokenizer tok = CharTokenizer::load(p.vocab_path);
  EXPECT_EQ(tok.decode(read_token_file(p.train_path).tokens), "abcabcabc");
  EXPECT_EQ(tok.decode(read_token_file(p.val_path).tokens), "XY");
  error_of(ErrorKind::kInvalidArgument,
           [&] { prepare_text_corpus(path("t.txt"), path("o"), 1.0); });
  error_of(ErrorKind::kInvalidArgument,
           [&] { prepare_text_corpus(path("t.txt"), path("o"), 0.1); });
  error_of(ErrorKind::kIo, [&] { prepare_text_corpus(path("none.txt"), path("o"), 0.1); });
}

TEST_F(TextTest, MissingCorpusNamesThePackage) {
  std::string msg = error_of(ErrorKind::kIo, [&] { find_fortunes_files(path("no-such-dir")); });
  EXPECT_NE(msg.find("fortunes fortunes-min"), std::string::npos) << msg;
  EXPECT_NE(msg.find("no-such-dir/art"), std::string::npos) << msg;
}

TEST_F(TextTest, FortunesCorpusPreparedEndToEnd) {
  try {
    find_fortunes_files();
  } catch (const IoError& e) {
    // scripts/bootstrap.sh installs the package, so under CI this is a failure.
    if (std::getenv("CI") != nullptr) FAIL() << e.message();
    GTEST_SKIP() << e.message();
  }
  const std::string text = fortunes_corpus_text();
  EXPECT_GE(text.size(), 1'000'000u);
  EXPECT_LE(text.size(), 5'000'000u);
  const std::string corpus = write_fortunes_corpus(path("fortunes.txt"));
  EXPECT_EQ(slurp(corpus), text);

  PreparedText p = prepare_text_corpus(corpus, path("prepared"), 0.1);
  CharTokenizer tok = CharTokenizer::load(p.vocab_path);
  TokenFile train = read_token_file(p.train_path);
  TokenFile val = read_token_file(p.val_path);
  EXPECT_EQ(tok.vocab_size(), p.vocab_size);
  EXPECT_EQ(train.vocab_size, p.vocab_size);
  EXPECT_EQ(p.val_tokens, static_cast<int64_t>(text.size() / 10));
  EXPECT_EQ(tok.decode(train.tokens) + tok.decode(val.tokens), text);

  UnigramBaseline u = unigram_baseline(train.tokens, val.tokens, p.vocab_size);
  EXPECT_NEAR(u.nats_per_token, unigram_by_counts(train.tokens, val.tokens, p.vocab_size), 1e-9);
  // Debian 12's package (1:1.99.1-7.3): the values an independent Python script
  // computed from the same 43 files (collections.Counter over bytes).
  if (text.size() == 2'576'674u) {
    EXPECT_EQ(p.vocab_size, 114);
    EXPECT_NEAR(u.nats_per_token, 3.375631273757537, 1e-9);
  }
  // English text: well below uniform, well above zero.
  EXPECT_LT(u.nats_per_token, std::log(static_cast<double>(p.vocab_size)) - 1.0);
  EXPECT_GT(u.nats_per_token, 2.0);
  std::printf(
      "[ corpus   ] Debian fortunes + fortunes-min: %zu bytes, vocab %lld, train %lld / val %lld "
      "tokens; unigram baseline on val: %.4f nats/token, perplexity %.3f\n",
      text.size(), static_cast<long long>(p.vocab_size), static_cast<long long>(p.train_tokens),
      static_cast<long long>(p.val_tokens), u.nats_per_token, u.perplexity);

  TokenDataset ds = TokenDataset::from_file(p.train_path, 64);
  Generator g(5);
  TokenBatch b = ds.sample_batch(4, g);
  EXPECT_EQ(b.x.shape(), (Shape{4, 64}));
}

}  // namespace
}  // namespace dtrain::data
