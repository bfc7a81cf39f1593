// Data augmentation (dtrain/engine/data/augment.h): each transform against a plain
// reference loop, the identity cases, determinism across worker threads and batch
// layouts, and (on a GPU) CPU == CUDA bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "dtrain/common/error.h"
#include "dtrain/engine/cuda/runtime.h"
#include "dtrain/engine/data/augment.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/random.h"

namespace dtrain::data {
namespace {

Tensor random_images(int64_t n, int64_t c, int64_t h, int64_t w, uint64_t seed) {
  Tensor t = empty({n, c, h, w});
  Generator gen(seed);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = gen.uniform_float();
  return t;
}

std::vector<float> values(const Tensor& t) {
  Tensor c = t.contiguous();
  return {c.data<float>(), c.data<float>() + c.numel()};
}

// One sample [C,H,W] through one transform with its draws, via augment_sample.
std::vector<float> run_one(const std::string& spec, const std::vector<float>& img, int64_t c,
                           int64_t h, int64_t w, uint64_t seed, int64_t index,
                           fn::AugStage* drawn = nullptr) {
  AugmentPipeline p = parse_augment(spec);
  auto stages = draw_augment_params(p, h, w, seed, 0, index);
  if (drawn) *drawn = stages.at(0);
  std::vector<float> out = img, scratch(static_cast<size_t>(h * w));
  augment_sample(stages, out.data(), c, h, w, scratch.data());
  return out;
}

std::vector<float> random_vec(size_t n, uint64_t seed) {
  Generator gen(seed);
  std::vector<float> v(n);
  for (float& x : v) x = gen.uniform_float() + 0.1f;
  return v;
}

TEST(Augment, CropMatchesPaddedWindow) {
  const int64_t c = 2, h = 5, w = 7, pad = 2;
  auto img = random_vec(c * h * w, 1);
  for (int64_t idx = 0; idx < 20; ++idx) {
    fn::AugStage s;
    auto out = run_one("crop:2", img, c, h, w, 9, idx, &s);
    ASSERT_GE(s.dx, 0);
    ASSERT_LE(s.dx, 2 * pad);
    // Reference: build the zero-padded image, take the H x W window at (dy, dx).
    const int64_t ph = h + 2 * pad, pw = w + 2 * pad;
    std::vector<float> padded(c * ph * pw, 0.0f);
    for (int64_t k = 0; k < c; ++k)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x)
          padded[(k * ph + y + pad) * pw + x + pad] = img[(k * h + y) * w + x];
    for (int64_t k = 0; k < c; ++k)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x)
          ASSERT_EQ(out[(k * h + y) * w + x], padded[(k * ph + y + s.dy) * pw + x + s.dx]);
  }
}

TEST(Augment, FlipMirrorsRowsAboutHalfTheTime) {
  const int64_t c = 1, h = 3, w = 4;
  auto img = random_vec(c * h * w, 2);
  int flipped = 0;
  for (int64_t idx = 0; idx < 200; ++idx) {
    fn::AugStage s;
    auto out = run_one("flip", img, c, h, w, 3, idx, &s);
    std::vector<float> ref = img;
    if (s.flip) {
      ++flipped;
      for (int64_t y = 0; y < h; ++y) std::reverse(ref.begin() + y * w, ref.begin() + (y + 1) * w);
    }
    ASSERT_EQ(out, ref);
  }
  EXPECT_GT(flipped, 70);
  EXPECT_LT(flipped, 130);
  EXPECT_EQ(run_one("flip:0", img, c, h, w, 3, 5), img);
}

// A double-precision bilinear rotation written from the definition: the output
// pixel p takes the input at R(a) (p - centre) + centre, weights (1-fx)(1-fy) etc.
std::vector<double> rotate_ref(const std::vector<float>& img, int64_t h, int64_t w, double a) {
  std::vector<double> out(h * w);
  const double cx = (w - 1) / 2.0, cy = (h - 1) / 2.0;
  auto at = [&](int64_t y, int64_t x) {
    return (y < 0 || y >= h || x < 0 || x >= w) ? 0.0 : static_cast<double>(img[y * w + x]);
  };
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x) {
      double sx = std::cos(a) * (x - cx) - std::sin(a) * (y - cy) + cx;
      double sy = std::sin(a) * (x - cx) + std::cos(a) * (y - cy) + cy;
      auto x0 = static_cast<int64_t>(std::floor(sx)), y0 = static_cast<int64_t>(std::floor(sy));
      double fx = sx - x0, fy = sy - y0;
      out[y * w + x] = at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy) +
                       at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy;
    }
  return out;
}

TEST(Augment, RotateMatchesDoublePrecisionReference) {
  const int64_t h = 9, w = 11;
  auto img = random_vec(h * w, 4);
  for (int64_t idx = 0; idx < 10; ++idx) {
    fn::AugStage s;
    auto out = run_one("rotate:15", img, 1, h, w, 5, idx, &s);
    double a = std::atan2(s.m[3], s.m[0]);
    ASSERT_LE(std::abs(a), 15 * std::numbers::pi / 180 + 1e-6);
    auto ref = rotate_ref(img, h, w, a);
    for (int64_t i = 0; i < h * w; ++i) ASSERT_NEAR(out[i], ref[i], 2e-5) << "pixel " << i;
  }
}

