// softmax, log_softmax, cross_entropy, embedding, lstm and dropout.
//
// Oracles: float64 finite differences (gradcheck) for every differentiable input,
// formulas evaluated in double inside the tests (softmax, cross-entropy, a one-cell
// LSTM written out by hand to pin PyTorch's gate order), and the plain double-precision
// reference LSTM (cpu/lstm_ref.h) for the fast kernel on random odd shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu/lstm_ref.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#include "gradcheck.h"

namespace dtrain {
namespace {

using testing::gradcheck;
using testing::max_rel_error;
using testing::randn;

// Expects `call` to throw E whose message contains every string in `parts`.
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

Tensor targets(const std::vector<int64_t>& v) {
  return from_vector<int64_t>(v, {static_cast<int64_t>(v.size())});
}

// ---------------------------------------------------------------- functors

TEST(Functors, FastExpWithinTwoUlp) {
  double worst = 0;
  for (double v = -87.0; v < 88.0; v += 0.00731) {
    float x = static_cast<float>(v);
    double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(fn::fast_exp(x) - want) / want);
  }
  EXPECT_LE(worst, 2.0 * 5.97e-8);
  EXPECT_TRUE(std::isnan(fn::fast_exp(NAN)));
  EXPECT_LE(fn::fast_exp(-1000.0f), 2e-38f);
  EXPECT_TRUE(std::isfinite(fn::fast_exp(1000.0f)));
  EXPECT_EQ(fn::fast_exp(0.0f), 1.0f);
  EXPECT_EQ(fn::fast_exp(0.5), std::exp(0.5));  // f64 is std::exp
}

TEST(Functors, FastSigmoidAndTanhAbsoluteError) {
  double ws = 0, wt = 0;
  for (double v = -40.0; v < 40.0; v += 0.00317) {
    float x = static_cast<float>(v);
    double xd = x;
    ws = std::max(ws, std::abs(fn::fast_sigmoid(x) - 1.0 / (1.0 + std::exp(-xd))));
    wt = std::max(wt, std::abs(fn::fast_tanh(x) - std::tanh(xd)));
  }
  EXPECT_LE(ws, 2e-7);
  EXPECT_LE(wt, 3e-7);
  EXPECT_EQ(fn::fast_tanh(1e4f), 1.0f);
  EXPECT_EQ(fn::fast_tanh(-1e4f), -1.0f);
  EXPECT_NEAR(fn::fast_tanh(0.3), std::tanh(0.3), 1e-15);
}

// ---------------------------------------------------------------- softmax

// softmax / log_softmax along `dim` of a contiguous tensor, in double.
std::vector<double> softmax_oracle(const Tensor& x, int64_t dim, bool log) {
  std::vector<double> v = x.contiguous().to_vector<double>(), out(v.size());
  int64_t nd = x.dim(), d = dim < 0 ? dim + nd : dim;
  int64_t outer = 1, c = x.shape()[static_cast<size_t>(d)], inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= x.shape()[static_cast<size_t>(i)];
  for (int64_t i = d + 1; i < nd; ++i) inner *= x.shape()[static_cast<size_t>(i)];
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t k = 0; k < inner; ++k) {
      auto at = [&](int64_t j) { return static_cast<size_t>((o * c + j) * inner + k); };
      double m = -INFINITY, s = 0;
      for (int64_t j = 0; j < c; ++j) m = std::max(m, v[at(j)]);
      for (int64_t j = 0; j < c; ++j) s += std::exp(v[at(j)] - m);
      for (int64_t j = 0; j < c; ++j) {
        out[at(j)] = log ? v[at(j)] - m - std::log(s) : std::exp(v[at(j)] - m) / s;
      }
    }
  }
  return out;
}

