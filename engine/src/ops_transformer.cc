// layer_norm, gelu, cat and split: the non-attention ops a GPT needs.
//
// layer_norm normalises rows of the last dimension. The forward saves the row mean and
// rstd = 1/sqrt(var + eps) (dtype of x, [rows]) beside x; the backward is one pass per
// row (fn::LayerNormBwd) plus column sums for dweight/dbias, accumulated per thread
// and added in thread order. Row statistics accumulate in double. gelu is the tanh
// approximation (fn::GeluFwd/GeluBwd, saving x). Rows and elements are split over
// threads with cpu::parallel_for when the work is large enough.
//
// cat copies each input into its slice of the output (raw block copies on the CPU,
// copy_ into a narrowed view on CUDA); its backward hands each input a narrowed view of
// the gradient. split returns views (narrow) that share x's storage, as torch.split; its
// backward concatenates the chunk gradients (zeros for chunks without one), so the
// gradient of x is built once instead of once per chunk. The backward functions are
// kernels, not recorded ops (no double backward).
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/parallel.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

// ---------------------------------------------------------------- layer norm

void check_norm_param(const Tensor& p, const char* what, const Tensor& x) {
  if (!p.defined()) return;
  const int64_t d = x.size(-1);
  DTRAIN_CHECK(p.dim() == 1 && p.shape()[0] == d, ShapeError,
               "layer_norm: expected {} [{}] for input {}, got {}", what, d, shape_str(x.shape()),
               shape_str(p.shape()));
  DTRAIN_CHECK(p.dtype() == x.dtype(), DTypeError, "layer_norm: {} is {} but the input is {}", what,
               dtype_name(p.dtype()), dtype_name(x.dtype()));
  DTRAIN_CHECK(p.device() == x.device(), InvalidArgument,
               "layer_norm: {} on {} but the input on {}", what, p.device().str(),
               x.device().str());
}

template <typename T>
void layer_norm_forward_kernel(const T* x, const T* w, const T* b, int64_t rows, int64_t d, T eps,
                               T* y, T* mean, T* rstd) {
  cpu::parallel_for(rows, cpu::threads_for(rows, rows * d), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * d;
      T* __restrict yr = y + r * d;
      double s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) s += static_cast<double>(xr[j]);
      const double mu = s / static_cast<double>(d);
      double ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d; ++j) {
        double c = static_cast<double>(xr[j]) - mu;
        ss += c * c;
      }
      const T m = static_cast<T>(mu);
      const T rs = fn::layer_norm_rstd(static_cast<T>(ss / static_cast<double>(d)), eps);
      mean[r] = m;
      rstd[r] = rs;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        yr[j] = fn::LayerNormFwd{}(xr[j], m, rs, w ? w[j] : T(1), b ? b[j] : T(0));
      }
    }
  });
}

// dx (nullable), dw, db (nullable) from dy; w nullable (ones).
template <typename T>
void layer_norm_backward_kernel(const T* dy, const T* x, const T* mean, const T* rstd, const T* w,
                                int64_t rows, int64_t d, T* dx, T* dw, T* db) {
  const int threads = cpu::threads_for(rows, rows * d);
  const bool cols = dw || db;
  std::vector<double> part(cols ? static_cast<size_t>(threads) * 2 * d : 0, 0.0);
  cpu::parallel_for(rows, threads, [&](int64_t r0, int64_t r1, int t) {
    double* pw = cols ? part.data() + static_cast<size_t>(t) * 2 * d : nullptr;
    double* pb = cols ? pw + d : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict gr = dy + r * d;
      const T* __restrict xr = x + r * d;
      const T m = mean[r], rs = rstd[r];
      if (cols) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          pw[j] += static_cast<double>(gr[j]) * static_cast<double>((xr[j] - m) * rs);
          pb[j] += static_cast<double>(gr[j]);
        }
      }
      if (!dx) continue;
      double sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t j = 0; j < d; ++j) {
        T g = gr[j] * (w ? w[j] : T(1));
        sg += static_cast<double>(g);
        sgx += static_cast<double>(g) * static_cast<double>((xr[j] - m) * rs);
      }
      const T mg = static_cast<T>(sg / static_cast<double>(d));
      const T mgx = static_cast<T>(sgx / static_cast<double>(d));
      T* __restrict dr = dx + r * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        dr[j] = fn::LayerNormBwd{}(gr[j] * (w ? w[j] : T(1)), (xr[j] - m) * rs, mg, mgx, rs);
      }
    }
  });
  if (!cols) return;
  for (int64_t j = 0; j < d; ++j) {
    double sw = 0, sb = 0;
    for (int t = 0; t < threads; ++t) {
      sw += part[static_cast<size_t>(t) * 2 * d + j];
      sb += part[static_cast<size_t>(t) * 2 * d + d + j];
    }
    if (dw) dw[j] = static_cast<T>(sw);
    if (db) db[j] = static_cast<T>(sb);
  }
}

