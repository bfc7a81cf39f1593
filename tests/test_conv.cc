// conv2d and max_pool2d: hand-computed values, float64 gradient checks (the
// reference kernels and the default f64 path against calculus), every fast kernel
// against the reference kernels on random odd shapes (forward and both backward
// passes), and the error messages for bad arguments.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <string>

#include "cpu/conv.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "gradcheck.h"
#include "ops_conv.h"

namespace dtrain {
namespace {

using testing::gradcheck;
using testing::max_rel_error;
using testing::randn;

// ---- hand-computed values (a flipped kernel would pass every other test) ----

TEST(Conv2d, MatchesHandComputedCrossCorrelation) {
  for (ConvAlgo algo : {ConvAlgo::kReference, ConvAlgo::kIm2col, ConvAlgo::kOneDnnPlain,
                        ConvAlgo::kOneDnnBlocked, ConvAlgo::kAuto}) {
    SCOPED_TRACE(conv_algo_name(algo));
    Tensor x = arange(16, TensorOptions{}.with_dtype(DType::f32)).reshape({1, 1, 4, 4});
    Tensor w = from_vector<float>({1, 2, 3, 4}, {1, 1, 2, 2});
    Tensor b = from_vector<float>({0.5f}, {1});
    // y[0,0] = 0*1 + 1*2 + 4*3 + 5*4 + 0.5; stride 2 keeps the four corners' windows.
    Tensor y = conv2d(x, w, b, {.stride = 2, .padding = 0}, algo);
    EXPECT_EQ(y.shape(), (Shape{1, 1, 2, 2}));
    EXPECT_EQ(y.to_vector<float>(), (std::vector<float>{34.5f, 54.5f, 114.5f, 134.5f}));
    // padding 1: the top-left output sees only x[0,0] through w[1,1], the next one
    // x[0,0] and x[0,1] through w[1,0] and w[1,1].
    Tensor yp = conv2d(x, w, Tensor(), {.stride = 1, .padding = 1}, algo);
    EXPECT_EQ(yp.shape(), (Shape{1, 1, 5, 5}));
    EXPECT_EQ(yp.to_vector<float>()[0], 0.0f);
    EXPECT_EQ(yp.to_vector<float>()[1], 0.0f * 3 + 1.0f * 4);
  }
}

TEST(MaxPool2d, MatchesHandComputedValuesAndRoutesGradient) {
  for (PoolAlgo algo : {PoolAlgo::kDirect, PoolAlgo::kOneDnn, PoolAlgo::kAuto}) {
    SCOPED_TRACE(pool_algo_name(algo));
    Tensor x = from_vector<float>({1, 5, 2, 0,  //
                                   3, 4, 8, 7,  //
                                   9, 0, 1, 1,  //
                                   2, 6, 3, 2},
                                  {1, 1, 4, 4});
    x.set_requires_grad(true);
    Tensor y = max_pool2d(x, {.kernel = 2}, algo);
    EXPECT_EQ(y.to_vector<float>(), (std::vector<float>{5, 8, 9, 3}));
    y.backward(from_vector<float>({1, 2, 3, 4}, {1, 1, 2, 2}));
    EXPECT_EQ(x.grad().to_vector<float>(),
              (std::vector<float>{0, 1, 0, 0, 0, 0, 2, 0, 3, 0, 0, 0, 0, 0, 4, 0}));
    // padding 1 with kernel 3, stride 2: windows clipped at the border.
    Tensor yp = max_pool2d(x.detach(), {.kernel = 3, .stride = 2, .padding = 1}, algo);
    EXPECT_EQ(yp.to_vector<float>(), (std::vector<float>{5, 8, 9, 8}));
  }
}

// ---- gradient checks in float64 ----

struct ConvCase {
  Shape x, w;
  bool bias;
  int64_t stride, padding;
};

const ConvCase kConvCases[] = {
    {{2, 3, 7, 6}, {4, 3, 3, 3}, true, 1, 0},   // multiple channels, batch 2, odd sizes
    {{2, 3, 7, 6}, {4, 3, 3, 2}, false, 1, 1},  // non-square kernel, padding, no bias
    {{3, 2, 7, 7}, {3, 2, 3, 3}, true, 2, 0},   // stride 2
    {{1, 2, 6, 5}, {2, 2, 3, 3}, true, 2, 1},   // stride 2 and padding
    {{2, 1, 5, 5}, {3, 1, 1, 1}, true, 1, 0},   // 1x1 kernel
    {{2, 2, 3, 4}, {2, 2, 3, 3}, true, 3, 1},   // stride larger than the kernel overlap
};

std::string describe(const ConvCase& c) {
  return fmt::format("x {} w {} bias {} stride {} pad {}", shape_str(c.x), shape_str(c.w), c.bias,
                     c.stride, c.padding);
}

void gradcheck_conv(ConvAlgo algo, const ConvCase& c, Generator& gen) {
  Tensor x = randn(c.x, gen).set_requires_grad(true);
  Tensor w = randn(c.w, gen).set_requires_grad(true);
  Tensor b = randn({c.w[0]}, gen).set_requires_grad(true);
  Conv2dOptions opt{.stride = c.stride, .padding = c.padding};
  std::string name = std::string("conv2d ") + conv_algo_name(algo) + " " + describe(c);
  if (c.bias) {
    gradcheck(name, [&](auto& in) { return conv2d(in[0], in[1], in[2], opt, algo); }, {x, w, b});
  } else {
    gradcheck(name, [&](auto& in) { return conv2d(in[0], in[1], Tensor(), opt, algo); }, {x, w});
  }
}

TEST(Gradcheck, Conv2dDefaultF64Path) {
  Generator gen(11);
  for (const ConvCase& c : kConvCases) gradcheck_conv(ConvAlgo::kAuto, c, gen);
}

TEST(Gradcheck, Conv2dReferenceKernels) {
  Generator gen(12);
  for (const ConvCase& c : kConvCases) gradcheck_conv(ConvAlgo::kReference, c, gen);
}

// Distinct values at least 0.01 apart in random order: no ties, and a finite
// difference step cannot change which element wins a window.
Tensor tie_free(const Shape& shape, Generator& gen) {
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  std::iota(v.begin(), v.end(), 0.0);
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[gen.below(i)]);
  for (double& e : v) e = e * 0.01 - 1.0;
  return from_vector<double>(v, shape);
}

TEST(Gradcheck, MaxPool2d) {
  Generator gen(13);
  struct Case {
    Shape x;
    MaxPool2dOptions opt;
  };
  const Case cases[] = {
      {{2, 3, 6, 6}, {.kernel = 2}},
      {{2, 2, 7, 5}, {.kernel = 2}},  // odd sizes drop the last row/column
      {{2, 2, 7, 7}, {.kernel = 3, .stride = 2}},
      {{1, 3, 6, 5}, {.kernel = 3, .stride = 2, .padding = 1}},
      {{1, 2, 5, 5}, {.kernel = 2, .stride = 1, .padding = 1}},
  };
  for (const Case& c : cases) {
    Tensor x = tie_free(c.x, gen).set_requires_grad(true);
    std::string name = "max_pool2d x " + shape_str(c.x) + " k" + std::to_string(c.opt.kernel);
    gradcheck(name, [&](auto& in) { return max_pool2d(in[0], c.opt); }, {x});
    gradcheck(name + " direct",
              [&](auto& in) { return max_pool2d(in[0], c.opt, PoolAlgo::kDirect); }, {x});
  }
}

// ---- fast kernels against the reference on random shapes ----

struct ConvResult {
  Tensor y, dx, dw, db;
};

// Forward and both backward passes through the op (autograd included) with `algo`.
ConvResult run_conv(ConvAlgo algo, const Tensor& x, const Tensor& w, const Tensor& b,
                    const Tensor& dy, Conv2dOptions opt) {
  Tensor xr = x.clone().set_requires_grad(true), wr = w.clone().set_requires_grad(true);
  Tensor br = b.clone().set_requires_grad(true);
  Tensor y = conv2d(xr, wr, br, opt, algo);
  std::vector<Tensor> g = grad({y}, {xr, wr, br}, {dy});
  return {y.detach(), g[0], g[1], g[2]};
}

ConvCase random_conv_case(Generator& gen) {
  int64_t k = 1 + static_cast<int64_t>(gen.below(4));
  int64_t kw = gen.below(4) == 0 ? 1 + static_cast<int64_t>(gen.below(4)) : k;
  int64_t pad = static_cast<int64_t>(gen.below(std::min<uint64_t>(k, 3)));
  int64_t stride = 1 + static_cast<int64_t>(gen.below(3));
  int64_t h = std::max(k, kw) + static_cast<int64_t>(gen.below(12));
  int64_t w = std::max(k, kw) + static_cast<int64_t>(gen.below(12));
  int64_t n = 1 + static_cast<int64_t>(gen.below(5));
  int64_t c = 1 + static_cast<int64_t>(gen.below(19));
  int64_t o = 1 + static_cast<int64_t>(gen.below(21));
  return {{n, c, h, w}, {o, c, k, kw}, true, stride, pad};
}

void expect_conv_close(const ConvResult& got, const ConvResult& ref, double tol,
                       const std::string& what) {
  EXPECT_LE(max_rel_error(got.y, ref.y), tol) << what << " forward";
  EXPECT_LE(max_rel_error(got.dx, ref.dx), tol) << what << " backward data";
  EXPECT_LE(max_rel_error(got.dw, ref.dw), tol) << what << " backward weights";
  EXPECT_LE(max_rel_error(got.db, ref.db), tol) << what << " backward bias";
}

TEST(ConvKernels, FastKernelsMatchReferenceOnRandomShapes) {
  Generator gen(21);
  for (int trial = 0; trial < 40; ++trial) {
    ConvCase c = random_conv_case(gen);
    Conv2dOptions opt{.stride = c.stride, .padding = c.padding};
    Tensor x = randn(c.x, gen), w = randn(c.w, gen, DType::f32, 0.3), b = randn({c.w[0]}, gen);
    Tensor y64 =
        conv2d(x.to(DType::f64), w.to(DType::f64), b.to(DType::f64), opt, ConvAlgo::kReference);
    Tensor dy = randn(y64.shape(), gen);
    ConvResult ref = run_conv(ConvAlgo::kReference, x.to(DType::f64), w.to(DType::f64),
                              b.to(DType::f64), dy.to(DType::f64), opt);
    for (ConvAlgo algo :
         {ConvAlgo::kIm2col, ConvAlgo::kOneDnnPlain, ConvAlgo::kOneDnnBlocked, ConvAlgo::kAuto}) {
      expect_conv_close(run_conv(algo, x, w, b, dy, opt), ref, 1e-5,
                        std::string(conv_algo_name(algo)) + " f32 " + describe(c));
    }
    expect_conv_close(run_conv(ConvAlgo::kIm2col, x.to(DType::f64), w.to(DType::f64),
                               b.to(DType::f64), dy.to(DType::f64), opt),
                      ref, 1e-12, "im2col f64 " + describe(c));
  }
}

// The im2col grouping (several images per GEMM), including a last partial group.
TEST(ConvKernels, Im2colGroupingMatchesReference) {
  Generator gen(22);
  cpu::ConvGeom g = cpu::make_conv_geom(5, 3, 6, 5, 4, 3, 3, 1, 1);
  std::vector<double> x(5 * 3 * 6 * 5), w(4 * 3 * 9), b(4), dy(5 * 4 * g.pixels());
  for (auto* v : {&x, &w, &b, &dy}) {
    for (double& e : *v) e = gen.normal();
  }
  std::vector<double> y_ref(dy.size()), dx_ref(x.size()), dw_ref(w.size()), db_ref(b.size());
  cpu::conv2d_forward_ref(g, x.data(), w.data(), b.data(), y_ref.data());
  cpu::conv2d_backward_data_ref(g, dy.data(), w.data(), dx_ref.data());
  cpu::conv2d_backward_weights_ref(g, x.data(), dy.data(), dw_ref.data(), db_ref.data());
  auto close = [](const std::vector<double>& a, const std::vector<double>& r) {
    double err = 0;
    for (size_t i = 0; i < a.size(); ++i) err = std::max(err, std::abs(a[i] - r[i]));
    return err;
  };
  for (int64_t min_cols : {int64_t{1}, g.pixels() * 2, g.pixels() * 3, int64_t{1} << 30}) {
    std::vector<double> y(dy.size()), dx(x.size()), dw(w.size()), db(b.size());
    cpu::conv2d_forward_im2col(g, x.data(), w.data(), b.data(), y.data(), min_cols);
    cpu::conv2d_backward_data_im2col(g, dy.data(), w.data(), dx.data(), min_cols);
    cpu::conv2d_backward_weights_im2col(g, x.data(), dy.data(), dw.data(), db.data(), min_cols);
    EXPECT_LE(close(y, y_ref), 1e-12) << "min_cols " << min_cols;
    EXPECT_LE(close(dx, dx_ref), 1e-12) << "min_cols " << min_cols;
    EXPECT_LE(close(dw, dw_ref), 1e-12) << "min_cols " << min_cols;
    EXPECT_LE(close(db, db_ref), 1e-12) << "min_cols " << min_cols;
  }
}

// The demo CNN's layers at a small batch: exactly the shapes the benchmark times.
TEST(ConvKernels, DemoModelLayersMatchReference) {
  Generator gen(23);
  const ConvCase layers[] = {{{4, 1, 28, 28}, {32, 1, 3, 3}, true, 1, 0},
                             {{4, 32, 13, 13}, {64, 32, 3, 3}, true, 1, 0},
                             {{4, 64, 5, 5}, {64, 64, 3, 3}, true, 1, 0}};
  for (const ConvCase& c : layers) {
    Conv2dOptions opt{.stride = c.stride, .padding = c.padding};
    Tensor x = randn(c.x, gen), w = randn(c.w, gen, DType::f32, 0.1), b = randn({c.w[0]}, gen);
    Tensor y = conv2d(x, w, b, opt);
    Tensor dy = randn(y.shape(), gen);
    ConvResult ref = run_conv(ConvAlgo::kReference, x.to(DType::f64), w.to(DType::f64),
                              b.to(DType::f64), dy.to(DType::f64), opt);
    for (ConvAlgo algo : {ConvAlgo::kIm2col, ConvAlgo::kOneDnnPlain, ConvAlgo::kOneDnnBlocked}) {
      expect_conv_close(run_conv(algo, x, w, b, dy, opt), ref, 1e-5,
                        std::string(conv_algo_name(algo)) + " " + describe(c));
    }
  }
}

TEST(PoolKernels, OneDnnMatchesReferenceOnRandomShapes) {
  Generator gen(24);
  for (int trial = 0; trial < 40; ++trial) {
    int64_t k = 1 + static_cast<int64_t>(gen.below(4));
    int64_t pad = static_cast<int64_t>(gen.below(static_cast<uint64_t>(k / 2 + 1)));
    int64_t stride = 1 + static_cast<int64_t>(gen.below(3));
    Shape xs{1 + static_cast<int64_t>(gen.below(4)), 1 + static_cast<int64_t>(gen.below(9)),
             k + static_cast<int64_t>(gen.below(14)), k + static_cast<int64_t>(gen.below(14))};
    MaxPool2dOptions opt{.kernel = k, .stride = stride, .padding = pad};
    std::string what = "x " + shape_str(xs) + " k" + std::to_string(k) + " s" +
                       std::to_string(stride) + " p" + std::to_string(pad);
    Tensor x = randn(xs, gen);
    Tensor x64 = x.to(DType::f64).set_requires_grad(true);
    Tensor y64 = max_pool2d(x64, opt, PoolAlgo::kDirect);
    Tensor dy = randn(y64.shape(), gen);
    Tensor dx64 = grad({y64}, {x64}, {dy.to(DType::f64)})[0];
    for (PoolAlgo algo : {PoolAlgo::kOneDnn, PoolAlgo::kDirect, PoolAlgo::kAuto}) {
      Tensor xf = x.clone().set_requires_grad(true);
      Tensor y = max_pool2d(xf, opt, algo);
      Tensor dx = grad({y}, {xf}, {dy})[0];
      EXPECT_EQ(max_rel_error(y, y64), 0.0) << pool_algo_name(algo) << " forward " << what;
      EXPECT_LE(max_rel_error(dx, dx64), 1e-6) << pool_algo_name(algo) << " backward " << what;
    }
  }
}

// ---- autograd plumbing ----

TEST(Conv2d, ComputesOnlyTheGradientsThatAreNeeded) {
  Generator gen(31);
  Tensor x = randn({2, 3, 6, 6}, gen);  // the first layer's input: no gradient
  Tensor w = randn({4, 3, 3, 3}, gen).set_requires_grad(true);
  Tensor b = randn({4}, gen).set_requires_grad(true);
  sum(conv2d(x, w, b)).backward();
  EXPECT_FALSE(x.grad().defined());
  EXPECT_TRUE(w.grad().defined());
  // With d(sum)/dy = 1, the bias gradient counts the output pixels per channel.
  EXPECT_EQ(b.grad().to_vector<float>(), std::vector<float>(4, 2 * 4 * 4));
  // Frozen weight, trainable bias and input.
  Tensor w2 = randn({4, 3, 3, 3}, gen);
  Tensor x2 = randn({2, 3, 6, 6}, gen).set_requires_grad(true);
  Tensor b2 = randn({4}, gen).set_requires_grad(true);
  sum(conv2d(x2, w2, b2)).backward();
  EXPECT_FALSE(w2.grad().defined());
  EXPECT_EQ(x2.grad().shape(), x2.shape());
  EXPECT_EQ(b2.grad().to_vector<float>(), std::vector<float>(4, 2 * 4 * 4));
}

TEST(Conv2d, NonContiguousInputAndEmptyBatch) {
  Generator gen(32);
  Tensor base = randn({2, 3, 7, 6}, gen);
  Tensor xt = base.transpose(2, 3);  // [2,3,6,7], not contiguous
  Tensor w = randn({2, 3, 3, 3}, gen);
  Tensor y = conv2d(xt, w, Tensor());
  Tensor y_ref = conv2d(xt.contiguous(), w, Tensor(), {}, ConvAlgo::kReference);
  EXPECT_LE(max_rel_error(y, y_ref), 1e-5);

  Tensor empty_x = zeros({0, 3, 7, 7});
  Tensor wg = w.clone().set_requires_grad(true);
  Tensor ye = conv2d(empty_x, wg, Tensor());
  EXPECT_EQ(ye.shape(), (Shape{0, 2, 5, 5}));
  sum(ye).backward();
  EXPECT_EQ(wg.grad().to_vector<float>(), std::vector<float>(wg.numel(), 0.0f));
  Tensor pe = max_pool2d(zeros({0, 3, 4, 4}), {.kernel = 2});
  EXPECT_EQ(pe.shape(), (Shape{0, 3, 2, 2}));
}

// ---- error messages ----

template <typename E, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.message();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

void expect_contains(const std::string& message, const std::string& part) {
  EXPECT_NE(message.find(part), std::string::npos) << "'" << message << "' lacks '" << part << "'";
}

TEST(Conv2d, ErrorMessagesNameTheOpAndShapes) {
  expect_contains(error_of<ShapeError>([] {
                    conv2d(zeros({64, 3, 28, 28}), zeros({32, 1, 3, 3}), Tensor());
                  }),
                  "conv2d: input [64,3,28,28] has 3 channels but weight [32,1,3,3] expects 1");
  expect_contains(error_of<ShapeError>([] {
                    conv2d(zeros({1, 1, 3, 3}), zeros({2, 1, 5, 5}), Tensor());
                  }),
                  "conv2d: kernel 5x5 of weight [2,1,5,5] is larger than the padded input 3x3");
  expect_contains(error_of<ShapeError>([] {
                    conv2d(zeros({28, 28}), zeros({2, 1, 3, 3}), Tensor());
                  }),
                  "conv2d: expected input [N,C,H,W], got [28,28]");
  expect_contains(error_of<ShapeError>([] {
                    conv2d(zeros({1, 1, 8, 8}), zeros({2, 9}), Tensor());
                  }),
                  "conv2d: expected weight [O,C,kh,kw], got [2,9]");
  expect_contains(error_of<ShapeError>([] {
                    conv2d(zeros({1, 1, 8, 8}), zeros({2, 1, 3, 3}), zeros({3}));
                  }),
                  "conv2d: bias [3] does not match weight [2,1,3,3]");
  expect_contains(error_of<InvalidArgument>([] {
                    conv2d(zeros({1, 1, 8, 8}), zeros({2, 1, 3, 3}), Tensor(), {.stride = 0});
                  }),
                  "conv2d: stride must be >= 1, got 0");
  expect_contains(error_of<DTypeError>([] {
                    conv2d(zeros({1, 1, 8, 8}),
                           zeros({2, 1, 3, 3}, TensorOptions{}.with_dtype(DType::f64)), Tensor());
                  }),
                  "conv2d: input is f32 but weight is f64");
  expect_contains(error_of<DTypeError>([] {
                    auto f64 = TensorOptions{}.with_dtype(DType::f64);
                    conv2d(zeros({1, 1, 8, 8}, f64), zeros({2, 1, 3, 3}, f64), Tensor(), {},
                           ConvAlgo::kOneDnnBlocked);
                  }),
                  "f32 only, got f64");
}

TEST(MaxPool2d, ErrorMessagesNameTheOpAndShapes) {
  expect_contains(error_of<ShapeError>([] {
                    max_pool2d(zeros({1, 1, 2, 2}), {.kernel = 3});
                  }),
                  "max_pool2d: kernel 3 is larger than the padded input 2x2 (input [1,1,2,2]");
  expect_contains(error_of<InvalidArgument>([] {
                    max_pool2d(zeros({1, 1, 8, 8}), {.kernel = 3, .padding = 2});
                  }),
                  "max_pool2d: padding 2 must be between 0 and half the kernel 3");
  expect_contains(error_of<ShapeError>([] {
                    max_pool2d(zeros({8, 8}), {});
                  }),
                  "max_pool2d: expected input [N,C,H,W], got [8,8]");
  expect_contains(error_of<DTypeError>([] {
                    max_pool2d(zeros({1, 1, 4, 4}, TensorOptions{}.with_dtype(DType::i64)), {});
                  }),
                  "max_pool2d: unsupported dtype i64");
}

}  // namespace
}  // namespace dtrain
