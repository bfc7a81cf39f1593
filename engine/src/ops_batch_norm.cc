// batch_norm2d and relu6 (batch_norm.h): per-channel loops on contiguous NCHW
// buffers, channels in parallel, statistics in double.
#include "dtrain/engine/batch_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/parallel.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"

namespace dtrain {

namespace {

struct BnGeom {
  int64_t n = 0, c = 0, hw = 0;
  int64_t count() const { return n * hw; }
};

// Calls f(ch) for every channel, channels split over threads.
template <typename F>
void for_channels(const BnGeom& g, F&& f) {
  cpu::parallel_for(g.c, cpu::threads_for(g.c, g.n * g.c * g.hw), [&](int64_t b, int64_t e, int) {
    for (int64_t ch = b; ch < e; ++ch) f(ch);
  });
}

// Per-channel statistics of one call, what backward needs besides x and weight.
struct BnStats {
  std::vector<double> mean, invstd;
  double count = 0;  // over all ranks when synchronised
};

void check_bn(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& rm,
              const Tensor& rv) {
  DTRAIN_CHECK(x.defined() && w.defined() && b.defined() && rm.defined() && rv.defined(),
               InvalidArgument, "batch_norm2d: undefined input, weight, bias or running stats");
  DTRAIN_CHECK(x.device().is_cpu(), UnsupportedError, "batch_norm2d: runs on the CPU only, got {}",
               x.device().str());
  DTRAIN_CHECK(x.dim() == 4, ShapeError, "batch_norm2d: expected input [N,C,H,W], got {}",
               shape_str(x.shape()));
  DTRAIN_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64, DTypeError,
               "batch_norm2d: expected f32 or f64 input, got {}", dtype_name(x.dtype()));
  const Shape c{x.shape()[1]};
  for (const Tensor* t : {&w, &b, &rm, &rv}) {
    DTRAIN_CHECK(t->shape() == c && t->dtype() == x.dtype() && t->device() == x.device(),
                 ShapeError,
                 "batch_norm2d: input {} {} needs {} {} weight, bias and running stats, "
                 "got {} {}",
                 dtype_name(x.dtype()), shape_str(x.shape()), dtype_name(x.dtype()), shape_str(c),
                 dtype_name(t->dtype()), shape_str(t->shape()));
  }
}

// Batch statistics (reduced over ranks when `reduce`), and the running-stat update.
template <typename T>
BnStats batch_stats(const BnGeom& g, const T* x, T* rm, T* rv, const BatchNormOptions& opt) {
  std::vector<double> s(static_cast<size_t>(2 * g.c + 1));
  for_channels(g, [&](int64_t ch) {
    double s1 = 0, s2 = 0;
    for (int64_t i = 0; i < g.n; ++i) {
      const T* p = x + (i * g.c + ch) * g.hw;
      for (int64_t k = 0; k < g.hw; ++k) {
        s1 += static_cast<double>(p[k]);
        s2 += static_cast<double>(p[k]) * static_cast<double>(p[k]);
      }
    }
    s[static_cast<size_t>(ch)] = s1;
    s[static_cast<size_t>(g.c + ch)] = s2;
  });
  s[static_cast<size_t>(2 * g.c)] = static_cast<double>(g.count());
  if (opt.reduce) (*opt.reduce)(s.data(), s.size());
  BnStats st{std::vector<double>(static_cast<size_t>(g.c)),
             std::vector<double>(static_cast<size_t>(g.c)), s[static_cast<size_t>(2 * g.c)]};
  DTRAIN_CHECK(st.count > 1, InvalidArgument,
               "batch_norm2d: training needs more than 1 value per channel, got input [{},{},{}] "
               "({} values over all ranks)",
               g.n, g.c, g.hw, st.count);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    auto c = static_cast<size_t>(ch);
    double mean = s[c] / st.count;
    double var = std::max(0.0, s[static_cast<size_t>(g.c) + c] / st.count - mean * mean);
    st.mean[c] = mean;
    st.invstd[c] = 1.0 / std::sqrt(var + opt.eps);
    double unbiased = var * st.count / (st.count - 1);
    rm[ch] = static_cast<T>((1 - opt.momentum) * static_cast<double>(rm[ch]) + opt.momentum * mean);
    rv[ch] =
        static_cast<T>((1 - opt.momentum) * static_cast<double>(rv[ch]) + opt.momentum * unbiased);
  }
  return st;
}

