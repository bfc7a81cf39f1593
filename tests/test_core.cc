// Tensor, allocator, autograd engine, elementwise/reduction/linear-algebra ops.
#include <gtest/gtest.h>

#include <array>

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
  EXPECT_EQ(t.to(DType::f16).to(DType::f32).to_vector<float>(),
            t.to_vector<float>() == std::vector<float>{}
                ? std::vector<float>{}
                : std::vector<float>({1.5f, -2.25f, static_cast<float>(Half(1e-3f)), 65504.0f}));
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
  Tensor y = mul(x, x);       // x^2
  Tensor z = sum(add(y, x));  // sum(x^2 + x)
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
  Tensor y = make_function(
      "times_ten_backward", {x}, {x.detach()},
      [](const std::vector<Tensor>& g) { return std::vector<Tensor>{mul_scalar(g[0], 10.0)}; })[0];
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
  gradcheck("matmul transposed views", [](auto& in) { return matmul(in[1].t(), in[0].t()); },
            {a, b});
  Tensor ba = randn({2, 3, 5}, gen).set_requires_grad(true);
  Tensor bb = randn({2, 5, 2}, gen).set_requires_grad(true);
  gradcheck("batched matmul", [](auto& in) { return matmul(in[0], in[1]); }, {ba, bb});
  Tensor x = randn({2, 3, 7}, gen).set_requires_grad(true);
  Tensor w = randn({4, 7}, gen).set_requires_grad(true);
  Tensor bias = randn({4}, gen).set_requires_grad(true);
  gradcheck("linear", [](auto& in) { return linear(in[0], in[1], in[2]); }, {x, w, bias});
  gradcheck("linear no bias", [](auto& in) { return linear(in[0], in[1], Tensor()); }, {x, w});
}

TEST(Kernels, GemmsMatchReferenceOnOddShapes) {
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
    Tensor c2 = c.clone();
    cpu::gemm_openblas(ta, tb, m, n, k, 1.0f, a.data<float>(), ta ? m : k, b.data<float>(),
                       tb ? k : n, beta, c.data<float>(), n);
    cpu::gemm_onednn(ta, tb, m, n, k, 1.0f, a.data<float>(), ta ? m : k, b.data<float>(),
                     tb ? k : n, beta, c2.data<float>(), n);
    cpu::gemm_reference(ta, tb, m, n, k, 1.0f, a.data<float>(), ta ? m : k, b.data<float>(),
                        tb ? k : n, beta, ref.data<float>(), n);
    EXPECT_LE(max_rel_error(c, ref), 1e-5) << "openblas " << m << "x" << n << "x" << k;
    EXPECT_LE(max_rel_error(c2, ref), 1e-5) << "onednn " << m << "x" << n << "x" << k;
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

namespace dtrain {
namespace {

TEST(Autograd, PostAccumulateGradHookSeesTheFinalGradient) {
  Tensor w = from_vector<float>({1.0f, 2.0f}, {2});
  w.set_requires_grad(true);
  std::vector<std::vector<float>> seen;
  w.register_post_accumulate_grad_hook(
      [&](const Tensor& p) { seen.push_back(p.grad().to_vector<float>()); });
  // w is used twice: the hook must fire once, after both contributions are summed.
  sum(add(mul(w, w), w)).backward();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0], (std::vector<float>{3.0f, 5.0f}));
  Tensor x = zeros({2});
  EXPECT_THROW(x.register_post_accumulate_grad_hook([](const Tensor&) {}), InvalidArgument);
}

}  // namespace
}  // namespace dtrain

