// Mixed precision on the CPU: the loss scaler and the f32 master weights (amp.h).
//
// Oracles: a run with loss scaling by a power of two must update the parameters bit
// for bit like the unscaled run (scaling by 2^k and unscaling are exact); a step with
// an inf gradient must leave parameters and optimizer state untouched; master weights
// must round to exactly what BFloat16/Half conversion gives.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "dtrain/engine/amp.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/random.h"

namespace dtrain {
namespace {

Tensor random_tensor(const Shape& s, Generator& gen) {
  std::vector<float> v(static_cast<size_t>(shape_numel(s)));
  for (auto& e : v) e = static_cast<float>(gen.uniform(-1, 1));
  return from_vector(v, s);
}

// A few SGD steps of a linear least-squares model; returns the weights.
std::vector<float> train(amp::LossScaler* scaler, int steps) {
  Generator gen(11);
  Tensor w = random_tensor({4, 3}, gen).set_requires_grad(true);
  Tensor x = random_tensor({8, 3}, gen), y = random_tensor({8, 4}, gen);
  optim::SGD opt({w}, optim::SGDOptions(0.1).momentum(0.9));
  for (int i = 0; i < steps; ++i) {
    w.set_grad(Tensor());
    Tensor diff = sub(linear(x, w, Tensor()), y);
    Tensor loss = mean(mul(diff, diff));
    if (scaler) {
      scaler->scale(loss).backward();
      EXPECT_TRUE(scaler->step(opt));
    } else {
      loss.backward();
      opt.step();
    }
  }
  return w.detach().to_vector<float>();
}

TEST(LossScaler, PowerOfTwoScalingIsExact) {
  amp::LossScalerOptions o;
  o.init_scale = 1024;
  o.growth_interval = 2;  // the scale changes during the run, staying a power of two
  amp::LossScaler scaler(o);
  std::vector<float> plain = train(nullptr, 5), scaled = train(&scaler, 5);
  EXPECT_EQ(plain, scaled);
  EXPECT_EQ(scaler.scale_value(), 1024.0 * 4);  // grew after steps 2 and 4
}

TEST(LossScaler, SkipsNonFiniteStepsAndBacksOff) {
  amp::LossScalerOptions o;
  o.init_scale = 256;
  amp::LossScaler scaler(o);
  Tensor w = from_vector(std::vector<float>{1.f, 2.f}, {2}).set_requires_grad(true);
  optim::SGD opt({w}, optim::SGDOptions(0.5));
  w.set_grad(from_vector(std::vector<float>{std::numeric_limits<float>::infinity(), 1.f}, {2}));
  EXPECT_FALSE(scaler.step(opt));
  EXPECT_EQ(w.detach().to_vector<float>(), (std::vector<float>{1.f, 2.f}));
  EXPECT_EQ(scaler.scale_value(), 128.0);
  EXPECT_EQ(scaler.skipped_steps(), 1);
  w.set_grad(from_vector(std::vector<float>{std::nanf(""), 1.f}, {2}));
  EXPECT_FALSE(scaler.step(opt));
  EXPECT_EQ(scaler.scale_value(), 64.0);
  // A finite gradient: unscaled by 64, then the step is taken.
  w.set_grad(from_vector(std::vector<float>{64.f, -128.f}, {2}));
  EXPECT_TRUE(scaler.step(opt));
  EXPECT_EQ(w.detach().to_vector<float>(), (std::vector<float>{0.5f, 3.f}));
  EXPECT_EQ(scaler.good_steps(), 1);
}

TEST(LossScaler, DisabledKeepsScaleOneButStillSkips) {
  amp::LossScalerOptions o;
  o.enabled = false;
  amp::LossScaler scaler(o);
  Tensor loss = scalar_tensor(3.0);
  EXPECT_EQ(scaler.scale(loss).item(), 3.0);
  Tensor w = from_vector(std::vector<float>{1.f}, {1}).set_requires_grad(true);
  optim::SGD opt({w}, optim::SGDOptions(0.5));
  w.set_grad(from_vector(std::vector<float>{std::numeric_limits<float>::infinity()}, {1}));
  EXPECT_FALSE(scaler.step(opt));
  EXPECT_EQ(scaler.scale_value(), 1.0);
}

TEST(LossScaler, RejectsBadOptions) {
  auto make = [](auto edit) {
    amp::LossScalerOptions o;
    edit(o);
    amp::LossScaler s(o);
  };
  EXPECT_THROW(make([](auto& o) { o.init_scale = 0; }), InvalidArgument);
  EXPECT_THROW(make([](auto& o) { o.growth_factor = 1.0; }), InvalidArgument);
  EXPECT_THROW(make([](auto& o) { o.backoff_factor = 1.0; }), InvalidArgument);
  EXPECT_THROW(make([](auto& o) { o.growth_interval = 0; }), InvalidArgument);
}

TEST(Amp, HasNonfiniteOnEveryFloatingDtype) {
  for (DType dt : {DType::f32, DType::f64, DType::f16, DType::bf16}) {
    Tensor t = from_vector(std::vector<float>{1.f, -2.f, 3.f}, {3}).to(dt);
    EXPECT_FALSE(amp::has_nonfinite(t)) << dtype_name(dt);
    Tensor bad = from_vector(std::vector<float>{1.f, -INFINITY, 3.f}, {3}).to(dt);
    EXPECT_TRUE(amp::has_nonfinite(bad)) << dtype_name(dt);
    Tensor nan = from_vector(std::vector<float>{std::nanf(""), 0.f, 0.f}, {3}).to(dt);
    EXPECT_TRUE(amp::has_nonfinite(nan)) << dtype_name(dt);
  }
  EXPECT_THROW(amp::has_nonfinite(arange(3, TensorOptions{}.with_dtype(DType::i64))), DTypeError);
}

TEST(MasterWeights, KeepsF32CopiesAndRoundsBack) {
  Generator gen(2);
  for (DType dt : {DType::bf16, DType::f16}) {
    Tensor p = random_tensor({5, 3}, gen).to(dt).set_requires_grad(true);
    Tensor f = random_tensor({2}, gen).set_requires_grad(true);  // f32 params are shared
    amp::MasterWeights mw({p, f});
    ASSERT_EQ(mw.master().size(), 2u);
    EXPECT_TRUE(mw.master()[1].is_same(f));
    Tensor m = mw.master()[0];
    EXPECT_EQ(m.dtype(), DType::f32);
    EXPECT_TRUE(m.requires_grad());
    EXPECT_EQ(m.to_vector<float>(), p.to(DType::f32).to_vector<float>());  // exact widening

    Tensor g = random_tensor({5, 3}, gen).to(dt);
    p.set_grad(g);
    mw.copy_grads_to_master();
    EXPECT_EQ(m.grad().to_vector<float>(), g.to(DType::f32).to_vector<float>());
    EXPECT_FALSE(p.grad().defined());

    // An update the low-precision dtype cannot hold exactly: the model gets it rounded.
    {
      NoGradGuard ng;
      m.copy_(add_scalar(m, 1e-3));
    }
    mw.copy_master_to_model();
    EXPECT_EQ(p.to(DType::f32).to_vector<float>(), m.to(dt).to(DType::f32).to_vector<float>());
  }
}

// ---- autocast ----

double max_rel(const Tensor& a, const Tensor& b) {
  Tensor x = a.contiguous(), y = b.contiguous();
  double d = 0, m = 1e-30;
  for (int64_t i = 0; i < x.numel(); ++i) {
    d = std::max(d, std::abs(double(x.data<float>()[i]) - y.data<float>()[i]));
    m = std::max(m, std::abs(double(y.data<float>()[i])));
  }
  return d / m;
}

// Oracle: the f32 linear of operands rounded to bf16 by hand; the gradients are the
// GEMMs of the bf16-rounded gradient with the rounded operands.
TEST(Autocast, LinearIsABf16GemmWithF32Accumulation) {
  Generator gen(5);
  Tensor x = random_tensor({2, 7, 33}, gen).set_requires_grad(true);
  Tensor w = random_tensor({9, 33}, gen).set_requires_grad(true);
  Tensor b = random_tensor({9}, gen).set_requires_grad(true);
  Tensor g = random_tensor({2, 7, 9}, gen);
  Tensor y;
  {
    amp::AutocastGuard autocast(DType::bf16);
    EXPECT_EQ(amp::AutocastGuard::dtype(), DType::bf16);
    y = linear(x, w, b);
    sum(y * g).backward();
  }
  EXPECT_EQ(amp::AutocastGuard::dtype(), DType::f32);
  const Tensor xr = amp::round_through(x.detach(), DType::bf16);
  const Tensor wr = amp::round_through(w.detach(), DType::bf16);
  const Tensor gr = amp::round_through(g, DType::bf16);
  EXPECT_LT(max_rel(y.detach(), linear(xr, wr, b.detach())), 1e-6);
  EXPECT_GT(max_rel(y.detach(), linear(x.detach(), w.detach(), b.detach())), 1e-4)
      << "the operands were not rounded";
  EXPECT_LT(max_rel(x.grad(), matmul(gr.reshape({14, 9}), wr).reshape({2, 7, 33})), 1e-6);
  EXPECT_LT(max_rel(w.grad(), matmul(gr.reshape({14, 9}).t(), xr.reshape({14, 33}))), 1e-6);
  EXPECT_LT(max_rel(b.grad(), sum(g.reshape({14, 9}), {0})), 1e-6);
  // bf16 keeps 8 significant bits: every rounded operand is within 2^-8 relative.
  EXPECT_LT(max_rel(xr, x.detach()), std::ldexp(1.0, -8));
}

TEST(Autocast, GuardNestsAndRefusesF32) {
  {
    amp::AutocastGuard outer(DType::bf16);
    {
      amp::AutocastGuard inner(DType::f16);
      EXPECT_EQ(amp::AutocastGuard::dtype(), DType::f16);
    }
    EXPECT_EQ(amp::AutocastGuard::dtype(), DType::bf16);
    amp::AutocastGuard off(DType::bf16, false);
    EXPECT_EQ(amp::AutocastGuard::dtype(), DType::bf16);
  }
  EXPECT_EQ(amp::AutocastGuard::dtype(), DType::f32);
  EXPECT_THROW(amp::AutocastGuard(DType::f32), DTypeError);
}

}  // namespace
}  // namespace dtrain
