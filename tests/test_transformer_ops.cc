// layer_norm, gelu, scaled_dot_product_attention, cat and split (the ops a GPT needs),
// nn::LayerNorm / nn::GELU, and autograd through the view ops a GPT block uses
// (reshape, transpose, contiguous).
//
// Oracles: float64 finite differences (gradcheck) on small odd shapes, T = 1,
// several query tiles and non-contiguous inputs; formulas evaluated in double inside
// the tests (layer norm, GELU); the naive attention composition softmax(q k^T s + mask) v
// built from matmul/softmax in f64 for the fused f32 kernel, forward and backward.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/threading.h"
#include "gradcheck.h"

namespace dtrain {
namespace {

using testing::gradcheck;
using testing::max_rel_error;
using testing::randn;
using V = std::vector<Tensor>;

template <typename E, typename F>
void expect_error(F call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << "expected an exception";
  } catch (const E& e) {
    std::string m = e.what();
    for (const auto& p : parts) EXPECT_NE(m.find(p), std::string::npos) << m << " lacks " << p;
  }
}

Tensor leaf(Tensor t) {
  t.set_requires_grad(true);
  return t;
}

// ---------------------------------------------------------------- layer_norm

// (x - mean) / sqrt(var + eps) * w + b over the last dim, in double.
std::vector<double> layer_norm_oracle(const Tensor& x, const Tensor& w, const Tensor& b,
                                      double eps) {
  std::vector<double> v = x.contiguous().to_vector<double>(), out(v.size());
  const int64_t d = x.size(-1), rows = x.numel() / d;
  std::vector<double> wv = w.defined() ? w.to_vector<double>() : std::vector<double>(d, 1.0);
  std::vector<double> bv = b.defined() ? b.to_vector<double>() : std::vector<double>(d, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double m = 0, var = 0;
    for (int64_t j = 0; j < d; ++j) m += v[r * d + j];
    m /= d;
    for (int64_t j = 0; j < d; ++j) var += (v[r * d + j] - m) * (v[r * d + j] - m);
    var /= d;
    for (int64_t j = 0; j < d; ++j) {
      out[r * d + j] = (v[r * d + j] - m) / std::sqrt(var + eps) * wv[j] + bv[j];
    }
  }
  return out;
}

TEST(LayerNorm, ForwardMatchesFormulaF32) {
  Generator gen(1);
  Tensor x = randn({3, 5, 37}, gen, DType::f32, 3.0) + 2.0;
  Tensor w = randn({37}, gen), b = randn({37}, gen);
  for (bool affine : {true, false}) {
    Tensor wi = affine ? w : Tensor(), bi = affine ? b : Tensor();
    Tensor y = layer_norm(x, wi, bi, 1e-5);
    EXPECT_EQ(y.shape(), x.shape());
    Tensor want = from_vector(layer_norm_oracle(x, wi, bi, 1e-5), x.shape());
    EXPECT_LE(max_rel_error(y, want), 2e-6) << "affine " << affine;
  }
}

TEST(LayerNorm, Gradcheck) {
  Generator gen(2);
  auto f = [](const V& in) { return layer_norm(in[0], in[1], in[2], 1e-5); };
  gradcheck("layer_norm [4,7]", f,
            {leaf(randn({4, 7}, gen)), leaf(randn({7}, gen)), leaf(randn({7}, gen))});
  gradcheck("layer_norm [1,1]", f,
            {leaf(randn({1, 1}, gen)), leaf(randn({1}, gen)), leaf(randn({1}, gen))});
  gradcheck("layer_norm [5] (1-D)", f,
            {leaf(randn({5}, gen)), leaf(randn({5}, gen)), leaf(randn({5}, gen))});
  gradcheck("layer_norm no affine [3,2,6]",
            [](const V& in) { return layer_norm(in[0], Tensor(), Tensor(), 1e-3); },
            {leaf(randn({3, 2, 6}, gen))});
  // Non-contiguous input: a transposed view; weight only.
  gradcheck("layer_norm of [5,3,2]^T(0,2) weight only",
            [](const V& in) { return layer_norm(in[0].transpose(0, 2), in[1], Tensor(), 1e-5); },
            {leaf(randn({5, 3, 2}, gen)), leaf(randn({5}, gen))});
  // Only the parameters require grad.
  gradcheck("layer_norm params only", f,
            {randn({6, 9}, gen), leaf(randn({9}, gen)), leaf(randn({9}, gen))});
}

TEST(LayerNorm, ParallelRowsMatchOneThread) {
  Generator gen(3);
  Tensor x = leaf(randn({300, 257}, gen)), w = leaf(randn({257}, gen)), b = leaf(randn({257}, gen));
  Tensor gy = randn({300, 257}, gen);
  auto run = [&](int threads) {
    set_num_threads(threads);
    for (Tensor* t : {&x, &w, &b}) t->set_grad(Tensor());
    Tensor y = layer_norm(x, w, b, 1e-5);
    y.backward(gy);
    return V{y.detach().clone(), x.grad(), w.grad(), b.grad()};
  };
  const int before = num_threads();
  V one = run(1), many = run(4);
  set_num_threads(before);
  for (size_t i = 0; i < one.size(); ++i) EXPECT_LE(max_rel_error(many[i], one[i]), 1e-6) << i;
}

TEST(LayerNorm, BadShapesNameTheOp) {
  Tensor x = zeros({2, 3, 4});
  expect_error<ShapeError>([&] { layer_norm(x, ones({5}), Tensor()); },
                           {"layer_norm", "weight", "[2,3,4]", "[5]"});
  expect_error<ShapeError>(
      [&] {
        layer_norm(x, ones({4}), zeros({4, 1}));
      },
      {"layer_norm", "bias", "[4,1]"});
  expect_error<ShapeError>([&] { layer_norm(scalar_tensor(1.0), Tensor(), Tensor()); },
                           {"layer_norm", "[]"});
  expect_error<DTypeError>([&] { layer_norm(x, ones({4}, TensorOptions{DType::f64}), Tensor()); },
                           {"layer_norm", "f64"});
}

TEST(LayerNormModule, PyTorchDefaultsAndForward) {
  nn::LayerNorm ln(6);
  auto params = ln.named_parameters();
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(ln.weight.to_vector<float>(), std::vector<float>(6, 1.f));
  EXPECT_EQ(ln.bias.to_vector<float>(), std::vector<float>(6, 0.f));
  EXPECT_TRUE(ln.weight.requires_grad());
  Generator gen(4);
  Tensor x = randn({2, 3, 6}, gen);
  EXPECT_EQ(max_rel_error(ln.forward(x), layer_norm(x, Tensor(), Tensor())), 0.0);
  expect_error<ShapeError>([&] { ln.forward(zeros({2, 5})); }, {"LayerNorm", "[2,5]"});
  EXPECT_THROW(nn::LayerNorm(0), InvalidArgument);
}

// ---------------------------------------------------------------- gelu

double gelu_oracle(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

TEST(Gelu, ForwardMatchesFormula) {
  Generator gen(5);
  Tensor x = randn({1000}, gen, DType::f32, 4.0);
  std::vector<double> xv = x.to_vector<double>(), want(xv.size());
  for (size_t i = 0; i < xv.size(); ++i) want[i] = gelu_oracle(xv[i]);
  EXPECT_LE(max_rel_error(gelu(x), from_vector(want, {1000})), 1e-6);
  // torch.nn.functional.gelu(torch.tensor([1., -0.5, 3.]), approximate="tanh")
  std::vector<float> y =
      gelu(from_vector(std::vector<float>{1.f, -0.5f, 3.f}, {3})).to_vector<float>();
  EXPECT_NEAR(y[0], 0.841192f, 1e-5);
  EXPECT_NEAR(y[1], -0.154286f, 1e-5);
  EXPECT_NEAR(y[2], 2.996363f, 1e-5);
  // Saturates without NaN.
  std::vector<float> big =
      gelu(from_vector(std::vector<float>{-100.f, 100.f}, {2})).to_vector<float>();
  EXPECT_EQ(big[0], 0.f);
  EXPECT_EQ(big[1], 100.f);
}

TEST(Gelu, Gradcheck) {
  Generator gen(6);
  gradcheck("gelu [3,7]", [](const V& in) { return gelu(in[0]); },
            {leaf(randn({3, 7}, gen, DType::f32, 2.0))});
  gradcheck("gelu of [4,5]^T", [](const V& in) { return gelu(in[0].t()); },
            {leaf(randn({4, 5}, gen, DType::f32, 2.0))});
  nn::GELU m;
  Tensor x = randn({4}, gen);
  EXPECT_EQ(max_rel_error(m.forward(x), gelu(x)), 0.0);
}

// ---------------------------------------------------------------- attention

// softmax(q k^T / sqrt(Dh) + mask) v from matmul and softmax (the oracle).
Tensor attention_reference(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  const Shape& s = q.shape();
  const int64_t b = s[0], h = s[1], t = s[2], dh = s[3];
  Tensor q3 = q.reshape({b * h, t, dh}), k3 = k.reshape({b * h, t, dh}),
         v3 = v.reshape({b * h, t, dh});
  Tensor scores = matmul(q3, k3.transpose(1, 2)) * (1.0 / std::sqrt(static_cast<double>(dh)));
  if (causal) {
    std::vector<double> m(static_cast<size_t>(t * t), 0.0);
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t j = i + 1; j < t; ++j) m[i * t + j] = -INFINITY;
    }
    scores = scores + from_vector(m, {t, t}).to(q.dtype());
  }
  return matmul(softmax(scores, -1), v3).reshape(s);
}

