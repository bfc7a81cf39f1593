// Compression: magnitude pruning (exact sparsity, masks kept through training and a
// checkpoint), int8 GEMM (oneDNN equals the plain-loop oracle), the quantized
// model, and the distillation loss (f64 gradcheck, a plain-loop value).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/distill.h"
#include "dtrain/engine/compress/prune.h"
#include "dtrain/engine/compress/quant.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/serialize.h"
#include "gradcheck.h"

namespace dtrain {
namespace {

using compress::PruneMasks;
using compress::PruneOptions;

std::map<std::string, Tensor> params_of(const nn::Module& m) {
  std::map<std::string, Tensor> out;
  for (auto& [n, t] : m.named_parameters()) out[n] = t;
  return out;
}

// |w| of every prunable weight, in prunable_weights() order.
std::vector<float> magnitudes(const nn::Module& m) {
  std::vector<float> out;
  auto p = params_of(m);
  for (const auto& n : compress::prunable_weights(m)) {
    for (float v : p.at(n).to_vector<float>()) out.push_back(std::fabs(v));
  }
  return out;
}

TEST(Prune, GlobalReachesExactSparsityAndKeepsTheLargest) {
  Generator gen(3);
  auto model = nn::make_model("mlp", gen);
  std::vector<float> before = magnitudes(*model);
  auto masks = PruneMasks::prune_by_magnitude(*model, {0.5, true});
  auto report = compress::weight_sparsity(*model);
  EXPECT_EQ(report.total, static_cast<int64_t>(before.size()));
  EXPECT_EQ(report.zeros, static_cast<int64_t>(std::floor(0.5 * before.size())));
  // Oracle: every kept weight is at least as large as every pruned one.
  std::vector<float> after = magnitudes(*model);
  float max_pruned = 0, min_kept = INFINITY;
  for (size_t i = 0; i < before.size(); ++i) {
    if (after[i] == 0)
      max_pruned = std::max(max_pruned, before[i]);
    else
      min_kept = std::min(min_kept, before[i]);
  }
  EXPECT_LE(max_pruned, min_kept);
}

TEST(Prune, PerLayerPrunesEachWeightByTheSameFraction) {
  Generator gen(4);
  auto model = nn::make_model("seed-cnn", gen);
  auto bias_before = params_of(*model).at("9.bias").to_vector<float>();
  PruneMasks::prune_by_magnitude(*model, {0.3, false});
  auto p = params_of(*model);
  for (const auto& n : compress::prunable_weights(*model)) {
    auto v = p.at(n).to_vector<float>();
    int64_t zeros = std::count(v.begin(), v.end(), 0.0f);
    EXPECT_EQ(zeros, static_cast<int64_t>(std::floor(0.3 * v.size()))) << n;
  }
  EXPECT_EQ(p.at("9.bias").to_vector<float>(), bias_before);  // biases are not pruned
}

TEST(Prune, SparsityOutsideRangeThrows) {
  Generator gen(5);
  auto model = nn::make_model("mlp", gen);
  for (double s : {1.0, -0.1, 1.5}) {
    EXPECT_THROW(PruneMasks::prune_by_magnitude(*model, {s, true}), InvalidArgument) << s;
  }
}

// SGD with momentum and weight decay, masking the gradients and then the weights.
void train_steps(nn::Module& model, const PruneMasks& masks, int steps, uint64_t seed) {
  optim::SGD opt(model.parameters(), optim::SGDOptions(0.1).momentum(0.9).weight_decay(0.01));
  Generator gen(seed);
  for (int s = 0; s < steps; ++s) {
    auto batch = nn::make_random_batch("mlp", 16, gen);
    model.zero_grad();
    cross_entropy(model.forward(batch.input), batch.target).backward();
    masks.mask_gradients(model);
    opt.step();
    masks.apply(model);
  }
}

void expect_masked_zero(const nn::Module& model, const PruneMasks& masks) {
  auto p = params_of(model);
  for (const auto& [name, mask] : masks.masks()) {
    auto w = p.at(name).to_vector<float>();
    auto m = mask.to_vector<float>();
    for (size_t i = 0; i < w.size(); ++i) {
      if (m[i] == 0) ASSERT_EQ(w[i], 0.0f) << name << "[" << i << "]";
    }
  }
}

TEST(Prune, PrunedWeightsStayZeroThroughTrainingAndACheckpoint) {
  Generator gen(6);
  auto model = nn::make_model("mlp", gen);
  auto masks = PruneMasks::prune_by_magnitude(*model, {0.6, true});
  auto w0 = params_of(*model).at("1.weight").to_vector<float>();
  train_steps(*model, masks, 5, 11);
  expect_masked_zero(*model, masks);
  EXPECT_NE(params_of(*model).at("1.weight").to_vector<float>(), w0);  // it did train

  auto path = std::filesystem::temp_directory_path() / "dtrain_test_prune.ckpt";
  save_checkpoint(path.string(), *model, nullptr, {{"prune", masks.to_json()}});
  Generator gen2(99);
  auto resumed = nn::make_model("mlp", gen2);
  auto extra = load_checkpoint(path.string(), *resumed, nullptr);
  auto loaded = PruneMasks::from_json(extra.at("prune"), *resumed);
  ASSERT_EQ(loaded.masks().size(), masks.masks().size());
  for (const auto& [name, mask] : masks.masks()) {
    EXPECT_EQ(loaded.masks().at(name).to_vector<float>(), mask.to_vector<float>()) << name;
  }
  train_steps(*resumed, loaded, 5, 12);
  expect_masked_zero(*resumed, masks);
  EXPECT_NEAR(compress::weight_sparsity(*resumed).fraction(), 0.6, 1e-5);
  std::filesystem::remove(path);
}

TEST(Prune, MasksOfAnotherModelAreRejected) {
  Generator gen(7);
  auto mlp = nn::make_model("mlp", gen);
  auto cnn = nn::make_model("seed-cnn", gen);
  auto masks = PruneMasks::prune_by_magnitude(*mlp, {0.5, false});
  EXPECT_THROW(PruneMasks::from_json(masks.to_json(), *cnn), Error);
}

TEST(Int8Gemm, OneDnnEqualsTheReferenceOnOddSizes) {
  Generator gen(8);
  for (auto [m, n, k] : std::vector<std::array<int64_t, 3>>{
           {1, 1, 1}, {7, 13, 31}, {33, 65, 129}, {100, 10, 577}, {3, 257, 5}}) {
    std::vector<int8_t> a(m * k), b(n * k);
    for (auto& v : a) v = static_cast<int8_t>(static_cast<int>(gen.next_u64() % 255) - 127);
    for (auto& v : b) v = static_cast<int8_t>(static_cast<int>(gen.next_u64() % 255) - 127);
    std::vector<int32_t> ref(m * n), dnn(m * n, -1);
    compress::gemm_s8s8s32(compress::Int8Kernel::kReference, m, n, k, a.data(), b.data(),
                           ref.data());
    compress::gemm_s8s8s32(compress::Int8Kernel::kOneDnn, m, n, k, a.data(), b.data(), dnn.data());
    EXPECT_EQ(dnn, ref) << m << "x" << n << "x" << k;
    // B as [K, N]: the same products, so the same integers.
    std::vector<int8_t> bkn(n * k);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t p = 0; p < k; ++p) bkn[p * n + j] = b[j * k + p];
    }
    for (auto kernel : {compress::Int8Kernel::kReference, compress::Int8Kernel::kOneDnn}) {
      std::vector<int32_t> c(m * n, -1);
      compress::gemm_s8s8s32(kernel, m, n, k, a.data(), bkn.data(), c.data(), false);
      EXPECT_EQ(c, ref) << m << "x" << n << "x" << k << " B not transposed";
    }
  }
}

