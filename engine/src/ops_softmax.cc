// softmax, log_softmax and cross_entropy (fused log_softmax + NLL, mean over the batch).
//
// All three are numerically stable: every row is shifted by its maximum before it is
// exponentiated. A tensor is seen as [outer, C, inner] around the softmax dimension.
// The common case, the last dimension of a contiguous tensor (inner == 1), runs row by
// row with vectorised passes (max, exp-and-sum, scale); other dimensions run over
// whole [C, inner] blocks so the loops still walk memory contiguously (vectorised over
// `inner`). f32 uses fn::fast_exp (branch-free, vectorisable, <= 2 ulp); f64 uses
// std::exp, since f64 exists for gradient checks.
//
// Backward: softmax dx = y * (dy - sum(dy * y)); log_softmax dx = dy - exp(y) * sum(dy),
// both from the saved output y. cross_entropy saves the softmax probabilities p that
// its forward computes anyway, so its backward is one pass: dx = (p - onehot) * g / N.
// These backward functions are kernels, not recorded ops (no double backward).
#include <cmath>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

// [outer, C, inner] around dimension `dim` of `shape` (a 0-D tensor is one element).
struct SoftmaxGeometry {
  int64_t outer = 1, c = 1, inner = 1;
};

SoftmaxGeometry softmax_geometry(const Tensor& x, int64_t dim, const char* op) {
  int64_t nd = x.dim();
  int64_t lo = nd == 0 ? -1 : -nd, hi = nd == 0 ? 0 : nd - 1;
  DTRAIN_CHECK(dim >= lo && dim <= hi, InvalidArgument,
               "{}: dimension {} out of range for a {}-D tensor {}", op, dim, nd,
               shape_str(x.shape()));
  SoftmaxGeometry g;
  if (nd == 0) return g;
  int64_t d = dim < 0 ? dim + nd : dim;
  for (int64_t i = 0; i < nd; ++i) {
    int64_t s = x.shape()[static_cast<size_t>(i)];
    if (i < d) g.outer *= s;
    if (i == d) g.c = s;
    if (i > d) g.inner *= s;
  }
  return g;
}

template <typename T>
T row_max(const T* __restrict x, int64_t n) {
  T m = x[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// y[j] = exp(x[j] - m); returns the sum of y, accumulated in T (lane-parallel).
template <typename T>
T exp_shifted(const T* __restrict x, T m, T* __restrict y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    T e = fn::fast_exp(x[j] - m);
    y[j] = e;
    s += e;
  }
  return s;
}

template <typename T>
T row_sum(const T* __restrict x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}

template <typename T>
T row_dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Forward over one [C, inner] block with inner > 1 (vectorised across `inner`).
template <typename T>
void softmax_block(const T* __restrict x, T* __restrict y, int64_t c, int64_t inner, bool log,
                   T* __restrict m, T* __restrict s) {
  for (int64_t k = 0; k < inner; ++k) m[k] = x[k];
  for (int64_t i = 1; i < c; ++i) {
    const T* xr = x + i * inner;
    for (int64_t k = 0; k < inner; ++k) m[k] = xr[k] > m[k] ? xr[k] : m[k];
  }
  for (int64_t k = 0; k < inner; ++k) s[k] = 0;
  for (int64_t i = 0; i < c; ++i) {
    const T* xr = x + i * inner;
    T* yr = y + i * inner;
    for (int64_t k = 0; k < inner; ++k) {
      T e = fn::fast_exp(xr[k] - m[k]);
      yr[k] = e;
      s[k] += e;
    }
  }
  if (log) {
    for (int64_t k = 0; k < inner; ++k) m[k] += std::log(s[k]);  // m becomes the log-sum-exp
    for (int64_t i = 0; i < c; ++i) {
      const T* xr = x + i * inner;
      T* yr = y + i * inner;
      for (int64_t k = 0; k < inner; ++k) yr[k] = xr[k] - m[k];
    }
  } else {
    for (int64_t k = 0; k < inner; ++k) s[k] = T(1) / s[k];
    for (int64_t i = 0; i < c; ++i) {
      T* yr = y + i * inner;
      for (int64_t k = 0; k < inner; ++k) yr[k] *= s[k];
    }
  }
}

template <typename T>
void softmax_forward_kernel(const T* x, T* y, const SoftmaxGeometry& g, bool log) {
  if (g.outer * g.c * g.inner == 0) return;
  const int64_t c = g.c, inner = g.inner;
  if (inner == 1) {
    for (int64_t r = 0; r < g.outer; ++r) {
      const T* xr = x + r * c;
      T* yr = y + r * c;
      T m = row_max(xr, c);
      T s = exp_shifted(xr, m, yr, c);
      if (log) {
        T lse = m + std::log(s);
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) yr[j] = xr[j] - lse;
      } else {
        T inv = T(1) / s;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) yr[j] *= inv;
      }
    }
    return;
  }
  std::vector<T> m(static_cast<size_t>(inner)), s(static_cast<size_t>(inner));
  for (int64_t r = 0; r < g.outer; ++r) {
    softmax_block(x + r * c * inner, y + r * c * inner, c, inner, log, m.data(), s.data());
  }
}