TEST(Softmax, MatchesDoubleOracleOnEveryDim) {
  Generator gen(11);
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor x = randn({3, 7, 5}, gen, dt, 4.0);
    for (int64_t dim : {0, 1, 2, -1, -3}) {
      for (bool log : {false, true}) {
        Tensor y = log ? log_softmax(x, dim) : softmax(x, dim);
        Tensor want = from_vector<double>(softmax_oracle(x, dim, log), x.shape());
        EXPECT_LE(max_rel_error(y, want), dt == DType::f32 ? 1e-6 : 1e-13)
            << "dim " << dim << " log " << log << " " << dtype_name(dt);
      }
    }
  }
}

TEST(Softmax, RowsSumToOneAndLargeLogitsStayFinite) {
  Generator gen(12);
  Tensor x = randn({9, 1000}, gen, DType::f32, 30.0);
  float* p = x.data<float>();
  p[0] = 1e4f;  // would overflow exp without the max shift
  p[1000] = -1e4f;
  Tensor y = softmax(x, 1);
  std::vector<float> v = y.to_vector<float>();
  for (int64_t r = 0; r < 9; ++r) {
    double s = 0;
    for (int64_t j = 0; j < 1000; ++j) {
      float e = v[static_cast<size_t>(r * 1000 + j)];
      ASSERT_TRUE(std::isfinite(e) && e >= 0.0f);
      s += e;
    }
    EXPECT_NEAR(s, 1.0, 1e-5) << "row " << r;
  }
  EXPECT_FLOAT_EQ(v[0], 1.0f);
  Tensor ls = log_softmax(from_vector<float>({1000.0f, 0.0f}, {2}), 0);
  EXPECT_EQ(ls.to_vector<float>(), (std::vector<float>{0.0f, -1000.0f}));
}

TEST(Softmax, NonContiguousInputAndBadDim) {
  Generator gen(13);
  Tensor x = randn({6, 4}, gen);
  Tensor xt = x.t();  // [4,6] view
  Tensor want = from_vector<double>(softmax_oracle(xt.contiguous(), 1, false), {4, 6});
  EXPECT_LE(max_rel_error(softmax(xt, 1), want), 1e-6);
  expect_error<InvalidArgument>([&] { softmax(x, 2); }, {"softmax", "2", "[6,4]"});
  expect_error<InvalidArgument>([&] { log_softmax(x, -3); }, {"log_softmax"});
}

TEST(Gradcheck, SoftmaxAndLogSoftmax) {
  Generator gen(14);
  Tensor x = randn({3, 4, 5}, gen).set_requires_grad(true);
  for (int64_t dim : {-1, 0, 1}) {
    std::string d = std::to_string(dim);
    gradcheck("softmax dim " + d, [dim](auto& in) { return softmax(in[0], dim); }, {x});
    gradcheck("log_softmax dim " + d, [dim](auto& in) { return log_softmax(in[0], dim); }, {x});
  }
  gradcheck("softmax of a transposed view",
            [](auto& in) { return softmax(in[0].transpose(0, 2), 2); }, {x});
}

// ---------------------------------------------------------------- cross_entropy

double ce_oracle(const std::vector<double>& x, const std::vector<int64_t>& t, int64_t c) {
  double total = 0;
  int64_t n = static_cast<int64_t>(t.size());
  for (int64_t r = 0; r < n; ++r) {
    double s = 0;
    for (int64_t j = 0; j < c; ++j) s += std::exp(x[static_cast<size_t>(r * c + j)]);
    total += std::log(s) - x[static_cast<size_t>(r * c + t[static_cast<size_t>(r)])];
  }
  return total / static_cast<double>(n);
}