struct NormSaved {
  Tensor x, weight, mean, rstd;  // x contiguous, detached; weight detached or undefined
  bool has_bias;
};

std::vector<Tensor> layer_norm_backward(const NormSaved& s, const Tensor& dy, bool gx, bool gw,
                                        bool gb) {
  const int64_t d = s.x.size(-1), rows = d == 0 ? 0 : s.x.numel() / d;
#ifdef DTRAIN_WITH_CUDA
  if (s.x.device().is_cuda()) {
    return cuda::layer_norm_backward(dy, s.x, s.mean, s.rstd, s.weight, rows, d, gx, gw, gb);
  }
#endif
  Tensor dyc = dy.contiguous();
  Tensor dx = gx ? empty(s.x.shape(), s.x.options()) : Tensor();
  Tensor dw = gw ? empty({d}, s.x.options()) : Tensor();
  Tensor db = gb ? empty({d}, s.x.options()) : Tensor();
  Tensor wc = s.weight.defined() ? s.weight.contiguous() : Tensor();
  DTRAIN_DISPATCH_FLOAT(s.x.dtype(), "layer_norm backward", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data<scalar_t>() : nullptr; };
    layer_norm_backward_kernel<scalar_t>(dyc.data<scalar_t>(), s.x.data<scalar_t>(),
                                         s.mean.data<scalar_t>(), s.rstd.data<scalar_t>(), ptr(wc),
                                         rows, d, ptr(dx), ptr(dw), ptr(db));
  });
  return {dx, dw, db};
}

// ---------------------------------------------------------------- gelu

template <typename T, typename F>
void parallel_map(int64_t n, F f) {
  cpu::parallel_for(n, cpu::threads_for(n, n * 16), [&](int64_t i0, int64_t i1, int) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) f(i);
  });
}

// ---------------------------------------------------------------- cat / split

int64_t wrap_dim(int64_t dim, int64_t nd, const char* op, const Shape& shape) {
  DTRAIN_CHECK(nd > 0, ShapeError, "{}: cannot use a 0-D tensor {}", op, shape_str(shape));
  DTRAIN_CHECK(dim >= -nd && dim < nd, InvalidArgument,
               "{}: dimension {} out of range for a {}-D tensor {}", op, dim, nd, shape_str(shape));
  return dim < 0 ? dim + nd : dim;
}

void check_cat_inputs(const std::vector<Tensor>& xs, int64_t d) {
  const Tensor& a = xs[0];
  for (size_t i = 0; i < xs.size(); ++i) {
    const Tensor& x = xs[i];
    DTRAIN_CHECK(x.defined(), InvalidArgument, "cat: tensor {} is undefined", i);
    DTRAIN_CHECK(x.dtype() == a.dtype(), DTypeError, "cat: tensor {} is {} but tensor 0 is {}", i,
                 dtype_name(x.dtype()), dtype_name(a.dtype()));
    DTRAIN_CHECK(x.device() == a.device(), InvalidArgument,
                 "cat: tensor {} is on {} but tensor 0 on {}", i, x.device().str(),
                 a.device().str());
    bool same = x.dim() == a.dim();
    for (int64_t j = 0; same && j < a.dim(); ++j) same = j == d || x.shape()[j] == a.shape()[j];
    DTRAIN_CHECK(same, ShapeError,
                 "cat: tensor {} has shape {} but tensor 0 has {} (sizes must match except in "
                 "dimension {})",
                 i, shape_str(x.shape()), shape_str(a.shape()), d);
  }
}