namespace dtrain {
namespace {

// Reference: element (i0..i3) of a broadcast 4-D binary op, by explicit indexing.
double ref_at(const std::vector<double>& v, const Shape& s, const std::array<int64_t, 4>& idx) {
  int64_t off = 0;
  for (size_t d = 0; d < 4; ++d) off = off * s[d] + (s[d] == 1 ? 0 : idx[d]);
  return v[static_cast<size_t>(off)];
}

TEST(Kernels, BroadcastBinaryOpsMatchReferenceOnRandomShapes) {
  Generator gen(11);
  for (int trial = 0; trial < 30; ++trial) {
    Shape out(4), sa(4), sb(4);
    for (size_t d = 0; d < 4; ++d) {
      out[d] = 1 + static_cast<int64_t>(gen.below(5));
      sa[d] = gen.below(3) == 0 ? 1 : out[d];
      sb[d] = gen.below(3) == 0 ? 1 : out[d];
      out[d] = std::max(sa[d], sb[d]);
    }
    Tensor a = testing::randn(sa, gen);
    Tensor b = testing::uniform(sb, gen, 0.5, 2.0);
    if (trial % 3 == 0) a = a.transpose(1, 3).contiguous().transpose(1, 3);  // strided input
    std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>();
    struct Case {
      Tensor (*op)(const Tensor&, const Tensor&);
      double (*ref)(double, double);
    };
    const Case cases[] = {{add, [](double x, double y) { return x + y; }},
                          {sub, [](double x, double y) { return x - y; }},
                          {mul, [](double x, double y) { return x * y; }},
                          {div, [](double x, double y) { return x / y; }}};
    for (const Case& c : cases) {
      Tensor got = c.op(a, b);
      ASSERT_EQ(got.shape(), out);
      std::vector<double> vg = got.to_vector<double>();
      size_t i = 0;
      for (int64_t i0 = 0; i0 < out[0]; ++i0)
        for (int64_t i1 = 0; i1 < out[1]; ++i1)
          for (int64_t i2 = 0; i2 < out[2]; ++i2)
            for (int64_t i3 = 0; i3 < out[3]; ++i3, ++i) {
              std::array<int64_t, 4> idx{i0, i1, i2, i3};
              double want = c.ref(ref_at(va, sa, idx), ref_at(vb, sb, idx));
              ASSERT_NEAR(vg[i], want, 1e-5 * std::max(1.0, std::abs(want)))
                  << shape_str(sa) << " op " << shape_str(sb) << " at " << i;
            }
    }
  }
}

TEST(Kernels, ReductionsMatchReferenceOnRandomShapes) {
  Generator gen(12);
  for (int trial = 0; trial < 30; ++trial) {
    Shape s = {1 + static_cast<int64_t>(gen.below(6)), 1 + static_cast<int64_t>(gen.below(7)),
               1 + static_cast<int64_t>(gen.below(9))};
    Tensor x = testing::randn(s, gen);
    std::vector<double> v = x.to_vector<double>();
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < 3; ++d) {
      if (gen.below(2)) dims.push_back(d);
    }
    if (dims.empty()) dims.push_back(static_cast<int64_t>(gen.below(3)));
    Tensor got = sum(x, dims, /*keepdim=*/true);
    std::vector<double> vg = got.to_vector<double>();
    Shape os = got.shape();
    std::vector<double> want(vg.size(), 0.0);
    for (int64_t i = 0; i < s[0]; ++i)
      for (int64_t j = 0; j < s[1]; ++j)
        for (int64_t k = 0; k < s[2]; ++k) {
          int64_t o =
              ((os[0] == 1 ? 0 : i) * os[1] + (os[1] == 1 ? 0 : j)) * os[2] + (os[2] == 1 ? 0 : k);
          want[static_cast<size_t>(o)] += v[static_cast<size_t>((i * s[1] + j) * s[2] + k)];
        }
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NEAR(vg[i], want[i], 1e-5 * std::max(1.0, std::abs(want[i]))) << shape_str(s);
    }
    Tensor m = mean(x);
    double total = 0;
    for (double e : v) total += e;
    EXPECT_NEAR(m.item(), total / static_cast<double>(v.size()), 1e-6);
  }
}

}  // namespace
}  // namespace dtrain