TEST(CrossEntropy, HandComputedValues) {
  // Row 0: log(e^1 + e^2 + e^3) - 3 = 0.40760596444; row 1: log(3) - 1 + 1 = 1.0986122887.
  Tensor logits = from_vector<float>({1, 2, 3, 1, 1, 1}, {2, 3});
  Tensor loss = cross_entropy(logits, targets({2, 0}));
  EXPECT_EQ(loss.dim(), 0);
  EXPECT_NEAR(loss.item(), (0.40760596444438 + 1.09861228866811) / 2.0, 1e-6);
  // Huge logits: log-sum-exp must not overflow. loss = log(1 + e^-1) for target 0.
  Tensor big = from_vector<float>({1e4f, 1e4f - 1.0f}, {1, 2});
  EXPECT_NEAR(cross_entropy(big, targets({0})).item(), std::log1p(std::exp(-1.0)), 1e-6);
}

TEST(CrossEntropy, RandomMatchesOracleAndGradientIsSoftmaxMinusOnehot) {
  Generator gen(15);
  const int64_t n = 13, c = 17;
  std::vector<int64_t> t(static_cast<size_t>(n));
  for (auto& v : t) v = static_cast<int64_t>(gen.below(c));
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor x = randn({n, c}, gen, dt, 3.0).set_requires_grad(true);
    std::vector<double> xv = x.to_vector<double>();
    Tensor loss = cross_entropy(x, targets(t));
    EXPECT_NEAR(loss.item(), ce_oracle(xv, t, c), dt == DType::f32 ? 1e-5 : 1e-13);
    mul_scalar(loss, 2.5).backward();
    std::vector<double> want = softmax_oracle(x.detach(), 1, false);
    for (int64_t r = 0; r < n; ++r)
      want[static_cast<size_t>(r * c + t[static_cast<size_t>(r)])] -= 1;
    for (double& w : want) w *= 2.5 / static_cast<double>(n);
    EXPECT_LE(max_rel_error(x.grad(), from_vector<double>(want, {n, c})),
              dt == DType::f32 ? 1e-6 : 1e-13);
  }
}

TEST(Gradcheck, CrossEntropy) {
  Generator gen(16);
  Tensor x = randn({5, 7}, gen, DType::f64, 2.0).set_requires_grad(true);
  Tensor t = targets({0, 6, 3, 3, 1});
  gradcheck("cross_entropy", [t](auto& in) { return cross_entropy(in[0], t); }, {x});
  gradcheck("cross_entropy through log_softmax composition",
            [t](auto& in) { return cross_entropy(log_softmax(in[0], 1), t); }, {x});
}

TEST(CrossEntropy, RejectsBadTargetsAndShapes) {
  Tensor x = zeros({4, 3});
  expect_error<InvalidArgument>(
      [&] {
        cross_entropy(x, targets({0, 1, 5, 2}));
      },
      {"target 5", "position 2", "3 classes"});
  expect_error<InvalidArgument>(
      [&] {
        cross_entropy(x, targets({-1, 0, 0, 0}));
      },
      {"target -1", "position 0"});
  expect_error<DTypeError>(
      [&] {
        cross_entropy(x, from_vector<int32_t>({0, 1, 2, 0}, {4}));
      },
      {"i64", "i32"});
  expect_error<ShapeError>([&] { cross_entropy(x, targets({0, 1, 2})); }, {"[4]", "[3]"});
  expect_error<ShapeError>([&] { cross_entropy(zeros({4}), targets({0})); }, {"[N,C]"});
  expect_error<ShapeError>(
      [&] {
        cross_entropy(zeros({0, 3}), from_vector<int64_t>({}, {0}));
      },
      {"empty batch"});
}

// ---------------------------------------------------------------- embedding

TEST(Embedding, GathersRowsForAnyIndexShape) {
  Tensor w = arange(12, TensorOptions{}.with_dtype(DType::f32)).reshape({4, 3});
  Tensor idx = from_vector<int64_t>({3, 0, 3, 1, 2, 2}, {2, 3});
  Tensor y = embedding(w, idx);
  EXPECT_EQ(y.shape(), (Shape{2, 3, 3}));
  EXPECT_EQ(y.to_vector<float>(),
            (std::vector<float>{9, 10, 11, 0, 1, 2, 9, 10, 11, 3, 4, 5, 6, 7, 8, 6, 7, 8}));
}