// Host copy of each (contiguous) input into its slice of the contiguous output.
void cat_copy_cpu(const std::vector<Tensor>& xs, int64_t d, Tensor& out) {
  const Shape& os = out.shape();
  int64_t outer = 1, inner = 1;
  for (int64_t j = 0; j < d; ++j) outer *= os[j];
  for (int64_t j = d + 1; j < out.dim(); ++j) inner *= os[j];
  const size_t es = dtype_size(out.dtype());
  const int64_t out_row = os[d] * inner;
  char* dst = static_cast<char*>(out.raw_data());
  int64_t off = 0;
  for (const Tensor& x : xs) {
    Tensor xc = x.detach().contiguous();
    const int64_t chunk = x.shape()[d] * inner;
    const char* src = static_cast<const char*>(xc.raw_data());
    for (int64_t o = 0; o < outer && chunk > 0; ++o) {
      std::memcpy(dst + (o * out_row + off) * es, src + o * chunk * es,
                  static_cast<size_t>(chunk) * es);
    }
    off += chunk;
  }
}

}  // namespace

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "layer_norm: undefined input");
  DTRAIN_CHECK(x.dim() >= 1, ShapeError, "layer_norm: expected an input [..., D], got {}",
               shape_str(x.shape()));
  DTRAIN_CHECK(is_floating(x.dtype()), DTypeError, "layer_norm: expected a floating input, got {}",
               dtype_name(x.dtype()));
  DTRAIN_CHECK(eps >= 0, InvalidArgument, "layer_norm: eps must be >= 0, got {}", eps);
  check_norm_param(weight, "weight", x);
  check_norm_param(bias, "bias", x);
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  NormSaved s{x.detach().contiguous(), weight.defined() ? weight.detach() : Tensor(), Tensor(),
              Tensor(), bias.defined()};
  Tensor y;
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda()) {
    cuda::LayerNormResult r = cuda::layer_norm_forward(s.x, weight, bias, rows, d, eps);
    y = r.y;
    s.mean = r.mean;
    s.rstd = r.rstd;
  }
#endif
  if (!y.defined()) {
    y = empty(x.shape(), x.options());
    s.mean = empty({rows}, x.options());
    s.rstd = empty({rows}, x.options());
    Tensor wc = weight.defined() ? weight.detach().contiguous() : Tensor();
    Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
    DTRAIN_DISPATCH_FLOAT(x.dtype(), "layer_norm", [&] {
      auto ptr = [](const Tensor& t) { return t.defined() ? t.data<scalar_t>() : nullptr; };
      layer_norm_forward_kernel<scalar_t>(s.x.data<scalar_t>(), ptr(wc), ptr(bc), rows, d,
                                          static_cast<scalar_t>(eps), y.data<scalar_t>(),
                                          s.mean.data<scalar_t>(), s.rstd.data<scalar_t>());
    });
  }
  if (!any_requires_grad({x, weight, bias})) return y;
  const bool gx = x.requires_grad(), gw = weight.defined() && weight.requires_grad(),
             gb = bias.defined() && bias.requires_grad();
  return make_function("layer_norm", {x, weight, bias}, {y},
                       [s, gx, gw, gb](const std::vector<Tensor>& g) {
                         if (!g[0].defined()) return std::vector<Tensor>(3);
                         return layer_norm_backward(s, g[0], gx, gw, gb);
                       })[0];
}

