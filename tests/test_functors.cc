// The shared __host__ __device__ functors (dtrain/engine/functors.h), on the CPU.
//
// Two kinds of checks: each functor against an independent formula (std:: math, finite
// differences, the torch.optim update rules written out), and the CPU ops against the
// functor applied element by element, bit for bit, which shows the CPU backend runs the
// very arithmetic the CUDA kernels run (they call the same functors).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/random.h"

namespace dtrain {
namespace {

std::vector<float> sample_values() {
  std::vector<float> v = {-30.f, -5.f, -1.f, -0.5f, -1e-3f, 0.f, 1e-3f, 0.5f, 1.f, 5.f, 30.f};
  Generator gen(3);
  for (int i = 0; i < 200; ++i) v.push_back(static_cast<float>(gen.uniform(-8, 8)));
  return v;
}

Tensor as_tensor(const std::vector<float>& v) {
  return from_vector(v, {static_cast<int64_t>(v.size())});
}

TEST(Functors, ActivationsMatchStdMath) {
  for (float x : sample_values()) {
    double xd = x;
    EXPECT_EQ(fn::ReluFwd{}(x), x > 0 ? x : 0.f);
    EXPECT_NEAR(fn::TanhFwd{}(xd), std::tanh(xd), 1e-15);
    EXPECT_NEAR(fn::SigmoidFwd{}(xd), 1.0 / (1.0 + std::exp(-xd)), 1e-15);
    EXPECT_NEAR(fn::Exp{}(xd), std::exp(xd), 1e-12 * std::exp(xd));
    EXPECT_DOUBLE_EQ((fn::Affine{2.5, -1.0}(xd)), 2.5 * xd - 1.0);
  }
  EXPECT_DOUBLE_EQ(fn::Log{}(std::exp(1.0)), 1.0);
}

TEST(Functors, ActivationBackwardIsTheDerivative) {
  const double h = 1e-6;
  for (float xf : sample_values()) {
    double x = xf;
    if (std::fabs(x) < 2 * h) continue;  // relu's kink
    auto fd = [&](auto f) { return (f(x + h) - f(x - h)) / (2 * h); };
    EXPECT_NEAR(fn::TanhBwd{}(1.0, fn::TanhFwd{}(x)), fd(fn::TanhFwd{}), 1e-8);
    EXPECT_NEAR(fn::SigmoidBwd{}(1.0, fn::SigmoidFwd{}(x)), fd(fn::SigmoidFwd{}), 1e-8);
    EXPECT_NEAR(fn::ReluBwd{}(1.0, fn::ReluFwd{}(x)), fd(fn::ReluFwd{}), 1e-8);
  }
}

// The CPU ops call these functors: their outputs equal the functor bit for bit.
TEST(Functors, CpuOpsRunTheFunctors) {
  std::vector<float> v = sample_values();
  Tensor x = as_tensor(v);
  std::vector<float> relu_out = relu(x).to_vector<float>();
  std::vector<float> tanh_out = tanh(x).to_vector<float>();
  std::vector<float> sig_out = sigmoid(x).to_vector<float>();
  Tensor y = as_tensor(std::vector<float>(v.rbegin(), v.rend()));
  std::vector<float> add_out = add(x, y).to_vector<float>();
  std::vector<float> mul_out = mul(x, y).to_vector<float>();
  std::vector<float> sub_out = sub(x, y).to_vector<float>();
  for (size_t i = 0; i < v.size(); ++i) {
    float b = v[v.size() - 1 - i];
    EXPECT_EQ(relu_out[i], fn::ReluFwd{}(v[i]));
    EXPECT_EQ(tanh_out[i], fn::TanhFwd{}(v[i]));
    EXPECT_EQ(sig_out[i], fn::SigmoidFwd{}(v[i]));
    EXPECT_EQ(add_out[i], fn::Add{}(v[i], b));
    EXPECT_EQ(mul_out[i], fn::Mul{}(v[i], b));
    EXPECT_EQ(sub_out[i], fn::Sub{}(v[i], b));
  }
}

// softmax/log_softmax backward and cross-entropy backward on the CPU equal the
// functors applied to the saved forward values (what the CUDA kernels compute).
TEST(Functors, CpuSoftmaxAndCrossEntropyBackwardRunTheFunctors) {
  Generator gen(5);
  const int64_t n = 3, c = 7;
  std::vector<float> xv(n * c), dyv(n * c);
  for (auto& e : xv) e = static_cast<float>(gen.uniform(-2, 2));
  for (auto& e : dyv) e = static_cast<float>(gen.uniform(-1, 1));
  for (bool log : {false, true}) {
    Tensor x = from_vector(xv, {n, c});
    x.set_requires_grad(true);
    Tensor y = log ? log_softmax(x, 1) : softmax(x, 1);
    y.backward(from_vector(dyv, {n, c}));
    std::vector<float> yv = y.detach().to_vector<float>(), dx = x.grad().to_vector<float>();
    for (int64_t r = 0; r < n; ++r) {
      float s = 0;
      for (int64_t j = 0; j < c; ++j) s += log ? dyv[r * c + j] : dyv[r * c + j] * yv[r * c + j];
      for (int64_t j = 0; j < c; ++j) {
        size_t k = static_cast<size_t>(r * c + j);
        float want =
            log ? fn::LogSoftmaxBwd{}(dyv[k], yv[k], s) : fn::SoftmaxBwd{}(dyv[k], yv[k], s);
        EXPECT_NEAR(dx[k], want, 1e-6f) << (log ? "log_softmax" : "softmax") << " at " << k;
      }
    }
  }
  Tensor x = from_vector(xv, {n, c});
  x.set_requires_grad(true);
  std::vector<int64_t> tv = {2, 0, 6};
  cross_entropy(x, from_vector(tv, {n})).backward();
  std::vector<float> p = softmax(x.detach(), 1).to_vector<float>(),
                     dx = x.grad().to_vector<float>();
  const float scale = 1.0f / static_cast<float>(n);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < c; ++j) {
      size_t k = static_cast<size_t>(r * c + j);
      EXPECT_NEAR(dx[k], fn::CrossEntropyBwd{}(p[k], tv[r] == j, scale), 1e-7f);
    }
  }
}