template <typename T>
BnStats running_stats(const BnGeom& g, const T* rm, const T* rv, double eps) {
  BnStats st{std::vector<double>(static_cast<size_t>(g.c)),
             std::vector<double>(static_cast<size_t>(g.c)), static_cast<double>(g.count())};
  for (int64_t ch = 0; ch < g.c; ++ch) {
    st.mean[static_cast<size_t>(ch)] = static_cast<double>(rm[ch]);
    st.invstd[static_cast<size_t>(ch)] = 1.0 / std::sqrt(static_cast<double>(rv[ch]) + eps);
  }
  return st;
}

template <typename T>
void normalise(const BnGeom& g, const BnStats& st, const T* x, const T* w, const T* b, T* y) {
  for_channels(g, [&](int64_t ch) {
    auto c = static_cast<size_t>(ch);
    const T scale = static_cast<T>(st.invstd[c] * static_cast<double>(w[ch]));
    const T shift = static_cast<T>(static_cast<double>(b[ch]) - st.mean[c] * scale);
    for (int64_t i = 0; i < g.n; ++i) {
      const T* p = x + (i * g.c + ch) * g.hw;
      T* q = y + (i * g.c + ch) * g.hw;
      for (int64_t k = 0; k < g.hw; ++k) q[k] = p[k] * scale + shift;
    }
  });
}

struct BnSaved {
  BnGeom g;
  BnStats st;
  Tensor x, w;
  bool training;
  StatsAllReduce reduce;  // empty: local statistics
};

template <typename T>
std::vector<Tensor> bn_backward_typed(const BnSaved& s, const Tensor& dyt) {
  const BnGeom& g = s.g;
  const T *x = s.x.data<T>(), *w = s.w.data<T>(), *dy = dyt.data<T>();
  Tensor dx = empty(s.x.shape(), s.x.options()), dw = empty({g.c}, s.w.options()),
         db = empty({g.c}, s.w.options());
  std::vector<double> red(static_cast<size_t>(2 * g.c));  // sum dy, sum dy (x - mean)
  for_channels(g, [&](int64_t ch) {
    double sdy = 0, sdx = 0, mean = s.st.mean[static_cast<size_t>(ch)];
    for (int64_t i = 0; i < g.n; ++i) {
      const T *p = x + (i * g.c + ch) * g.hw, *d = dy + (i * g.c + ch) * g.hw;
      for (int64_t k = 0; k < g.hw; ++k) {
        sdy += static_cast<double>(d[k]);
        sdx += static_cast<double>(d[k]) * (static_cast<double>(p[k]) - mean);
      }
    }
    red[static_cast<size_t>(ch)] = sdy;
    red[static_cast<size_t>(g.c + ch)] = sdx;
    db.data<T>()[ch] = static_cast<T>(sdy);
    dw.data<T>()[ch] = static_cast<T>(sdx * s.st.invstd[static_cast<size_t>(ch)]);
  });
  if (s.training && s.reduce) s.reduce(red.data(), red.size());
  for_channels(g, [&](int64_t ch) {
    auto c = static_cast<size_t>(ch);
    const double inv = s.st.invstd[c], mean = s.st.mean[c], k1 = inv * static_cast<double>(w[ch]);
    const double mdy = s.training ? red[c] / s.st.count : 0.0;
    const double mdx =
        s.training ? red[static_cast<size_t>(g.c) + c] / s.st.count * inv * inv : 0.0;
    for (int64_t i = 0; i < g.n; ++i) {
      const T *p = x + (i * g.c + ch) * g.hw, *d = dy + (i * g.c + ch) * g.hw;
      T* q = dx.data<T>() + (i * g.c + ch) * g.hw;
      for (int64_t k = 0; k < g.hw; ++k) {
        double xm = static_cast<double>(p[k]) - mean;
        q[k] = static_cast<T>(k1 * (static_cast<double>(d[k]) - mdy - xm * mdx));
      }
    }
  });
  return {dx, dw, db};
}

}  // namespace