Tensor gelu(const Tensor& x) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "gelu: undefined input");
  Tensor y;
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda()) y = cuda::gelu_forward(x);
#endif
  Tensor xc = x.detach().contiguous();
  if (!y.defined()) {
    y = empty(x.shape(), x.options());
    DTRAIN_DISPATCH_FLOAT(x.dtype(), "gelu", [&] {
      const scalar_t* px = xc.data<scalar_t>();
      scalar_t* py = y.data<scalar_t>();
      parallel_map<scalar_t>(x.numel(), [&](int64_t i) { py[i] = fn::GeluFwd{}(px[i]); });
    });
  }
  if (!any_requires_grad({x})) return y;
  return make_function("gelu", {x}, {y}, [xc](const std::vector<Tensor>& g) {
    if (!g[0].defined()) return std::vector<Tensor>{Tensor()};
#ifdef DTRAIN_WITH_CUDA
    if (xc.device().is_cuda()) return std::vector<Tensor>{cuda::gelu_backward(g[0], xc)};
#endif
    Tensor dy = g[0].contiguous();
    Tensor dx = empty(xc.shape(), xc.options());
    DTRAIN_DISPATCH_FLOAT(xc.dtype(), "gelu backward", [&] {
      const scalar_t* px = xc.data<scalar_t>();
      const scalar_t* pg = dy.data<scalar_t>();
      scalar_t* pd = dx.data<scalar_t>();
      parallel_map<scalar_t>(xc.numel(), [&](int64_t i) { pd[i] = fn::GeluBwd{}(pg[i], px[i]); });
    });
    return std::vector<Tensor>{dx};
  })[0];
}

Tensor cat(const std::vector<Tensor>& xs, int64_t dim) {
  DTRAIN_CHECK(!xs.empty(), InvalidArgument, "cat: empty list of tensors");
  DTRAIN_CHECK(xs[0].defined(), InvalidArgument, "cat: tensor 0 is undefined");
  const int64_t d = wrap_dim(dim, xs[0].dim(), "cat", xs[0].shape());
  check_cat_inputs(xs, d);
  Shape os = xs[0].shape();
  std::vector<int64_t> sizes;
  os[d] = 0;
  for (const Tensor& x : xs) {
    sizes.push_back(x.shape()[d]);
    os[d] += x.shape()[d];
  }
  Tensor out = empty(os, xs[0].options());
  if (out.device().is_cuda()) {
    int64_t off = 0;
    for (const Tensor& x : xs) {
      out.narrow(d, off, x.shape()[d]).copy_(x.detach());
      off += x.shape()[d];
    }
  } else {
    cat_copy_cpu(xs, d, out);
  }
  if (!any_requires_grad(xs)) return out;
  return make_function("cat", xs, {out}, [sizes, d](const std::vector<Tensor>& g) {
    std::vector<Tensor> gs(sizes.size());
    if (!g[0].defined()) return gs;
    int64_t off = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      gs[i] = g[0].narrow(d, off, sizes[i]);
      off += sizes[i];
    }
    return gs;
  })[0];
}

std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "split: undefined input");
  const int64_t d = wrap_dim(dim, x.dim(), "split", x.shape());
  DTRAIN_CHECK(split_size > 0, InvalidArgument, "split: split_size must be > 0, got {} (input {})",
               split_size, shape_str(x.shape()));
  const int64_t n = x.shape()[d];
  std::vector<Tensor> outs;
  Tensor base = x.detach();
  for (int64_t start = 0; start < n || (n == 0 && outs.empty()); start += split_size) {
    outs.push_back(base.narrow(d, start, std::min(split_size, n - start)));
  }
  if (!any_requires_grad({x})) return outs;
  std::vector<Shape> shapes;
  for (const Tensor& o : outs) shapes.push_back(o.shape());
  TensorOptions opts = x.options();
  return make_function("split", {x}, outs, [shapes, opts, d](const std::vector<Tensor>& g) {
    std::vector<Tensor> parts;
    for (size_t i = 0; i < shapes.size(); ++i) {
      parts.push_back(g[i].defined() ? g[i] : zeros(shapes[i], opts));
    }
    return std::vector<Tensor>{cat(parts, d)};
  });
}

}  // namespace dtrain
