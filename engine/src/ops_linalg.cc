// matmul and linear on OpenBLAS GEMM. Transposed views go to BLAS as transposes.
#include "cpu/blas.h"
#include "dtrain/engine/amp.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#include "dtrain/engine/cuda/runtime.h"
#endif

namespace dtrain {

namespace {

// A 2-D operand as BLAS sees it: pointer, leading dimension, transposed or not.
template <typename T>
struct GemmOperand {
  Tensor keep;  // holds a contiguous copy alive when one was needed
  const T* ptr;
  int64_t ld;
  bool trans;
};

template <typename T>
GemmOperand<T> as_operand(const Tensor& t) {
  const Shape& st = t.strides();
  int64_t rows = t.shape()[0], cols = t.shape()[1];
  if ((st[1] == 1 || cols == 1) && (st[0] >= std::max<int64_t>(cols, 1) || rows == 1)) {
    return {t, t.data<T>(), std::max<int64_t>(rows == 1 ? cols : st[0], 1), false};
  }
  if ((st[0] == 1 || rows == 1) && (st[1] >= std::max<int64_t>(rows, 1) || cols == 1)) {
    return {t, t.data<T>(), std::max<int64_t>(cols == 1 ? rows : st[1], 1), true};
  }
  Tensor c = t.clone();
  return {c, c.data<T>(), std::max<int64_t>(cols, 1), false};
}

// out[M,N] = a[M,K] @ b[K,N] (+ beta * out)
void gemm2d(const Tensor& a, const Tensor& b, Tensor& out, double beta) {
  DTRAIN_DISPATCH_FLOAT(a.dtype(), "matmul", [&] {
    auto A = as_operand<scalar_t>(a);
    auto B = as_operand<scalar_t>(b);
    int64_t m = a.shape()[0], k = a.shape()[1], n = b.shape()[1];
    cpu::gemm(A.trans, B.trans, m, n, k, scalar_t(1), A.ptr, A.ld, B.ptr, B.ld,
              static_cast<scalar_t>(beta), out.data<scalar_t>(), std::max<int64_t>(n, 1));
  });
}

Tensor matmul_nograd(const Tensor& a, const Tensor& b) {
#ifdef DTRAIN_WITH_CUDA
  if (a.device().is_cuda() || b.device().is_cuda()) {  // cuBLAS (ops_cuda.h)
    const cuda::MathMode mode =
        cuda::AllowTf32Guard::enabled() ? cuda::MathMode::kTf32 : cuda::MathMode::kStrict;
    if (a.dim() == 2) return cuda::matmul(a, b, mode);
    Tensor out = empty({a.shape()[0], a.shape()[1], b.shape()[2]}, a.options());
    for (int64_t i = 0; i < a.shape()[0]; ++i) {
      out.select(0, i).copy_(cuda::matmul(a.select(0, i), b.select(0, i), mode));
    }
    return out;
  }
#endif
  if (a.dim() == 2) {
    Tensor out = empty({a.shape()[0], b.shape()[1]}, a.options());
    if (a.shape()[1] == 0) {
      out.zero_();
    } else {
      gemm2d(a, b, out, 0.0);
    }
    return out;
  }
  int64_t bs = a.shape()[0];
  Tensor out = empty({bs, a.shape()[1], b.shape()[2]}, a.options());
  for (int64_t i = 0; i < bs; ++i) {
    Tensor o = out.select(0, i);
    if (a.shape()[2] == 0) {
      o.zero_();
    } else {
      gemm2d(a.select(0, i), b.select(0, i), o, 0.0);
    }
  }
  return out;
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  DTRAIN_CHECK(a.defined() && b.defined(), InvalidArgument, "matmul: undefined input");
  DTRAIN_CHECK(a.dtype() == b.dtype(), DTypeError, "matmul: dtypes differ ({} vs {})",
               dtype_name(a.dtype()), dtype_name(b.dtype()));
  bool two = a.dim() == 2 && b.dim() == 2;
  bool three = a.dim() == 3 && b.dim() == 3 && a.shape()[0] == b.shape()[0];
  DTRAIN_CHECK(two || three, ShapeError,
               "matmul: expected [M,K] x [K,N] or [B,M,K] x [B,K,N], got {} x {}",
               shape_str(a.shape()), shape_str(b.shape()));
  DTRAIN_CHECK(a.shape()[a.dim() - 1] == b.shape()[b.dim() - 2], ShapeError,
               "matmul: inner dimensions differ: {} x {}", shape_str(a.shape()),
               shape_str(b.shape()));
  Tensor out;
  {
    NoGradGuard ng;
    out = matmul_nograd(a, b);
  }
  if (!any_requires_grad({a, b})) return out;
  Tensor da = a.detach(), db = b.detach();
  bool ga = a.requires_grad(), gb = b.requires_grad();
  int64_t last = a.dim() - 1;
  return make_function(
      "matmul", {a, b}, {out}, [da, db, ga, gb, last](const std::vector<Tensor>& g) {
        Tensor gra = ga ? matmul_nograd(g[0], db.transpose(last - 1, last)) : Tensor();
        Tensor grb = gb ? matmul_nograd(da.transpose(last - 1, last), g[0]) : Tensor();
        return std::vector<Tensor>{gra, grb};
      })[0];
}

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  DTRAIN_CHECK(x.defined() && weight.defined(), InvalidArgument, "linear: undefined input");
  DTRAIN_CHECK(weight.dim() == 2, ShapeError, "linear: weight must be [out,in], got {}",
               shape_str(weight.shape()));
  int64_t in = weight.shape()[1], outf = weight.shape()[0];
  DTRAIN_CHECK(x.dim() >= 1 && x.shape()[x.dim() - 1] == in, ShapeError,
               "linear: expected input [...,{}], got {} (weight {})", in, shape_str(x.shape()),
               shape_str(weight.shape()));
  DTRAIN_CHECK(x.dtype() == weight.dtype(), DTypeError, "linear: input {} but weight {}",
               dtype_name(x.dtype()), dtype_name(weight.dtype()));
  if (bias.defined()) {
    DTRAIN_CHECK(bias.dim() == 1 && bias.shape()[0] == outf, ShapeError,
                 "linear: bias must be [{}], got {}", outf, shape_str(bias.shape()));
  }
  if (x.dtype() == DType::f32 && amp::AutocastGuard::dtype() != DType::f32) {  // amp.h
    return amp::autocast_linear(x, weight, bias, amp::AutocastGuard::dtype());
  }
  Shape out_shape = x.shape();
  out_shape.back() = outf;
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda() || weight.device().is_cuda()) {
    // Composed from differentiable ops on the device: x W^T (cuBLAS) + b.
    Tensor y = matmul(x.reshape({-1, in}), weight.t());
    if (bias.defined()) y = add(y, bias);
    return y.reshape(out_shape);
  }
#endif
  int64_t m = x.numel() / std::max<int64_t>(in, 1);
  if (in == 0) m = shape_numel(out_shape) / std::max<int64_t>(outf, 1);
  Tensor x2 = x.contiguous();
  Tensor w = weight.contiguous();
  Tensor out = empty(out_shape, x.options());
  DTRAIN_DISPATCH_FLOAT(x.dtype(), "linear", [&] {
    scalar_t* o = out.data<scalar_t>();
    scalar_t beta = 0;
    if (bias.defined()) {
      Tensor bc = bias.contiguous();
      const scalar_t* pb = bc.data<scalar_t>();
      for (int64_t i = 0; i < m; ++i) std::copy(pb, pb + outf, o + i * outf);
      beta = 1;
    } else if (in == 0) {
      out.zero_();
    }
    if (in > 0) {
      cpu::gemm(false, true, m, outf, in, scalar_t(1), x2.data<scalar_t>(), in, w.data<scalar_t>(),
                in, beta, o, outf);
    }
  });
  if (!any_requires_grad({x, weight, bias})) return out;
  bool gx = x.requires_grad(), gw = weight.requires_grad(),
       gb = bias.defined() && bias.requires_grad();
  Tensor sx = x2.detach(), sw = w.detach();
  Shape x_shape = x.shape();
  return make_function(
      "linear", {x, weight, bias}, {out},
      [sx, sw, gx, gw, gb, m, in, outf, x_shape](const std::vector<Tensor>& grads) {
        Tensor g = grads[0].contiguous();
        Tensor dx, dw, db;
        DTRAIN_DISPATCH_FLOAT(g.dtype(), "linear backward", [&] {
          const scalar_t* pg = g.data<scalar_t>();
          if (gx) {
            dx = empty(x_shape, g.options());
            if (outf == 0) dx.zero_();
            cpu::gemm(false, false, m, in, outf, scalar_t(1), pg, outf, sw.data<scalar_t>(), in,
                      scalar_t(0), dx.data<scalar_t>(), in);
          }
          if (gw) {
            dw = empty({outf, in}, g.options());
            if (m == 0) dw.zero_();
            cpu::gemm(true, false, outf, in, m, scalar_t(1), pg, outf, sx.data<scalar_t>(), in,
                      scalar_t(0), dw.data<scalar_t>(), in);
          }
          if (gb) db = sum(g.reshape({m, outf}), {0}, false);
        });
        return std::vector<Tensor>{dx, dw, db};
      })[0];
}

}  // namespace dtrain