TEST(Embedding, BackwardScatterAddsRepeatedIndices) {
  Tensor w = zeros({5, 2}).set_requires_grad(true);
  Tensor idx = from_vector<int64_t>({1, 4, 1, 1}, {4});
  Tensor g = from_vector<float>({1, 2, 3, 4, 5, 6, 7, 8}, {4, 2});
  embedding(w, idx).backward(g);
  EXPECT_EQ(w.grad().to_vector<float>(), (std::vector<float>{0, 0, 13, 16, 0, 0, 0, 0, 3, 4}));
}

TEST(Gradcheck, Embedding) {
  Generator gen(17);
  Tensor w = randn({6, 5}, gen).set_requires_grad(true);
  Tensor idx = from_vector<int64_t>({5, 0, 2, 2, 5, 1, 5}, {7});
  gradcheck("embedding", [idx](auto& in) { return embedding(in[0], idx); }, {w});
  Tensor idx2 = idx.narrow(0, 0, 6).reshape({2, 3});
  gradcheck("embedding 2-D indices", [idx2](auto& in) { return embedding(in[0], idx2); }, {w});
}

TEST(Embedding, RejectsOutOfRangeIndicesAndWrongDtype) {
  Tensor w = zeros({10, 4});
  expect_error<InvalidArgument>(
      [&] {
        embedding(w, from_vector<int64_t>({3, 10, 2}, {3}));
      },
      {"index 10", "position 1", "10 rows"});
  expect_error<InvalidArgument>([&] { embedding(w, from_vector<int64_t>({-2}, {1})); },
                                {"index -2", "position 0"});
  expect_error<DTypeError>([&] { embedding(w, from_vector<int32_t>({1}, {1})); }, {"i64"});
  expect_error<ShapeError>([&] { embedding(zeros({10}), from_vector<int64_t>({1}, {1})); },
                           {"[V,D]"});
}

// ---------------------------------------------------------------- lstm

struct LstmCase {
  Tensor x;
  LstmWeights w;
  Tensor h0, c0;
  std::vector<Tensor> inputs() const { return {x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, h0, c0}; }
};

// PyTorch's initialisation scale (uniform in +-1/sqrt(H)), x ~ N(0,1), states ~ N(0,0.5^2).
LstmCase make_lstm(int64_t b, int64_t t, int64_t i, int64_t h, Generator& gen, DType dt,
                   bool biases = true, bool state = true) {
  double k = 1.0 / std::sqrt(static_cast<double>(h));
  LstmCase c;
  c.x = randn({b, t, i}, gen, dt).set_requires_grad(true);
  c.w.w_ih = testing::uniform({4 * h, i}, gen, -k, k, dt).set_requires_grad(true);
  c.w.w_hh = testing::uniform({4 * h, h}, gen, -k, k, dt).set_requires_grad(true);
  if (biases) {
    c.w.b_ih = testing::uniform({4 * h}, gen, -k, k, dt).set_requires_grad(true);
    c.w.b_hh = testing::uniform({4 * h}, gen, -k, k, dt).set_requires_grad(true);
  }
  if (state) {
    c.h0 = randn({b, h}, gen, dt, 0.5).set_requires_grad(true);
    c.c0 = randn({b, h}, gen, dt, 0.5).set_requires_grad(true);
  }
  return c;
}

LstmResult run_lstm(const std::vector<Tensor>& in) {
  return lstm(in[0], {in[1], in[2], in[3], in[4]}, in[5], in[6]);
}