// dx from dy and the saved output y (softmax: y = p; log_softmax: y = log p).
template <typename T>
void softmax_backward_kernel(const T* dy, const T* y, T* dx, const SoftmaxGeometry& g, bool log) {
  if (g.outer * g.c * g.inner == 0) return;
  const int64_t c = g.c, inner = g.inner;
  if (inner == 1) {
    for (int64_t r = 0; r < g.outer; ++r) {
      const T* __restrict dyr = dy + r * c;
      const T* __restrict yr = y + r * c;
      T* __restrict dxr = dx + r * c;
      if (log) {
        T s = row_sum(dyr, c);
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) dxr[j] = fn::LogSoftmaxBwd{}(dyr[j], yr[j], s);
      } else {
        T s = row_dot(dyr, yr, c);
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) dxr[j] = fn::SoftmaxBwd{}(dyr[j], yr[j], s);
      }
    }
    return;
  }
  std::vector<T> acc(static_cast<size_t>(inner));
  T* __restrict s = acc.data();
  for (int64_t r = 0; r < g.outer; ++r) {
    const T* dyb = dy + r * c * inner;
    const T* yb = y + r * c * inner;
    T* dxb = dx + r * c * inner;
    for (int64_t k = 0; k < inner; ++k) s[k] = 0;
    for (int64_t i = 0; i < c; ++i) {
      const T* __restrict dyr = dyb + i * inner;
      const T* __restrict yr = yb + i * inner;
      if (log) {
        for (int64_t k = 0; k < inner; ++k) s[k] += dyr[k];
      } else {
        for (int64_t k = 0; k < inner; ++k) s[k] += dyr[k] * yr[k];
      }
    }
    for (int64_t i = 0; i < c; ++i) {
      const T* __restrict dyr = dyb + i * inner;
      const T* __restrict yr = yb + i * inner;
      T* __restrict dxr = dxb + i * inner;
      if (log) {
        for (int64_t k = 0; k < inner; ++k) dxr[k] = fn::LogSoftmaxBwd{}(dyr[k], yr[k], s[k]);
      } else {
        for (int64_t k = 0; k < inner; ++k) dxr[k] = fn::SoftmaxBwd{}(dyr[k], yr[k], s[k]);
      }
    }
  }
}

Tensor softmax_impl(const Tensor& x, int64_t dim, bool log) {
  const char* op = log ? "log_softmax" : "softmax";
  DTRAIN_CHECK(x.defined(), InvalidArgument, "{}: undefined input", op);
  SoftmaxGeometry geo = softmax_geometry(x, dim, op);
  Tensor y;
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda()) y = cuda::softmax_forward(x, geo.outer, geo.c, geo.inner, log);
#endif
  if (!y.defined()) {
    Tensor xc = x.detach().contiguous();
    y = empty(x.shape(), x.options());
    DTRAIN_DISPATCH_FLOAT(x.dtype(), op, [&] {
      softmax_forward_kernel<scalar_t>(xc.data<scalar_t>(), y.data<scalar_t>(), geo, log);
    });
  }
  if (!any_requires_grad({x})) return y;
  Tensor saved = y.detach();
  return make_function(op, {x}, {y}, [saved, geo, log, op](const std::vector<Tensor>& g) {
    if (!g[0].defined()) return std::vector<Tensor>{Tensor()};
#ifdef DTRAIN_WITH_CUDA
    if (saved.device().is_cuda()) {
      return std::vector<Tensor>{
          cuda::softmax_backward(g[0], saved, geo.outer, geo.c, geo.inner, log)};
    }
#endif
    Tensor dy = g[0].contiguous();
    Tensor dx = empty(saved.shape(), saved.options());
    DTRAIN_DISPATCH_FLOAT(saved.dtype(), op, [&] {
      softmax_backward_kernel<scalar_t>(dy.data<scalar_t>(), saved.data<scalar_t>(),
                                        dx.data<scalar_t>(), geo, log);
    });
    return std::vector<Tensor>{dx};
  })[0];
}

// Validates every target before any arithmetic; names the first bad one.
void check_targets(const int64_t* t, int64_t n, int64_t c) {
  for (int64_t i = 0; i < n; ++i) {
    DTRAIN_CHECK(t[i] >= 0 && t[i] < c, InvalidArgument,
                 "cross_entropy: target {} at position {} is out of range for {} classes "
                 "(expected a class index in [0,{}))",
                 t[i], i, c, c);
  }
}