TEST(Attention, MatchesCompositionF32ForwardAndBackward) {
  Generator gen(7);
  struct Case {
    Shape shape;
    bool causal;
  };
  for (const Case& c :
       {Case{{2, 3, 130, 16}, true}, Case{{2, 3, 130, 16}, false}, Case{{1, 2, 1, 5}, true},
        Case{{3, 1, 64, 7}, true}, Case{{1, 1, 65, 33}, false}}) {
    Tensor q = leaf(randn(c.shape, gen)), k = leaf(randn(c.shape, gen)),
           v = leaf(randn(c.shape, gen));
    Tensor gy = randn(c.shape, gen);
    Tensor y = scaled_dot_product_attention(q, k, v, c.causal);
    EXPECT_TRUE(y.is_contiguous());
    V g = grad({y}, {q, k, v}, {gy});
    V r64;
    for (const Tensor& t : {q, k, v}) r64.push_back(leaf(t.detach().to(DType::f64)));
    Tensor want = attention_reference(r64[0], r64[1], r64[2], c.causal);
    V gw = grad({want}, r64, {gy.to(DType::f64)});
    const std::string name = shape_str(c.shape) + (c.causal ? " causal" : "");
    EXPECT_LE(max_rel_error(y, want), 2e-6) << name;
    for (size_t i = 0; i < 3; ++i) EXPECT_LE(max_rel_error(g[i], gw[i]), 1e-5) << name << " d" << i;
  }
}