TEST(Lstm, OneCellMatchesHandWrittenPyTorchEquations) {
  // B=T=I=H=1, so each gate has one weight: the order i, f, g, o is pinned.
  const double ai = 0.3, af = -0.7, ag = 1.1, ao = 0.4, x = 1.5, c0 = 0.25;
  Tensor w_ih = from_vector<double>({ai, af, ag, ao}, {4, 1});
  Tensor w_hh = zeros({4, 1}, TensorOptions{}.with_dtype(DType::f64));
  Tensor xt = from_vector<double>({x}, {1, 1, 1});
  Tensor c0t = from_vector<double>({c0}, {1, 1});
  auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  double c = sig(af * x) * c0 + sig(ai * x) * std::tanh(ag * x);
  double h = sig(ao * x) * std::tanh(c);
  for (DType dt : {DType::f64, DType::f32}) {
    LstmResult r =
        lstm(xt.to(dt), {w_ih.to(dt), w_hh.to(dt), Tensor(), Tensor()}, Tensor(), c0t.to(dt));
    double tol = dt == DType::f64 ? 1e-14 : 1e-6;
    EXPECT_NEAR(r.output.item(), h, tol);
    EXPECT_NEAR(r.h_n.item(), h, tol);
    EXPECT_NEAR(r.c_n.item(), c, tol);
  }
  LstmResult ref = cpu::lstm_reference_forward(xt, {w_ih, w_hh, Tensor(), Tensor()}, Tensor(), c0t);
  EXPECT_NEAR(ref.h_n.item(), h, 1e-15);
  EXPECT_NEAR(ref.c_n.item(), c, 1e-15);
}

TEST(Gradcheck, LstmEveryInputThroughEachOutput) {
  Generator gen(21);
  LstmCase c = make_lstm(3, 4, 3, 5, gen, DType::f64);
  gradcheck(
      "lstm through output", [](auto& in) { return run_lstm(in).output; }, c.inputs());
  gradcheck(
      "lstm through h_n", [](auto& in) { return run_lstm(in).h_n; }, c.inputs());
  gradcheck(
      "lstm through c_n", [](auto& in) { return run_lstm(in).c_n; }, c.inputs());
  gradcheck(
      "lstm through all three",
      [](auto& in) {
        LstmResult r = run_lstm(in);
        return add(sum(r.output, {1}), mul(r.h_n, r.c_n));
      },
      c.inputs());
}

TEST(Gradcheck, LstmWithoutBiasesOrInitialState) {
  Generator gen(22);
  LstmCase c = make_lstm(2, 3, 5, 3, gen, DType::f64, /*biases=*/false, /*state=*/false);
  gradcheck(
      "lstm no bias no state", [](auto& in) { return run_lstm(in).output; }, c.inputs());
  // Only part of the inputs require grad (frozen weights).
  LstmCase d = make_lstm(2, 3, 2, 3, gen, DType::f64);
  d.w.w_ih = d.w.w_ih.detach();
  d.w.b_hh = d.w.b_hh.detach();
  d.x = d.x.detach();
  gradcheck(
      "lstm partly frozen", [](auto& in) { return run_lstm(in).c_n; }, d.inputs());
}

// The fast kernel against the double reference; f32 must be within 1e-5.
void compare_with_reference(const LstmCase& c, bool through_output_only, double tol,
                            const std::string& what) {
  LstmResult fast = lstm(c.x, c.w, c.h0, c.c0);
  LstmResult ref = cpu::lstm_reference_forward(c.x, c.w, c.h0, c.c0);
  EXPECT_LE(max_rel_error(fast.output, ref.output), tol) << what << " output";
  EXPECT_LE(max_rel_error(fast.h_n, ref.h_n), tol) << what << " h_n";
  EXPECT_LE(max_rel_error(fast.c_n, ref.c_n), tol) << what << " c_n";

  Generator gen(99);
  DType dt = c.x.dtype();
  Tensor d_out = randn(fast.output.shape(), gen, dt);
  Tensor d_hn = through_output_only ? Tensor() : randn(fast.h_n.shape(), gen, dt);
  Tensor d_cn = through_output_only ? Tensor() : randn(fast.c_n.shape(), gen, dt);
  std::vector<Tensor> leaves;
  for (const Tensor& t : c.inputs()) {
    if (t.defined()) leaves.push_back(t);
  }
  std::vector<Tensor> got =
      through_output_only ? grad({fast.output}, leaves, {d_out})
                          : grad({fast.output, fast.h_n, fast.c_n}, leaves, {d_out, d_hn, d_cn});
  cpu::LstmReferenceGrads rg =
      cpu::lstm_reference_backward(c.x, c.w, c.h0, c.c0, d_out, d_hn, d_cn);
  std::vector<Tensor> want{rg.dx, rg.dw_ih, rg.dw_hh, rg.db_ih, rg.db_hh, rg.dh0, rg.dc0};
  const char* names[] = {"dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0", "dc0"};
  size_t k = 0;
  std::vector<Tensor> in = c.inputs();
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i].defined()) continue;
    EXPECT_LE(max_rel_error(got[k++], want[i]), tol) << what << " " << names[i];
  }
}

