// scaled_dot_product_attention: checks, the CPU/CUDA dispatch and the autograd node.
//
// The CPU kernel is cpu/attention.h (fused, BLAS inner products, per-row log-sum-exp
// saved instead of the probabilities); the CUDA kernels are cuda/attention.cu (hand
// written, one block per (batch*head, tile)). Both save only q, k, v, out and lse
// [B,H,T] for backward. The backward is a kernel, not recorded ops (no double backward).
#include <cmath>

#include "cpu/attention.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

constexpr const char* kOp = "scaled_dot_product_attention";

void check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  DTRAIN_CHECK(q.defined() && k.defined() && v.defined(), InvalidArgument, "{}: undefined input",
               kOp);
  DTRAIN_CHECK(q.dim() == 4 && k.shape() == q.shape() && v.shape() == q.shape(), ShapeError,
               "{}: expected q, k, v of one shape [B,H,T,Dh], got q {} k {} v {}", kOp,
               shape_str(q.shape()), shape_str(k.shape()), shape_str(v.shape()));
  DTRAIN_CHECK(q.shape()[3] > 0, ShapeError, "{}: head dimension is 0 (q {})", kOp,
               shape_str(q.shape()));
  DTRAIN_CHECK(is_floating(q.dtype()) && k.dtype() == q.dtype() && v.dtype() == q.dtype(),
               DTypeError, "{}: expected q, k, v of one floating dtype, got {} {} {}", kOp,
               dtype_name(q.dtype()), dtype_name(k.dtype()), dtype_name(v.dtype()));
  DTRAIN_CHECK(k.device() == q.device() && v.device() == q.device(), InvalidArgument,
               "{}: q, k, v on different devices ({}, {}, {})", kOp, q.device().str(),
               k.device().str(), v.device().str());
}

// t itself when its rows are BLAS-addressable (unit stride in Dh, rows >= Dh apart),
// else a contiguous copy. Detached: the kernel reads raw memory.
Tensor blas_view(const Tensor& t) {
  const Shape& st = t.strides();
  const int64_t rows = t.shape()[2], dh = t.shape()[3];
  bool ok = (dh == 1 || st[3] == 1) && (rows == 1 || st[2] >= dh);
  return ok ? t.detach() : t.detach().contiguous();
}

template <typename T>
cpu::AttentionOperand<T> operand(const Tensor& t) {
  const Shape& st = t.strides();
  return {t.data<T>(), st[0], st[1], t.shape()[2] == 1 ? t.shape()[3] : st[2]};
}

cpu::AttentionGeom geometry(const Tensor& q, bool causal) {
  const Shape& s = q.shape();
  return {s[0], s[1], s[2], s[3], causal, 1.0 / std::sqrt(static_cast<double>(s[3]))};
}

struct Saved {
  Tensor q, k, v, out, lse;
  bool causal;
};

std::vector<Tensor> attention_backward(const Saved& s, const Tensor& dout) {
#ifdef DTRAIN_WITH_CUDA
  if (s.q.device().is_cuda()) {
    return cuda::attention_backward(dout, s.q, s.k, s.v, s.out, s.lse, s.causal);
  }
#endif
  Tensor doc = dout.contiguous();
  Tensor dq = empty(s.q.shape(), s.q.options()), dk = empty(s.q.shape(), s.q.options()),
         dv = empty(s.q.shape(), s.q.options());
  DTRAIN_DISPATCH_FLOAT(s.q.dtype(), kOp, [&] {
    cpu::attention_backward<scalar_t>(
        geometry(s.q, s.causal), operand<scalar_t>(s.q), operand<scalar_t>(s.k),
        operand<scalar_t>(s.v), s.out.data<scalar_t>(), s.lse.data<scalar_t>(),
        doc.data<scalar_t>(), dq.data<scalar_t>(), dk.data<scalar_t>(), dv.data<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                    bool causal) {
  check_attention_inputs(q, k, v);
  Saved s{Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), causal};
#ifdef DTRAIN_WITH_CUDA
  if (q.device().is_cuda()) {
    s.q = q.detach().contiguous();  // the kernels read contiguous heads; backward reuses them
    s.k = k.detach().contiguous();
    s.v = v.detach().contiguous();
    cuda::AttentionResult r = cuda::attention_forward(s.q, s.k, s.v, causal);
    s.out = r.out;
    s.lse = r.lse;
  }
#endif
  if (!s.out.defined()) {
    s.q = blas_view(q);
    s.k = blas_view(k);
    s.v = blas_view(v);
    const Shape& sh = q.shape();
    s.out = empty(sh, q.options());
    s.lse = empty({sh[0], sh[1], sh[2]}, q.options());
    DTRAIN_DISPATCH_FLOAT(q.dtype(), kOp, [&] {
      cpu::attention_forward<scalar_t>(geometry(q, causal), operand<scalar_t>(s.q),
                                       operand<scalar_t>(s.k), operand<scalar_t>(s.v),
                                       s.out.data<scalar_t>(), s.lse.data<scalar_t>());
    });
  }
  if (!any_requires_grad({q, k, v})) return s.out;
  Tensor out = s.out;
  s.out = out.detach();
  return make_function(kOp, {q, k, v}, {out}, [s](const std::vector<Tensor>& g) {
    if (!g[0].defined()) return std::vector<Tensor>{Tensor(), Tensor(), Tensor()};
    return attention_backward(s, g[0]);
  })[0];
}

}  // namespace dtrain