TEST(Attention, Gradcheck) {
  Generator gen(8);
  for (bool causal : {false, true}) {
    auto f = [causal](const V& in) {
      return scaled_dot_product_attention(in[0], in[1], in[2], causal);
    };
    const std::string tag = causal ? " causal" : "";
    for (Shape s : {Shape{1, 1, 1, 3}, Shape{2, 3, 5, 4}, Shape{1, 2, 70, 3}}) {
      gradcheck("sdpa " + shape_str(s) + tag, f,
                {leaf(randn(s, gen)), leaf(randn(s, gen)), leaf(randn(s, gen))});
    }
    // Non-contiguous q, k, v: the GPT layout [B,T,H,Dh].transpose(1,2), and one
    // transposed in Dh (no unit stride: the kernel's contiguous fallback).
    gradcheck("sdpa of transposed views" + tag,
              [causal](const V& in) {
                return scaled_dot_product_attention(in[0].transpose(1, 2), in[1].transpose(1, 2),
                                                    in[2].transpose(2, 3), causal);
              },
              {leaf(randn({2, 6, 3, 4}, gen)), leaf(randn({2, 6, 3, 4}, gen)),
               leaf(randn({2, 3, 4, 6}, gen))});
  }
}

TEST(Attention, GptBlockPathGradcheck) {
  // qkv [B,T,3C] -> split -> [B,T,H,Dh] -> transpose(1,2) -> attention -> back to [B,T,C].
  const int64_t B = 2, T = 5, H = 2, Dh = 3, C = H * Dh;
  Generator gen(9);
  gradcheck(
      "gpt attention path",
      [=](const V& in) {
        V qkv = split(in[0], C, -1);
        auto heads = [=](const Tensor& t) { return t.reshape({B, T, H, Dh}).transpose(1, 2); };
        Tensor y = scaled_dot_product_attention(heads(qkv[0]), heads(qkv[1]), heads(qkv[2]), true);
        return y.transpose(1, 2).contiguous().reshape({B, T, C});
      },
      {leaf(randn({B, T, 3 * C}, gen))});
}