TEST(Lstm, FastMatchesReferenceOnRandomOddShapes) {
  Generator gen(23);
  for (int trial = 0; trial < 12; ++trial) {
    int64_t b = 1 + static_cast<int64_t>(gen.below(9));
    int64_t t = 1 + static_cast<int64_t>(gen.below(7));
    int64_t i = 1 + static_cast<int64_t>(gen.below(19));
    int64_t h = 1 + static_cast<int64_t>(gen.below(17));
    bool biases = trial % 3 != 1, state = trial % 4 != 2;
    LstmCase c = make_lstm(b, t, i, h, gen, DType::f32, biases, state);
    std::string what =
        fmt::format("B{} T{} I{} H{} bias {} state {} f32", b, t, i, h, biases, state);
    compare_with_reference(c, /*through_output_only=*/trial % 2 == 0, 1e-5, what);
  }
  LstmCase c = make_lstm(5, 4, 7, 9, gen, DType::f64);
  compare_with_reference(c, false, 1e-12, "f64");
  LstmCase no_input = make_lstm(3, 4, 0, 5, gen, DType::f32);  // I = 0: driven by h0 alone
  compare_with_reference(no_input, false, 1e-5, "I0");
}

TEST(Lstm, FastMatchesReferenceOnALargerShape) {
  Generator gen(24);
  LstmCase c = make_lstm(16, 12, 40, 37, gen, DType::f32);
  compare_with_reference(c, true, 1e-5, "B16 T12 I40 H37");
}

TEST(Lstm, SecondBackwardGivesTheSameGradients) {
  Generator gen(25);
  LstmCase c = make_lstm(3, 5, 4, 6, gen, DType::f32);
  LstmResult r = lstm(c.x, c.w, c.h0, c.c0);
  Tensor g = randn(r.output.shape(), gen);
  Tensor a = grad({r.output}, {c.w.w_hh}, {g})[0];
  Tensor b = grad({r.output}, {c.w.w_hh}, {g})[0];
  EXPECT_EQ(a.to_vector<float>(), b.to_vector<float>());
}

TEST(Lstm, RejectsBadShapesAndDtypes) {
  Generator gen(26);
  LstmCase c = make_lstm(2, 3, 4, 5, gen, DType::f32);
  expect_error<ShapeError>([&] { lstm(c.x.reshape({6, 4}), c.w); }, {"[B,T,I]", "[6,4]"});
  LstmWeights bad = c.w;
  bad.w_ih = zeros({20, 3});
  expect_error<ShapeError>([&] { lstm(c.x, bad); }, {"w_ih", "[20,4]", "[20,3]"});
  bad = c.w;
  bad.b_hh = zeros({19});
  expect_error<ShapeError>([&] { lstm(c.x, bad); }, {"b_hh", "[20]", "[19]"});
  expect_error<ShapeError>([&] { lstm(c.x, c.w, zeros({3, 5})); }, {"h0", "[2,5]", "[3,5]"});
  expect_error<DTypeError>([&] { lstm(c.x.to(DType::f64), c.w); }, {"f64", "f32"});
  expect_error<ShapeError>([&] { lstm(zeros({2, 0, 4}), c.w); }, {"T >= 1"});
}

