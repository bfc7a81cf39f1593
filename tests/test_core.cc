// Tensor, allocator, autograd engine, elementwise/reduction/linear-algebra ops.
#include <gtest/gtest.h>

#include "cpu/blas.h"
#include "dtrain/engine/allocator.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "gradcheck.h"

namespace dtrain {
namespace {

using testing::gradcheck;
using testing::max_rel_error;
using testing::randn;

TEST(Tensor, ShapeStridesAndViews) {
  Tensor t = arange(24, TensorOptions{}.with_dtype(DType::f32)).reshape({2, 3, 4});
  EXPECT_EQ(t.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(t.strides(), (Shape{12, 4, 1}));
  EXPECT_TRUE(t.is_contiguous());
  Tensor tr = t.transpose(1, 2);
  EXPECT_FALSE(tr.is_contiguous());
  EXPECT_EQ(tr.shape(), (Shape{2, 4, 3}));
  // element [1, 2, 0] of the transpose is t[1, 0, 2] = 12 + 2
  EXPECT_EQ(tr.contiguous().to_vector<float>()[12 + 2 * 3 + 0], 14.0f);
  Tensor n = t.narrow(2, 1, 2);
  EXPECT_EQ(n.to_vector<float>(), (std::vector<float>{1, 2, 5, 6, 9, 10, 13, 14, 17, 18, 21, 22}));
  EXPECT_EQ(t.select(0, 1).select(0, 2).to_vector<float>(), (std::vector<float>{20, 21, 22, 23}));
  EXPECT_THROW(t.reshape({5, 5}), ShapeError);
  EXPECT_EQ(t.reshape({-1, 6}).shape(), (Shape{4, 6}));
  EXPECT_EQ(t.flatten().shape(), (Shape{2, 12}));
  EXPECT_THROW(t.data<double>(), DTypeError);
}

TEST(Tensor, DtypeConversionsRoundTrip) {
  Tensor t = from_vector<float>({1.5f, -2.25f, 1e-3f, 65504.0f}, {4});
  EXPECT_EQ(t.to(DType::f16).to(DType::f32).to_vector<float>(), t.to_vector<float>() == std::vector<float>{} ? std::vector<float>{} : std::vector<float>({1.5f, -2.25f, static_cast<float>(Half(1e-3f)), 65504.0f}));
  EXPECT_EQ(static_cast<float>(BFloat16(1.5f)), 1.5f);
  EXPECT_EQ(static_cast<float>(Half(1.0f / 3.0f)), 0.333251953125f);
  EXPECT_EQ(t.to(DType::i64).to_vector<int64_t>(), (std::vector<int64_t>{1, -2, 0, 65504}));
}

TEST(Allocator, ReusesFreedBlocks) {
  CachingHostAllocator alloc;
  void* a = alloc.allocate(1000);
  alloc.deallocate(a, 1000);
  void* b = alloc.allocate(990);  // same size class
  EXPECT_EQ(a, b);
  alloc.deallocate(b, 990);
  AllocatorStats s = alloc.stats();
  EXPECT_EQ(s.allocations, 2u);
  EXPECT_EQ(s.cache_hits, 1u);
  EXPECT_EQ(s.system_allocs, 1u);
  EXPECT_EQ(s.bytes_in_use, 0u);
  for (size_t n : {1, 63, 64, 65, 100, 1000, 4097, 1 << 20, (1 << 20) + 1}) {
    size_t c = CachingHostAllocator::size_class(n);
    EXPECT_GE(c, n);
    EXPECT_EQ(c % 64, 0u);
    EXPECT_LE(c, n * 2 + 64);
  }
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
}

TEST(Autograd, SharedSubexpressionAccumulates) {
  Tensor x = from_vector<float>({2.0f, 3.0f}, {2});
  x.set_requires_grad(true);
  Tensor y = mul(x, x);          // x^2
  Tensor z = sum(add(y, x));     // sum(x^2 + x)
  z.backward();
  EXPECT_EQ(x.grad().to_vector<float>(), (std::vector<float>{5.0f, 7.0f}));
  // A second backward accumulates.
  sum(mul_scalar(x, 3.0)).backward();
  EXPECT_EQ(x.grad().to_vector<float>(), (std::vector<float>{8.0f, 10.0f}));
}

TEST(Autograd, FrozenLeafGetsNoGradient) {
  Tensor w = from_vector<float>({1.0f, 2.0f}, {2});
  Tensor b = from_vector<float>({0.5f, 0.5f}, {2});
  w.set_requires_grad(true);
  sum(mul(w, b)).backward();
  EXPECT_TRUE(w.grad().defined());
  EXPECT_FALSE(b.grad().defined());
}

TEST(Autograd, NoGradGuardRecordsNothing) {
  Tensor w = from_vector<float>({1.0f}, {1});
  w.set_requires_grad(true);
  NoGradGuard ng;
  Tensor y = mul(w, w);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(y.grad_fn(), nullptr);
}

TEST(Autograd, CustomFunctionLambda) {
  // y = x forward, backward multiplies by 10: a stand-in for a collective in backward.
  Tensor x = from_vector<float>({1.0f, 2.0f, 3.0f}, {3});
  x.set_requires_grad(true);
  Tensor y = make_function("times_ten_backward", {x}, {x.detach()},
                           [](const std::vector<Tensor>& g) {
                             return std::vector<Tensor>{mul_scalar(g[0], 10.0)};
                           })[0];
  EXPECT_EQ(y.grad_fn()->name(), "times_ten_backward");
  sum(mul(y, y)).backward();
  EXPECT_EQ(x.grad().to_vector<float>(), (std::vector<float>{20.0f, 40.0f, 60.0f}));
}

TEST(Autograd, CustomFunctionWrongGradientShapeIsNamed) {
  Tensor x = zeros({3});
  x.set_requires_grad(true);
  Tensor y = make_function("bad_fn", {x}, {x.detach()}, [](const std::vector<Tensor>&) {
    return std::vector<Tensor>{zeros({4})};
  })[0];
  try {
    sum(y).backward();
    FAIL() << "expected a ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("bad_fn"), std::string::npos) << e.what();
  }
}

TEST(Ops, BroadcastErrorsNameBothShapes) {
  try {
    add(zeros({2, 3}), zeros({4}));
    FAIL();
  } catch (const ShapeError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("[2,3]"), std::string::npos);
    EXPECT_NE(m.find("[4]"), std::string::npos);
  }
}

TEST(Gradcheck, ElementwiseWithBroadcasting) {
  Generator gen(1);
  Tensor a = randn({3, 1, 5}, gen).set_requires_grad(true);
  Tensor b = randn({4, 1}, gen).set_requires_grad(true);
  Tensor pos = testing::uniform({4, 1}, gen, 0.5, 2.0).set_requires_grad(true);
  gradcheck("add", [](auto& in) { return add(in[0], in[1]); }, {a, b});
  gradcheck("sub", [](auto& in) { return sub(in[0], in[1]); }, {a, b});
  gradcheck("mul", [](auto& in) { return mul(in[0], in[1]); }, {a, b});
  gradcheck("div", [](auto& in) { return div(in[0], in[1]); }, {a, pos});
  gradcheck("scalar", [](auto& in) { return add_scalar(mul_scalar(in[0], 3.0), 1.0); }, {a});
}

TEST(Gradcheck, Activations) {
  Generator gen(2);
  Tensor x = randn({4, 7}, gen).set_requires_grad(true);
  // keep relu inputs away from the kink at 0, where the derivative is undefined
  Tensor xr = testing::uniform({4, 7}, gen, 0.1, 2.0);
  double* p = nullptr;
  Tensor xr64 = xr.to(DType::f64);
  p = xr64.data<double>();
  for (int64_t i = 0; i < xr64.numel(); i += 2) p[i] = -p[i];
  xr64.set_requires_grad(true);
  gradcheck("relu", [](auto& in) { return relu(in[0]); }, {xr64});
  gradcheck("tanh", [](auto& in) { return tanh(in[0]); }, {x});
  gradcheck("sigmoid", [](auto& in) { return sigmoid(in[0]); }, {x});
  gradcheck("exp", [](auto& in) { return exp(in[0]); }, {x});
  Tensor pos = testing::uniform({5}, gen, 0.5, 3.0).set_requires_grad(true);
  gradcheck("log", [](auto& in) { return log(in[0]); }, {pos});
}

TEST(Gradcheck, Reductions) {
  Generator gen(3);
  Tensor x = randn({3, 4, 5}, gen).set_requires_grad(true);
  gradcheck("sum all", [](auto& in) { return sum(in[0]); }, {x});
  gradcheck("sum dim1", [](auto& in) { return sum(in[0], {1}); }, {x});
  gradcheck("sum dims keepdim", [](auto& in) { return sum(in[0], {0, 2}, true); }, {x});
  gradcheck("mean all", [](auto& in) { return mean(in[0]); }, {x});
  gradcheck("mean dim -1", [](auto& in) { return mean(in[0], {-1}); }, {x});
}

TEST(Gradcheck, ShapeOps) {
  Generator gen(4);
  Tensor x = randn({2, 3, 4}, gen).set_requires_grad(true);
  gradcheck("reshape", [](auto& in) { return in[0].reshape({4, 6}); }, {x});
  gradcheck("flatten", [](auto& in) { return in[0].flatten(); }, {x});
  gradcheck("transpose", [](auto& in) { return in[0].transpose(0, 2).contiguous(); }, {x});
  gradcheck("narrow", [](auto& in) { return in[0].narrow(1, 1, 2); }, {x});
  gradcheck("select", [](auto& in) { return in[0].select(2, 3); }, {x});
}

TEST(Gradcheck, MatmulAndLinear) {
  Generator gen(5);
  Tensor a = randn({3, 5}, gen).set_requires_grad(true);
  Tensor b = randn({5, 4}, gen).set_requires_grad(true);
  gradcheck("matmul", [](auto& in) { return matmul(in[0], in[1]); }, {a, b});
  gradcheck("matmul transposed views",
            [](auto& in) { return matmul(in[1].t(), in[0].t()); }, {a, b});
  Tensor ba = randn({2, 3, 5}, gen).set_requires_grad(true);
  Tensor bb = randn({2, 5, 2}, gen).set_requires_grad(true);
  gradcheck("batched matmul", [](auto& in) { return matmul(in[0], in[1]); }, {ba, bb});
  Tensor x = randn({2, 3, 7}, gen).set_requires_grad(true);
  Tensor w = randn({4, 7}, gen).set_requires_grad(true);
  Tensor bias = randn({4}, gen).set_requires_grad(true);
  gradcheck("linear", [](auto& in) { return linear(in[0], in[1], in[2]); }, {x, w, bias});
  gradcheck("linear no bias", [](auto& in) { return linear(in[0], in[1], Tensor()); }, {x, w});
}

TEST(Kernels, BlasGemmMatchesReferenceOnOddShapes) {
  Generator gen(6);
  for (int trial = 0; trial < 24; ++trial) {
    int64_t m = 1 + static_cast<int64_t>(gen.below(37));
    int64_t n = 1 + static_cast<int64_t>(gen.below(41));
    int64_t k = 1 + static_cast<int64_t>(gen.below(53));
    bool ta = gen.below(2), tb = gen.below(2);
    Tensor a = randn(ta ? Shape{k, m} : Shape{m, k}, gen);
    Tensor b = randn(tb ? Shape{n, k} : Shape{k, n}, gen);
    Tensor c = randn({m, n}, gen);
    Tensor ref = c.clone();
    float beta = trial % 2 ? 0.5f : 0.0f;
    cpu::gemm(ta, tb, m, n, k, 1.0f, a.data<float>(), ta ? m : k, b.data<float>(), tb ? k : n,
              beta, c.data<float>(), n);
    cpu::gemm_reference(ta, tb, m, n, k, 1.0f, a.data<float>(), ta ? m : k, b.data<float>(),
                        tb ? k : n, beta, ref.data<float>(), n);
    EXPECT_LE(max_rel_error(c, ref), 1e-5) << m << "x" << n << "x" << k;
  }
}

TEST(Kernels, LinearMatchesComposedReference) {
  Generator gen(7);
  Tensor x = randn({13, 29}, gen);
  Tensor w = randn({11, 29}, gen);
  Tensor b = randn({11}, gen);
  Tensor fast = linear(x, w, b);
  Tensor ref = add(matmul(x.to(DType::f64), w.to(DType::f64).t()), b.to(DType::f64));
  EXPECT_LE(max_rel_error(fast, ref), 1e-5);
}

}  // namespace
}  // namespace dtrain