TEST(Attention, CausalOutputIgnoresLaterKeys) {
  Generator gen(10);
  Tensor q = randn({1, 2, 9, 4}, gen), k = randn({1, 2, 9, 4}, gen), v = randn({1, 2, 9, 4}, gen);
  Tensor y = scaled_dot_product_attention(q, k, v, true);
  Tensor k2 = k.clone(), v2 = v.clone();
  k2.narrow(2, 6, 3).fill_(5.0);
  v2.narrow(2, 6, 3).fill_(-7.0);
  Tensor y2 = scaled_dot_product_attention(q, k2, v2, true);
  EXPECT_EQ(max_rel_error(y2.narrow(2, 0, 6), y.narrow(2, 0, 6)), 0.0);
  EXPECT_GT(max_rel_error(y2.narrow(2, 6, 3), y.narrow(2, 6, 3)), 1e-3);
  // Row 0 of a causal attention is v's row 0.
  EXPECT_LE(max_rel_error(y.narrow(2, 0, 1), v.narrow(2, 0, 1)), 1e-6);
}

TEST(Attention, ThreadCountDoesNotChangeResults) {
  Generator gen(11);
  Shape s{2, 4, 96, 16};
  Tensor q = leaf(randn(s, gen)), k = leaf(randn(s, gen)), v = leaf(randn(s, gen));
  Tensor gy = randn(s, gen);
  auto run = [&](int threads) {
    set_num_threads(threads);
    Tensor y = scaled_dot_product_attention(q, k, v, true);
    V g = grad({y}, {q, k, v}, {gy});
    g.push_back(y);
    return g;
  };
  const int before = num_threads();
  V one = run(1), many = run(4);
  set_num_threads(before);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_EQ(one[i].to_vector<float>(), many[i].to_vector<float>()) << i;
  }
}

TEST(Attention, BadShapesNameTheOpAndShapes) {
  Tensor a = zeros({2, 3, 4, 5});
  expect_error<ShapeError>(
      [&] {
        scaled_dot_product_attention(zeros({3, 4, 5}), a, a, true);
      },
      {"scaled_dot_product_attention", "[3,4,5]", "[2,3,4,5]"});
  expect_error<ShapeError>(
      [&] {
        scaled_dot_product_attention(a, zeros({2, 3, 6, 5}), a, false);
      },
      {"scaled_dot_product_attention", "[2,3,6,5]"});
  expect_error<ShapeError>(
      [&] {
        scaled_dot_product_attention(zeros({1, 1, 2, 0}), zeros({1, 1, 2, 0}), zeros({1, 1, 2, 0}),
                                     false);
      },
      {"scaled_dot_product_attention", "head dimension"});
  expect_error<DTypeError>([&] { scaled_dot_product_attention(a, a.to(DType::f64), a, false); },
                           {"scaled_dot_product_attention", "f64"});
}

TEST(Attention, EmptySequence) {
  Tensor q = leaf(zeros({2, 1, 0, 4}));
  Tensor y = scaled_dot_product_attention(q, q, q, true);
  EXPECT_EQ(y.shape(), (Shape{2, 1, 0, 4}));
  sum(y).backward();
  EXPECT_EQ(q.grad().shape(), q.shape());
}

// ---------------------------------------------------------------- cat / split