TEST(Int8Conv, OneDnnEqualsTheReferenceOnOddShapes) {
  Generator gen(14);
  // n, c, h, w, out, k, stride, padding
  for (auto s : std::vector<compress::Int8ConvShape>{{1, 1, 5, 5, 1, 1, 1, 0},
                                                     {2, 3, 7, 9, 5, 3, 1, 1},
                                                     {3, 17, 11, 10, 33, 3, 2, 0},
                                                     {2, 1, 28, 28, 32, 3, 1, 0},
                                                     {1, 6, 9, 9, 7, 5, 2, 2}}) {
    std::vector<int8_t> x(s.n * s.h * s.w * s.c), w(s.out * s.c * s.k * s.k);
    for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(gen.next_u64() % 255) - 127);
    for (auto& v : w) v = static_cast<int8_t>(static_cast<int>(gen.next_u64() % 255) - 127);
    std::vector<int32_t> ref(s.n * s.oh() * s.ow() * s.out), dnn(ref.size(), -1);
    compress::conv_s8s8s32(compress::Int8Kernel::kReference, s, x.data(), w.data(), ref.data());
    compress::conv_s8s8s32(compress::Int8Kernel::kOneDnn, s, x.data(), w.data(), dnn.data());
    EXPECT_EQ(dnn, ref) << "c=" << s.c << " out=" << s.out << " k=" << s.k << " stride=" << s.stride
                        << " pad=" << s.padding;
  }
}