// Mean NLL of log_softmax(logits) over the rows. When `probs` is not null the
// softmax probabilities are written there (the backward's only saved state).
template <typename T>
double cross_entropy_kernel(const T* x, const int64_t* target, int64_t n, int64_t c, T* probs,
                            std::vector<T>& scratch) {
  double total = 0;
  for (int64_t r = 0; r < n; ++r) {
    const T* xr = x + r * c;
    T* p = probs ? probs + r * c : scratch.data();
    T m = row_max(xr, c);
    T s = exp_shifted(xr, m, p, c);
    total += static_cast<double>(m) + std::log(static_cast<double>(s)) -
             static_cast<double>(xr[target[r]]);
    if (probs) {
      T inv = T(1) / s;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) p[j] *= inv;
    }
  }
  return total / static_cast<double>(n);
}

// dx = (p - onehot(target)) * scale, in one pass over the saved probabilities.
template <typename T>
void cross_entropy_backward_kernel(const T* p, const int64_t* target, int64_t n, int64_t c, T scale,
                                   T* dx) {
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict pr = p + r * c;
    T* __restrict dr = dx + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) dr[j] = pr[j] * scale;
    dr[target[r]] -= scale;
  }
}

}  // namespace

Tensor softmax(const Tensor& x, int64_t dim) { return softmax_impl(x, dim, false); }

Tensor log_softmax(const Tensor& x, int64_t dim) { return softmax_impl(x, dim, true); }

Tensor cross_entropy(const Tensor& logits, const Tensor& target) {
  DTRAIN_CHECK(logits.defined() && target.defined(), InvalidArgument,
               "cross_entropy: undefined input");
  DTRAIN_CHECK(logits.dim() == 2, ShapeError,
               "cross_entropy: expected logits [N,C], got {} (flatten extra dimensions first)",
               shape_str(logits.shape()));
  DTRAIN_CHECK(target.dtype() == DType::i64, DTypeError,
               "cross_entropy: target must be i64 class indices, got {}",
               dtype_name(target.dtype()));
  const int64_t n = logits.shape()[0], c = logits.shape()[1];
  DTRAIN_CHECK(target.dim() == 1 && target.shape()[0] == n, ShapeError,
               "cross_entropy: expected target [{}] for logits {}, got {}", n,
               shape_str(logits.shape()), shape_str(target.shape()));
  DTRAIN_CHECK(n > 0, ShapeError,
               "cross_entropy: empty batch (logits {}): the mean over zero samples is undefined",
               shape_str(logits.shape()));
  DTRAIN_CHECK(c > 0, ShapeError, "cross_entropy: logits {} have no classes",
               shape_str(logits.shape()));
#ifdef DTRAIN_WITH_CUDA
  if (logits.device().is_cuda()) {
    bool grad = any_requires_grad({logits});
    cuda::CrossEntropyResult r = cuda::cross_entropy(logits.detach(), target, grad);
    if (!grad) return r.loss;
    Tensor probs = r.probs, tgt = target.detach();
    return make_function(
        "cross_entropy", {logits, target}, {r.loss}, [probs, tgt, n](const std::vector<Tensor>& g) {
          if (!g[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
          double scale = g[0].item() / static_cast<double>(n);
          return std::vector<Tensor>{cuda::cross_entropy_backward(probs, tgt, scale), Tensor()};
        })[0];
  }
#endif
  Tensor tc = target.contiguous();
  const int64_t* pt = tc.data<int64_t>();
  check_targets(pt, n, c);
  Tensor xc = logits.detach().contiguous();
  bool need_grad = any_requires_grad({logits});
  Tensor probs = need_grad ? empty(logits.shape(), logits.options()) : Tensor();
  Tensor loss = empty({}, logits.options());
  DTRAIN_DISPATCH_FLOAT(logits.dtype(), "cross_entropy", [&] {
    std::vector<scalar_t> scratch(need_grad ? 0 : static_cast<size_t>(c));
    double v = cross_entropy_kernel<scalar_t>(
        xc.data<scalar_t>(), pt, n, c, need_grad ? probs.data<scalar_t>() : nullptr, scratch);
    loss.data<scalar_t>()[0] = static_cast<scalar_t>(v);
  });
  if (!need_grad) return loss;
  return make_function(
      "cross_entropy", {logits, target}, {loss}, [probs, tc, n, c](const std::vector<Tensor>& g) {
        if (!g[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
        double scale = g[0].item() / static_cast<double>(n);
        Tensor dx = empty(probs.shape(), probs.options());
        DTRAIN_DISPATCH_FLOAT(probs.dtype(), "cross_entropy backward", [&] {
          cross_entropy_backward_kernel<scalar_t>(probs.data<scalar_t>(), tc.data<int64_t>(), n, c,
                                                  static_cast<scalar_t>(scale),
                                                  dx.data<scalar_t>());
        });
        return std::vector<Tensor>{dx, Tensor()};
      })[0];
}

}  // namespace dtrain