TEST(CatSplit, ValuesAndViews) {
  Tensor a = from_vector(std::vector<float>{1, 2, 3, 4}, {2, 2});
  Tensor b = from_vector(std::vector<float>{5, 6}, {2, 1});
  EXPECT_EQ(cat({a, b}, -1).to_vector<float>(), (std::vector<float>{1, 2, 5, 3, 4, 6}));
  EXPECT_EQ(cat({a, a.t()}, 0).to_vector<float>(), (std::vector<float>{1, 2, 3, 4, 1, 3, 2, 4}));
  Tensor x = arange(14).reshape({2, 7});
  V parts = split(x, 3, 1);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[0].shape(), (Shape{2, 3}));
  EXPECT_EQ(parts[2].shape(), (Shape{2, 1}));
  EXPECT_EQ(parts[2].to_vector<float>(), (std::vector<float>{6, 13}));
  EXPECT_EQ(parts[1].raw_data(), static_cast<float*>(x.raw_data()) + 3);  // a view
  EXPECT_EQ(cat(parts, 1).to_vector<float>(), x.to_vector<float>());
  EXPECT_EQ(split(x, 7, 1).size(), 1u);
  EXPECT_EQ(split(x, 100, 0).size(), 1u);
  EXPECT_EQ(cat({arange(3, TensorOptions{DType::i64})}, 0).to_vector<int64_t>(),
            (std::vector<int64_t>{0, 1, 2}));
}

TEST(CatSplit, Gradcheck) {
  Generator gen(12);
  gradcheck("cat dim 1 of three (one transposed)",
            [](const V& in) {
              return cat({in[0], in[1].t(), in[2]}, 1);
            },
            {leaf(randn({3, 2}, gen)), leaf(randn({4, 3}, gen)), leaf(randn({3, 1}, gen))});
  gradcheck("cat dim -1, one input without grad",
            [](const V& in) {
              return cat({in[0], in[1]}, -1);
            },
            {leaf(randn({2, 3, 2}, gen)), randn({2, 3, 4}, gen)});
  gradcheck("split recombined out of order",
            [](const V& in) {
              V c = split(in[0], 2, 0);
              return cat({c[2] * 3.0, c[0], c[1] * -2.0}, 0);
            },
            {leaf(randn({5, 3}, gen))});
  gradcheck("one chunk of a split", [](const V& in) { return split(in[0], 4, -1)[1]; },
            {leaf(randn({2, 9}, gen))});
}

TEST(CatSplit, BadArgumentsNameTheOp) {
  expect_error<ShapeError>(
      [] {
        cat({zeros({2, 3}), zeros({3, 3})}, 1);
      },
      {"cat", "[3,3]", "[2,3]"});
  expect_error<ShapeError>([] { cat({zeros({2, 3}), zeros({2, 3, 1})}, 0); }, {"cat", "[2,3,1]"});
  expect_error<InvalidArgument>([] { cat({}, 0); }, {"cat", "empty"});
  expect_error<InvalidArgument>([] { cat({zeros({2})}, 1); }, {"cat", "dimension 1"});
  expect_error<DTypeError>(
      [] {
        cat({zeros({2}), zeros({2}, TensorOptions{DType::f64})}, 0);
      },
      {"cat", "f64"});
  expect_error<InvalidArgument>([] { split(zeros({4}), 0, 0); }, {"split", "split_size"});
  expect_error<ShapeError>([] { split(scalar_tensor(1.0), 1, 0); }, {"split", "0-D"});
}

// ---------------------------------------------------------------- views under autograd

TEST(ViewAutograd, ContiguousTransposeReshapeAreRecorded) {
  Generator gen(13);
  Tensor x = leaf(randn({3, 4}, gen));
  Tensor c = x.t().contiguous();
  ASSERT_TRUE(c.requires_grad());
  ASSERT_TRUE(c.grad_fn());
  EXPECT_EQ(c.grad_fn()->name(), "contiguous");
  gradcheck("t().contiguous()", [](const V& in) { return in[0].t().contiguous(); },
            {leaf(randn({3, 4}, gen))});
  gradcheck("reshape of a transposed view",
            [](const V& in) {
              return in[0].transpose(0, 2).reshape({-1, 6});
            },
            {leaf(randn({2, 3, 4}, gen))});
  gradcheck(
      "reshape -> transpose -> contiguous -> reshape",
      [](const V& in) {
        return in[0].reshape({2, 3, 2, 2}).transpose(1, 2).contiguous().reshape({2, 12}) * 2.0;
      },
      {leaf(randn({2, 3, 4}, gen))});
}

}  // namespace
}  // namespace dtrain