TEST(Int8Model, KernelsAgreeExactlyAndTrackTheF32Model) {
  for (const char* name : {"mlp", "seed-cnn"}) {
    Generator gen(9);
    auto model = nn::make_model(name, gen);
    std::vector<Tensor> calib;
    for (int i = 0; i < 2; ++i) calib.push_back(nn::make_random_batch(name, 16, gen).input);
    auto q = compress::QuantizedModel::build(*model, calib);
    Tensor x = nn::make_random_batch(name, 8, gen).input;
    auto ref = q.forward(x, compress::Int8Kernel::kReference).to_vector<float>();
    auto dnn = q.forward(x, compress::Int8Kernel::kOneDnn).to_vector<float>();
    EXPECT_EQ(dnn, ref) << name;
    auto im2col = q.forward(x, compress::Int8Kernel::kOneDnnIm2col).to_vector<float>();
    EXPECT_EQ(im2col, ref) << name;
    NoGradGuard ng;
    auto f32 = model->forward(x).to_vector<float>();
    double num = 0, den = 0;
    for (size_t i = 0; i < f32.size(); ++i) {
      num += (ref[i] - f32[i]) * (ref[i] - f32[i]);
      den += f32[i] * f32[i];
    }
    EXPECT_LT(std::sqrt(num / den), 0.05) << name << ": int8 logits far from f32";
  }
}

TEST(Int8Model, LinearEqualsTheQuantizedArithmetic) {
  Generator gen(10);
  auto model = std::make_shared<nn::Sequential>(
      std::initializer_list<std::shared_ptr<nn::Module>>{std::make_shared<nn::Linear>(5, 3, gen)});
  Tensor x = testing::randn({4, 5}, gen);
  auto q = compress::QuantizedModel::build(*model, {x});
  const auto& l = q.layers()[0];
  auto xs = x.to_vector<float>();
  float amax = 0;
  for (float v : xs) amax = std::max(amax, std::fabs(v));
  EXPECT_FLOAT_EQ(l.input_scale, amax / 127.f);
  auto y = q.forward(x, compress::Int8Kernel::kOneDnn).to_vector<float>();
  for (int r = 0; r < 4; ++r) {
    for (int o = 0; o < 3; ++o) {
      double acc = 0;
      for (int i = 0; i < 5; ++i) {
        acc += std::lround(std::clamp(xs[r * 5 + i] / l.input_scale, -127.f, 127.f)) *
               double(l.weight[o * 5 + i]);
      }
      double want = acc * l.input_scale * l.weight_scale[o] + l.bias[o];
      EXPECT_NEAR(y[r * 3 + o], want, 1e-5 * (1 + std::fabs(want)));
    }
  }
}

TEST(Int8Model, NoCalibrationBatchThrows) {
  Generator gen(11);
  auto model = nn::make_model("mlp", gen);
  EXPECT_THROW(compress::QuantizedModel::build(*model, {}), InvalidArgument);
}

TEST(Distill, KdLossGradcheckF64) {
  Generator gen(12);
  Tensor s = testing::randn({4, 6}, gen, DType::f64);
  Tensor t = testing::randn({4, 6}, gen, DType::f64);
  Tensor y = from_vector<int64_t>({0, 5, 2, 3}, {4});
  s.set_requires_grad(true);
  for (double temp : {1.0, 4.0}) {
    testing::gradcheck(
        "kd_loss",
        [&](const std::vector<Tensor>& in) { return compress::kd_loss(in[0], t, y, temp, 0.3); },
        {s});
  }
}

TEST(Distill, KdLossValueMatchesPlainLoops) {
  Generator gen(13);
  const int B = 3, C = 5;
  const double T = 4, alpha = 0.7;
  Tensor s = testing::randn({B, C}, gen, DType::f64);
  Tensor t = testing::randn({B, C}, gen, DType::f64);
  Tensor y = from_vector<int64_t>({1, 4, 0}, {B});
  auto sv = s.to_vector<double>(), tv = t.to_vector<double>();
  auto log_softmax_row = [&](const std::vector<double>& v, int r, double scale) {
    std::vector<double> out(C);
    double m = -INFINITY, z = 0;
    for (int j = 0; j < C; ++j) m = std::max(m, v[r * C + j] * scale);
    for (int j = 0; j < C; ++j) z += std::exp(v[r * C + j] * scale - m);
    for (int j = 0; j < C; ++j) out[j] = v[r * C + j] * scale - m - std::log(z);
    return out;
  };
  double kl = 0, ce = 0;
  for (int r = 0; r < B; ++r) {
    auto lp = log_softmax_row(tv, r, 1 / T), lq = log_softmax_row(sv, r, 1 / T);
    auto ls = log_softmax_row(sv, r, 1);
    for (int j = 0; j < C; ++j) kl += std::exp(lp[j]) * (lp[j] - lq[j]);
    ce -= ls[y.to_vector<int64_t>()[r]];
  }
  double want = alpha * T * T * kl / B + (1 - alpha) * ce / B;
  EXPECT_NEAR(compress::kd_loss(s, t, y, T, alpha).item(), want, 1e-12);
  EXPECT_THROW(compress::kd_loss(s, t, y, 0.0, alpha), InvalidArgument);
  EXPECT_THROW(compress::kd_loss(s, t, y, T, 1.5), InvalidArgument);
}

}  // namespace
}  // namespace dtrain