// ---------------------------------------------------------------- dropout

TEST(Dropout, MaskStatisticsAndScale) {
  const int64_t n = 400000;
  for (double p : {0.1, 0.5, 0.8}) {
    Generator gen(31);
    Tensor y = dropout(ones({n}), p, /*training=*/true, gen);
    std::vector<float> v = y.to_vector<float>();
    const float scale = static_cast<float>(1.0 / (1.0 - p));
    int64_t zeros_seen = 0;
    for (float e : v) {
      if (e == 0.0f) {
        ++zeros_seen;
      } else {
        ASSERT_EQ(e, scale);
      }
    }
    double frac = static_cast<double>(zeros_seen) / static_cast<double>(n);
    double sigma = std::sqrt(p * (1 - p) / static_cast<double>(n));
    EXPECT_NEAR(frac, p, 5 * sigma) << "p " << p;
  }
}

TEST(Dropout, SameGeneratorStateGivesSameMask) {
  Generator gen(32);
  Tensor x = randn({64, 33}, gen);
  Generator a(7), b(7);
  EXPECT_EQ(dropout(x, 0.3, true, a).to_vector<float>(),
            dropout(x, 0.3, true, b).to_vector<float>());
  Generator::State st = a.get_state();
  Tensor first = dropout(x, 0.3, true, a);
  a.set_state(st);
  EXPECT_EQ(dropout(x, 0.3, true, a).to_vector<float>(), first.to_vector<float>());
  EXPECT_NE(dropout(x, 0.3, true, a).to_vector<float>(), first.to_vector<float>());
}

TEST(Dropout, GradientIsMaskTimesScale) {
  Generator gen(33);
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor x = randn({17, 29}, gen, dt).set_requires_grad(true);
    Tensor w = randn({17, 29}, gen, dt);
    Generator g(5);
    Tensor y = dropout(x, 0.35, true, g);
    sum(mul(y, w)).backward();
    std::vector<double> xv = x.to_vector<double>(), yv = y.to_vector<double>(),
                        wv = w.to_vector<double>(), gv = x.grad().to_vector<double>();
    const double scale = 1.0 / (1.0 - 0.35);
    for (size_t i = 0; i < xv.size(); ++i) {
      double mask = yv[i] == 0.0 ? 0.0 : scale;
      if (yv[i] != 0.0) {
        ASSERT_NEAR(yv[i], xv[i] * scale, 1e-6 * std::abs(xv[i] * scale));
      }
      ASSERT_NEAR(gv[i], wv[i] * mask, 1e-6 * std::abs(wv[i] * scale)) << i;
    }
  }
  Tensor x = randn({4, 6}, gen).set_requires_grad(true);
  gradcheck("dropout (fixed generator per call)",
            [](auto& in) {
              Generator g(9);
              return dropout(in[0], 0.4, true, g);
            },
            {x});
}

TEST(Dropout, IdentityInEvalOrAtZeroAndRejectsBadP) {
  Generator gen(34);
  Tensor x = randn({5, 5}, gen);
  Generator::State st = gen.get_state();
  EXPECT_TRUE(dropout(x, 0.5, /*training=*/false, gen).is_same(x));
  EXPECT_TRUE(dropout(x, 0.0, /*training=*/true, gen).is_same(x));
  EXPECT_EQ(gen.get_state().state, st.state);  // no draws
  for (double p : {1.0, -0.1, 1.5}) {
    expect_error<InvalidArgument>([&] { dropout(x, p, true, gen); }, {"dropout", "[0,1)"});
  }
  expect_error<InvalidArgument>([&] { dropout(x, 1.0, false, gen); }, {"dropout"});
}

}  // namespace
}  // namespace dtrain