TEST(Functors, FastExpIsWithinTwoUlp) {
  for (float x = -87.f; x <= 88.f; x += 0.173f) {
    double want = std::exp(static_cast<double>(x));
    EXPECT_NEAR(fn::fast_exp(x), want, 2.5e-7 * want) << "x=" << x;
  }
  EXPECT_TRUE(std::isnan(fn::fast_exp(std::nanf(""))));
}

TEST(Functors, SgdUpdateMatchesTorchRule) {
  // torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov), written out.
  const double lr = 0.1, mom = 0.9, damp = 0.1, wd = 0.01;
  for (bool nesterov : {false, true}) {
    double p = 0.7, buf = 0, p_ref = 0.7, buf_ref = 0;
    const double grads[] = {0.5, -0.25, 1.5};
    for (int t = 0; t < 3; ++t) {
      fn::SgdUpdate u{float(lr), float(mom), float(nesterov ? 0.0 : damp),
                      float(wd), nesterov,   t == 0};
      u(p, grads[t], buf);
      double d = nesterov ? 0.0 : damp;
      double g = grads[t] + wd * p_ref;
      buf_ref = t == 0 ? g : mom * buf_ref + (1 - d) * g;
      p_ref -= lr * (nesterov ? g + mom * buf_ref : buf_ref);
      EXPECT_NEAR(p, p_ref, 1e-7) << "nesterov " << nesterov << " step " << t;
      EXPECT_NEAR(buf, buf_ref, 1e-7);
    }
  }
}

TEST(Functors, AdamUpdateMatchesTorchRule) {
  const double lr = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  for (bool decoupled : {false, true}) {
    double p = 0.3, m = 0, v = 0, p_ref = 0.3, m_ref = 0, v_ref = 0;
    const double grads[] = {0.2, -0.7, 0.05};
    for (int t = 1; t <= 3; ++t) {
      double c1 = 1 - std::pow(b1, t), c2 = 1 - std::pow(b2, t);
      fn::AdamUpdate u{float(lr), float(b1), float(b2), float(eps),
                       float(wd), float(c1), float(c2), decoupled};
      u(p, grads[t - 1], m, v);
      double g = grads[t - 1];
      if (decoupled) {
        p_ref *= 1 - lr * wd;
      } else {
        g += wd * p_ref;
      }
      m_ref = b1 * m_ref + (1 - b1) * g;
      v_ref = b2 * v_ref + (1 - b2) * g * g;
      p_ref -= lr * (m_ref / c1) / (std::sqrt(v_ref / c2) + eps);
      EXPECT_NEAR(p, p_ref, 1e-6) << "decoupled " << decoupled << " step " << t;
    }
  }
}

TEST(Functors, DropoutMaskKeepsOneMinusP) {
  const float p = 0.3f, scale = 1.f / 0.7f;
  fn::DropoutMask m{12345, p, scale};
  const int n = 200000;
  int kept = 0;
  for (int i = 0; i < n; ++i) {
    float k = m(static_cast<uint64_t>(i));
    ASSERT_TRUE(k == 0.f || k == scale) << k;
    kept += k != 0.f;
    ASSERT_EQ(k, m(static_cast<uint64_t>(i)));  // counter-based: a pure function of (seed, i)
  }
  // Binomial(n, 0.7): sd ~ 205; 5 sd.
  EXPECT_NEAR(kept, 0.7 * n, 1025);
  fn::DropoutMask other{54321, p, scale};
  int same = 0;
  for (int i = 0; i < 1000; ++i) same += (m(i) != 0.f) == (other(i) != 0.f);
  EXPECT_LT(same, 900);  // another seed draws another mask (expected ~580 agreements)
}

TEST(Functors, LossScaleUpdateGrowsAndBacksOff) {
  fn::LossScaleUpdate u{2.f, 0.5f, 3};
  float scale = 1024.f;
  int good = 0;
  u(false, scale, good);
  u(false, scale, good);
  EXPECT_EQ(scale, 1024.f);
  EXPECT_EQ(good, 2);
  u(false, scale, good);
  EXPECT_EQ(scale, 2048.f);
  EXPECT_EQ(good, 0);
  u(false, scale, good);
  u(true, scale, good);
  EXPECT_EQ(scale, 1024.f);
  EXPECT_EQ(good, 0);
}

TEST(Functors, IsFinite) {
  EXPECT_TRUE(fn::is_finite(0.0));
  EXPECT_TRUE(fn::is_finite(-1e308));
  EXPECT_FALSE(fn::is_finite(std::nan("")));
  EXPECT_FALSE(fn::is_finite(INFINITY));
  EXPECT_FALSE(fn::is_finite(-INFINITY));
}

}  // namespace
}  // namespace dtrain