Tensor batch_norm2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& running_mean,
                    Tensor& running_var, const BatchNormOptions& opt) {
  check_bn(x, weight, bias, running_mean, running_var);
  const BnGeom g{x.shape()[0], x.shape()[1], x.shape()[2] * x.shape()[3]};
  Tensor xc = x.detach().contiguous(), wc = weight.detach().contiguous();
  Tensor bc = bias.detach().contiguous();
  Tensor y = empty(x.shape(), x.options());
  BnStats st;
  DTRAIN_DISPATCH_FLOAT(x.dtype(), "batch_norm2d", [&] {
    st = opt.training ? batch_stats(g, xc.data<scalar_t>(), running_mean.data<scalar_t>(),
                                    running_var.data<scalar_t>(), opt)
                      : running_stats(g, running_mean.data<scalar_t>(),
                                      running_var.data<scalar_t>(), opt.eps);
    normalise(g, st, xc.data<scalar_t>(), wc.data<scalar_t>(), bc.data<scalar_t>(),
              y.data<scalar_t>());
  });
  if (!any_requires_grad({x, weight, bias})) return y;
  BnSaved saved{g,  std::move(st), xc,
                wc, opt.training,  opt.reduce ? *opt.reduce : StatsAllReduce()};
  return make_function(
      "batch_norm2d", {x, weight, bias}, {y}, [saved](const std::vector<Tensor>& grads) {
        if (!grads[0].defined()) return std::vector<Tensor>(3);
        Tensor dy = grads[0].contiguous();
        std::vector<Tensor> out;
        DTRAIN_DISPATCH_FLOAT(dy.dtype(), "batch_norm2d backward",
                              [&] { out = bn_backward_typed<scalar_t>(saved, dy); });
        return out;
      })[0];
}

Tensor relu6(const Tensor& x) {
  DTRAIN_CHECK(x.defined() && x.device().is_cpu(), UnsupportedError,
               "relu6: needs a defined CPU tensor");
  DTRAIN_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64, DTypeError,
               "relu6: expected f32 or f64, got {}", dtype_name(x.dtype()));
  Tensor xc = x.detach().contiguous();
  Tensor y = empty(x.shape(), x.options());
  DTRAIN_DISPATCH_FLOAT(x.dtype(), "relu6", [&] {
    const scalar_t* p = xc.data<scalar_t>();
    scalar_t* q = y.data<scalar_t>();
    for (int64_t i = 0, n = xc.numel(); i < n; ++i) {
      q[i] = std::min(std::max(p[i], scalar_t(0)), scalar_t(6));
    }
  });
  if (!any_requires_grad({x})) return y;
  return make_function("relu6", {x}, {y}, [xc](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>(1);
    Tensor dy = grads[0].contiguous(), dx = empty(xc.shape(), xc.options());
    DTRAIN_DISPATCH_FLOAT(dy.dtype(), "relu6 backward", [&] {
      const scalar_t *p = xc.data<scalar_t>(), *d = dy.data<scalar_t>();
      scalar_t* q = dx.data<scalar_t>();
      for (int64_t i = 0, n = xc.numel(); i < n; ++i) {
        q[i] = (p[i] > scalar_t(0) && p[i] < scalar_t(6)) ? d[i] : scalar_t(0);
      }
    });
    return std::vector<Tensor>{dx};
  })[0];
}

}  // namespace dtrain