TEST(Augment, Rotate90IsATransposeAndFlip) {
  // Counter-clockwise by 90 degrees: out(y, x) = in(x, W-1-y) on a square image.
  const int64_t n = 6;
  auto img = random_vec(n * n, 6);
  std::vector<fn::AugStage> fixed = {rotation_stage(90, n, n)};
  std::vector<float> out = img, scratch(n * n);
  augment_sample(fixed, out.data(), 1, n, n, scratch.data());
  double a = std::atan2(fixed[0].m[3], fixed[0].m[0]);
  auto ref = rotate_ref(img, n, n, a);
  for (int64_t y = 0; y < n; ++y)
    for (int64_t x = 0; x < n; ++x) {
      ASSERT_NEAR(out[y * n + x], ref[y * n + x], 2e-5);
      ASSERT_NEAR(out[y * n + x], img[x * n + (n - 1 - y)], 1e-6);
    }
}

TEST(Augment, IdentityCases) {
  const int64_t c = 3, h = 8, w = 8;
  auto img = random_vec(c * h * w, 7);
  for (int64_t idx = 0; idx < 10; ++idx) {
    EXPECT_EQ(run_one("rotate:0", img, c, h, w, 1, idx), img);
    EXPECT_EQ(run_one("crop:0", img, c, h, w, 1, idx), img);
    EXPECT_EQ(run_one("normalize:0:1", img, c, h, w, 1, idx), img);
  }
}

TEST(Augment, NormalizeIsTorchFormula) {
  auto img = random_vec(16, 8);
  auto out = run_one("normalize:0.1307:0.3081", img, 1, 4, 4, 1, 0);
  for (size_t i = 0; i < img.size(); ++i) EXPECT_EQ(out[i], (img[i] - 0.1307f) / 0.3081f);
}

TEST(Augment, ParseErrorsNameTheItem) {
  EXPECT_EQ(parse_augment("crop:2,flip,rotate:10").str(), "crop:2,flip,rotate:10");
  EXPECT_TRUE(parse_augment("").empty());
  for (const char* bad : {"crop", "crop:x", "crop:1.5", "shear:3", "flip:2", "rotate:-1"}) {
    try {
      parse_augment(std::string("flip,") + bad);
      FAIL() << bad << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
}

// Every batch of an epoch through a DataLoader over an AugmentedDataset.
std::vector<float> epoch_values(int threads, int64_t epoch, int64_t batch, uint64_t seed) {
  auto base = std::make_shared<TensorDataset>(random_images(40, 1, 12, 12, 11),
                                              zeros({40}, TensorOptions{}.with_dtype(DType::i64)));
  auto aug = std::make_shared<AugmentedDataset>(base, parse_augment("crop:2,flip,rotate:10"), seed,
                                                threads);
  aug->set_epoch(epoch);
  DataLoader loader(aug, DistributedSampler(40, 0, 1, 3), batch);
  loader.begin_epoch(epoch);
  std::vector<float> all;
  Batch b;
  while (loader.next(b)) {
    auto v = values(b.input);
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

TEST(Augment, SameSeedSameBatchesForAnyThreadCount) {
  auto one = epoch_values(1, 0, 8, 5);
  EXPECT_EQ(one, epoch_values(3, 0, 8, 5));
  EXPECT_EQ(one, epoch_values(8, 0, 8, 5));
  EXPECT_EQ(one, epoch_values(2, 0, 5, 5));  // other batch cuts: each sample keyed by its index
  EXPECT_NE(one, epoch_values(1, 1, 8, 5));  // another epoch draws anew
  EXPECT_NE(one, epoch_values(1, 0, 8, 6));  // another seed too
}

// What a CUDA run does: a loader over the raw rows, then augment() on the delivered
// batch keyed by Batch::indices. On the CPU it must give the AugmentedDataset's bytes.
std::vector<float> deferred_epoch_values(int64_t epoch, int64_t batch, uint64_t seed) {
  auto base = std::make_shared<TensorDataset>(random_images(40, 1, 12, 12, 11),
                                              zeros({40}, TensorOptions{}.with_dtype(DType::i64)));
  AugmentedDataset aug(base, parse_augment("crop:2,flip,rotate:10"), seed, 2);
  aug.set_epoch(epoch);
  DataLoader loader(aug.base(), DistributedSampler(40, 0, 1, 3), batch);
  loader.begin_epoch(epoch);
  std::vector<float> all;
  Batch b;
  while (loader.next(b)) {
    EXPECT_EQ(static_cast<int64_t>(b.indices.size()), b.input.size(0));
    auto v = values(aug.augment(b.input, b.indices));
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

TEST(Augment, AugmentingTheDeliveredBatchMatchesTheAugmentedDataset) {
  EXPECT_EQ(epoch_values(1, 2, 8, 5), deferred_epoch_values(2, 8, 5));
  EXPECT_EQ(epoch_values(1, 0, 7, 9), deferred_epoch_values(0, 7, 9));
}

TEST(Augment, BadBatchIsOneClearError) {
  std::vector<int64_t> idx = {0, 1};
  EXPECT_THROW(augment_batch(empty({2, 4, 4}), idx, parse_augment("flip"), 1, 0), ShapeError);
  EXPECT_THROW(augment_batch(random_images(3, 1, 4, 4, 1), idx, parse_augment("flip"), 1, 0),
               ShapeError);
}

TEST(Augment, CudaMatchesCpuBitForBit) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device: " << cuda::device_error();
  Tensor x = random_images(16, 3, 20, 24, 12);
  std::vector<int64_t> idx(16);
  for (int64_t i = 0; i < 16; ++i) idx[i] = 100 + 7 * i;
  AugmentPipeline p = parse_augment("crop:3,flip,rotate:12,normalize:0.5:0.25");
  Tensor cpu = augment_batch(x, idx, p, 42, 3, 2);
  Tensor gpu = augment_batch(x.to(Device::cuda(0)), idx, p, 42, 3).to(Device::cpu());
  EXPECT_EQ(values(cpu), values(gpu));
}

}  // namespace
}  // namespace dtrain::data
