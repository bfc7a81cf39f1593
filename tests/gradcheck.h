// Test helpers: finite-difference gradient checks in float64, and tensor comparison.
//
// gradcheck(f, inputs) evaluates f on f64 copies of `inputs`, takes the analytic
// gradient of sum(f(x) * w) for a fixed random weighting w, and compares every
// element with a central difference (f(x+h) - f(x-h)) / 2h. Every op test in the
// suite goes through here: the oracle is calculus, not the implementation.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/random.h"

namespace dtrain::testing {

inline Tensor randn(const Shape& shape, Generator& gen, DType dtype = DType::f32,
                    double scale = 1.0) {
  Tensor t = empty(shape, TensorOptions{}.with_dtype(DType::f64));
  double* p = t.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = gen.normal() * scale;
  return dtype == DType::f64 ? t : t.to(dtype);
}

inline Tensor uniform(const Shape& shape, Generator& gen, double lo, double hi,
                      DType dtype = DType::f32) {
  Tensor t = empty(shape, TensorOptions{}.with_dtype(DType::f64));
  double* p = t.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = gen.uniform(lo, hi);
  return dtype == DType::f64 ? t : t.to(dtype);
}

// Max |a-b| / max(1, max|b|) over all elements (a and b converted to f64).
inline double max_rel_error(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  std::vector<double> va = a.to_vector<double>(), vb = b.to_vector<double>();
  double scale = 1.0, err = 0.0;
  for (double v : vb) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < va.size() && i < vb.size(); ++i) {
    double d = std::abs(va[i] - vb[i]);
    if (std::isnan(va[i]) != std::isnan(vb[i])) d = INFINITY;
    err = std::max(err, d);
  }
  return err / scale;
}

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

// Checks the gradient of every input with requires_grad against central differences.
// `inputs` are converted to f64 first (integer inputs such as indices stay as they are).
inline void gradcheck(const std::string& name, const Fn& f, std::vector<Tensor> inputs,
                      double eps = 1e-6, double tol = 1e-6) {
  std::vector<bool> diff(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined()) continue;
    bool rg = inputs[i].requires_grad();
    if (is_floating(inputs[i].dtype())) inputs[i] = inputs[i].detach().to(DType::f64);
    diff[i] = rg;
    if (rg) inputs[i].set_requires_grad(true);
  }
  Tensor out = f(inputs);
  Generator gen(1234);
  Tensor w = randn(out.shape(), gen, DType::f64);
  auto objective = [&](const std::vector<Tensor>& in) {
    NoGradGuard ng;
    return sum(mul(f(in), w)).item();
  };
  std::vector<Tensor> diff_inputs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (diff[i]) diff_inputs.push_back(inputs[i]);
  }
  ASSERT_FALSE(diff_inputs.empty()) << name << ": no input requires grad";
  std::vector<Tensor> analytic = grad({out}, diff_inputs, {w});
  size_t k = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!diff[i]) continue;
    Tensor x = inputs[i];
    double* p = x.data<double>();
    std::vector<double> an = analytic[k++].to_vector<double>();
    double worst = 0;
    int64_t worst_at = -1;
    double scale = 1.0;
    std::vector<double> num(static_cast<size_t>(x.numel()));
    for (int64_t j = 0; j < x.numel(); ++j) {
      double orig = p[j];
      p[j] = orig + eps;
      double fp = objective(inputs);
      p[j] = orig - eps;
      double fm = objective(inputs);
      p[j] = orig;
      num[static_cast<size_t>(j)] = (fp - fm) / (2 * eps);
      scale = std::max(scale, std::abs(num[static_cast<size_t>(j)]));
    }
    for (int64_t j = 0; j < x.numel(); ++j) {
      double d = std::abs(num[static_cast<size_t>(j)] - an[static_cast<size_t>(j)]);
      if (d > worst || std::isnan(d)) {
        worst = std::isnan(d) ? INFINITY : d;
        worst_at = j;
      }
    }
    EXPECT_LE(worst / scale, tol) << name << ": input " << i << " " << shape_str(x.shape())
                                  << " worst element " << worst_at << " numeric "
                                  << (worst_at >= 0 ? num[static_cast<size_t>(worst_at)] : 0.0)
                                  << " analytic "
                                  << (worst_at >= 0 ? an[static_cast<size_t>(worst_at)] : 0.0);
  }
}

}  // namespace dtrain::testing
