// The tensor-level CUDA backend (ops_cuda.h): tensors in, kernel launches out.
#include "cuda/ops_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/context.h"
#include "dtrain/engine/cuda/allocator.h"
#include "dtrain/engine/cuda/runtime.h"

namespace dtrain::cuda {

namespace {

void* stream_of(const Device& d) { return context(d.index).stream; }

Strided strided(const Shape& shape, const Shape& strides, const char* op) {
  DTRAIN_CHECK(shape.size() <= static_cast<size_t>(kMaxDims), UnsupportedError,
               "{} on CUDA: at most {} dimensions, got {}", op, kMaxDims, shape_str(shape));
  Strided g;
  g.nd = static_cast<int>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    g.shape[i] = shape[i];
    g.strides[i] = strides[i];
  }
  return g;
}
Strided strided(const Tensor& t, const char* op) { return strided(t.shape(), t.strides(), op); }

Strided contiguous_geom(int64_t n) {
  Strided g;
  g.nd = 1;
  g.shape[0] = n;
  g.strides[0] = 1;
  return g;
}

void sync(const Device& d) { DTRAIN_CUDA_CHECK(cudaStreamSynchronize(context(d.index).stream)); }

// A contiguous copy of device tensor t in dtype dt (t itself when it already is one).
Tensor contiguous_as(const Tensor& t, DType dt) {
  if (t.is_contiguous() && t.dtype() == dt) return t;
  Tensor out = empty(t.shape(), TensorOptions{dt, t.device()});
  gather(t.dtype(), t.raw_data(), strided(t, "copy"), dt, out.raw_data(), t.numel(),
         stream_of(t.device()));
  return out;
}

Tensor contig(const Tensor& t) { return contiguous_as(t.detach(), t.dtype()); }

}  // namespace

void check_same_device(const char* op, const std::vector<Tensor>& ts) {
  Device d;
  bool first = true;
  for (const Tensor& t : ts) {
    if (!t.defined()) continue;
    if (first) {
      d = t.device();
      first = false;
      continue;
    }
    DTRAIN_CHECK(t.device() == d, InvalidArgument,
                 "{}: inputs on different devices ({} and {}); move them with .to(device)", op,
                 d.str(), t.device().str());
  }
}

void fill(const Tensor& t, double value) {
  void* s = stream_of(t.device());
  if (t.is_contiguous()) {
    cuda::fill(t.dtype(), t.raw_data(), t.numel(), value, s);
    return;
  }
  Tensor tmp = empty(t.shape(), t.options());
  cuda::fill(t.dtype(), tmp.raw_data(), t.numel(), value, s);
  scatter(t.dtype(), tmp.raw_data(), t.raw_data(), strided(t, "fill_"), t.numel(), s);
}

void copy(const Tensor& dst, const Tensor& src) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const Device dd = dst.device(), sd = src.device();
  if (dd.is_cuda() && sd.is_cuda() && dd == sd) {
    void* s = stream_of(dd);
    if (dst.is_contiguous()) {
      gather(src.dtype(), src.raw_data(), strided(src, "copy_"), dst.dtype(), dst.raw_data(), n, s);
      return;
    }
    Tensor tmp = contiguous_as(src, dst.dtype());
    scatter(dst.dtype(), tmp.raw_data(), dst.raw_data(), strided(dst, "copy_"), n, s);
    return;
  }
  if (dd.is_cuda() && sd.is_cpu()) {
    // Convert and pack on the host, then one transfer.
    Tensor host = src;
    if (!src.is_contiguous() || src.dtype() != dst.dtype()) {
      host = empty(src.shape(), TensorOptions{dst.dtype(), Device::cpu()});
      host.copy_(src);
    }
    Tensor target = dst.is_contiguous() ? dst : empty(dst.shape(), dst.options());
    void* s = stream_of(dd);
    DTRAIN_CUDA_CHECK(cudaMemcpyAsync(target.raw_data(), host.raw_data(), dst.nbytes(),
                                      cudaMemcpyHostToDevice, static_cast<cudaStream_t>(s)));
    if (!dst.is_contiguous()) {
      scatter(dst.dtype(), target.raw_data(), dst.raw_data(), strided(dst, "copy_"), n, s);
    }
    sync(dd);  // the host buffer may be pageable and temporary
    return;
  }
  if (dd.is_cpu() && sd.is_cuda()) {
    Tensor dev = contiguous_as(src, dst.dtype());
    Tensor host = dst.is_contiguous() ? dst : empty(dst.shape(), dst.options());
    DTRAIN_CUDA_CHECK(cudaMemcpyAsync(host.raw_data(), dev.raw_data(), dst.nbytes(),
                                      cudaMemcpyDeviceToHost,
                                      static_cast<cudaStream_t>(stream_of(sd))));
    sync(sd);
    if (!dst.is_contiguous()) Tensor(dst).copy_(host);  // a handle: writes dst's storage
    return;
  }
  // cuda:i -> cuda:j: through the host (peer copies are not needed by the engine).
  Tensor host = src.to(Device::cpu());
  copy(dst, host);
}

Tensor to_device_async(const Tensor& host, const Device& device) {
  DTRAIN_CHECK(host.device().is_cpu() && device.is_cuda(), InvalidArgument,
               "to_device_async: expected a host tensor and a CUDA device, got {} -> {}",
               host.device().str(), device.str());
  Tensor src = host.contiguous();
  const size_t nbytes = src.nbytes();
  Tensor out = empty(src.shape(), TensorOptions{src.dtype(), device});
  if (nbytes == 0) return out;
  DeviceContext& ctx = context(device.index);
  Storage staging(nbytes, pinned_allocator());  // back to the pinned cache on return
  std::memcpy(staging.data(), src.raw_data(), nbytes);
  cudaEvent_t compute_done = nullptr, copied = nullptr;
  DTRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done, cudaEventDisableTiming));
  DTRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&copied, cudaEventDisableTiming));
  DTRAIN_CUDA_CHECK(cudaEventRecord(compute_done, ctx.stream));
  DTRAIN_CUDA_CHECK(cudaStreamWaitEvent(ctx.copy_stream, compute_done, 0));
  DTRAIN_CUDA_CHECK(cudaMemcpyAsync(out.raw_data(), staging.data(), nbytes, cudaMemcpyHostToDevice,
                                    ctx.copy_stream));
  DTRAIN_CUDA_CHECK(cudaEventRecord(copied, ctx.copy_stream));
  DTRAIN_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream, copied, 0));
  DTRAIN_CUDA_CHECK(cudaStreamSynchronize(ctx.copy_stream));  // staging may be reused now
  DTRAIN_CUDA_CHECK(cudaEventDestroy(compute_done));
  DTRAIN_CUDA_CHECK(cudaEventDestroy(copied));
  return out;
}

Tensor unary(UnaryOp op, const Tensor& x, double alpha, double beta) {
  Tensor xc = contig(x);
  Tensor y = empty(x.shape(), x.options());
  cuda::unary(op, x.dtype(), xc.raw_data(), y.raw_data(), x.numel(), alpha, beta,
              stream_of(x.device()));
  return y;
}

Tensor activation_backward(ActivationBwd op, const Tensor& dy, const Tensor& y) {
  check_same_device("activation backward", {dy, y});
  Tensor dyc = contiguous_as(dy, y.dtype());
  Tensor yc = contig(y);
  Tensor dx = empty(y.shape(), y.options());
  cuda::activation_backward(op, y.dtype(), dyc.raw_data(), yc.raw_data(), dx.raw_data(), y.numel(),
                            stream_of(y.device()));
  return dx;
}

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b, const Shape& out_shape) {
  check_same_device("binary op", {a, b});
  auto bstrides = [&](const Tensor& t) {
    Shape st(out_shape.size(), 0);
    size_t off = out_shape.size() - t.shape().size();
    for (size_t i = 0; i < t.shape().size(); ++i) {
      st[off + i] = t.shape()[i] == 1 ? 0 : t.strides()[i];
    }
    return strided(out_shape, st, "binary op");
  };
  Tensor out = empty(out_shape, a.options());
  int64_t n = out.numel();
  bool flat = a.is_contiguous() && b.is_contiguous() && a.numel() == n && b.numel() == n;
  Strided ga = flat ? contiguous_geom(n) : bstrides(a);
  Strided gb = flat ? contiguous_geom(n) : bstrides(b);
  cuda::binary(op, a.dtype(), a.raw_data(), ga, b.raw_data(), gb, out.raw_data(), n,
               stream_of(a.device()));
  return out;
}

Tensor sum(const Tensor& x, const std::vector<bool>& mask, const Shape& kept) {
  Shape ks, kst, rs, rst;
  for (size_t i = 0; i < mask.size(); ++i) {
    (mask[i] ? rs : ks).push_back(x.shape()[i]);
    (mask[i] ? rst : kst).push_back(x.strides()[i]);
  }
  Tensor out = empty(kept, x.options());
  cuda::reduce_sum(x.dtype(), x.raw_data(), strided(ks, kst, "sum"), strided(rs, rst, "sum"),
                   out.raw_data(), shape_numel(ks), shape_numel(rs), stream_of(x.device()));
  return out;
}

int64_t count_nonfinite(const Tensor& x) {
  Tensor xc = contig(x);
  Tensor count = zeros({}, TensorOptions{DType::i32, x.device()});
  cuda::count_nonfinite(x.dtype(), xc.raw_data(), x.numel(), count.data<int32_t>(),
                        stream_of(x.device()));
  return static_cast<int64_t>(count.item());
}

Tensor softmax_forward(const Tensor& x, int64_t outer, int64_t c, int64_t inner, bool log) {
  Tensor xc = contig(x);
  Tensor y = empty(x.shape(), x.options());
  cuda::softmax_forward(x.dtype(), xc.raw_data(), y.raw_data(), outer, c, inner, log,
                        stream_of(x.device()));
  return y;
}

Tensor softmax_backward(const Tensor& dy, const Tensor& y, int64_t outer, int64_t c, int64_t inner,
                        bool log) {
  check_same_device("softmax backward", {dy, y});
  Tensor dyc = contiguous_as(dy, y.dtype());
  Tensor dx = empty(y.shape(), y.options());
  cuda::softmax_backward(y.dtype(), dyc.raw_data(), contig(y).raw_data(), dx.raw_data(), outer, c,
                         inner, log, stream_of(y.device()));
  return dx;
}

CrossEntropyResult cross_entropy(const Tensor& logits, const Tensor& target, bool want_probs) {
  check_same_device("cross_entropy", {logits, target});
  const int64_t n = logits.shape()[0], c = logits.shape()[1];
  Tensor xc = contig(logits), tc = contig(target);
  CrossEntropyResult r;
  if (want_probs) r.probs = empty(logits.shape(), logits.options());
  Tensor row_loss = empty({n}, logits.options());
  Tensor bad = full({}, -1.0, TensorOptions{DType::i64, logits.device()});
  void* s = stream_of(logits.device());
  cuda::cross_entropy_forward(logits.dtype(), xc.raw_data(), tc.data<int64_t>(), n, c,
                              want_probs ? r.probs.raw_data() : nullptr, row_loss.raw_data(),
                              bad.data<int64_t>(), s);
  int64_t bad_row = static_cast<int64_t>(bad.item());
  if (bad_row >= 0) {
    int64_t t = static_cast<int64_t>(tc.narrow(0, bad_row, 1).item());
    DTRAIN_THROW(InvalidArgument,
                 "cross_entropy: target {} at position {} is out of range for {} classes "
                 "(expected a class index in [0,{}))",
                 t, bad_row, c, c);
  }
  Tensor total = sum(row_loss, {true}, Shape{1});
  r.loss = unary(UnaryOp::kAffine, total, 1.0 / static_cast<double>(n), 0.0).reshape({});
  return r;
}

Tensor cross_entropy_backward(const Tensor& probs, const Tensor& target, double scale) {
  Tensor dx = empty(probs.shape(), probs.options());
  cuda::cross_entropy_backward(probs.dtype(), probs.raw_data(), contig(target).data<int64_t>(),
                               probs.shape()[0], probs.shape()[1], scale, dx.raw_data(),
                               stream_of(probs.device()));
  return dx;
}

Tensor embedding(const Tensor& weight, const Tensor& indices, const Shape& out_shape) {
  check_same_device("embedding", {weight, indices});
  Tensor wc = contig(weight), ic = contig(indices);
  const int64_t v = weight.shape()[0], d = weight.shape()[1], n = indices.numel();
  Tensor out = empty(out_shape, weight.options());
  Tensor bad = full({}, -1.0, TensorOptions{DType::i64, weight.device()});
  cuda::embedding_forward(weight.dtype(), wc.raw_data(), ic.data<int64_t>(), n, d, v,
                          out.raw_data(), bad.data<int64_t>(), stream_of(weight.device()));
  int64_t pos = static_cast<int64_t>(bad.item());
  if (pos >= 0) {
    int64_t idx = static_cast<int64_t>(ic.reshape({n}).narrow(0, pos, 1).item());
    DTRAIN_THROW(InvalidArgument,
                 "embedding: index {} at position {} is out of range for a table of {} rows", idx,
                 pos, v);
  }
  return out;
}

Tensor embedding_backward(const Tensor& dy, const Tensor& indices, const Shape& weight_shape) {
  Tensor dw = zeros(weight_shape, dy.options());
  Tensor dyc = contig(dy), ic = contig(indices);
  cuda::embedding_backward(dy.dtype(), dyc.raw_data(), ic.data<int64_t>(), indices.numel(),
                           weight_shape[1], weight_shape[0], dw.raw_data(), stream_of(dy.device()));
  return dw;
}

std::pair<Tensor, Tensor> dropout(const Tensor& x, const fn::DropoutMask& m) {
  Tensor xc = contig(x);
  Tensor y = empty(x.shape(), x.options()), mask = empty(x.shape(), x.options());
  cuda::dropout(x.dtype(), xc.raw_data(), y.raw_data(), mask.raw_data(), x.numel(), m,
                stream_of(x.device()));
  return {y, mask};
}

void gemm(const Device& device, DType dt, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb, double beta, void* out,
          int64_t ldc, MathMode mode) {
  if (m == 0 || n == 0) return;
  DeviceContext& ctx = context(device.index);
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  cublasOperation_t ob = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t oa = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  auto i32 = [](int64_t v) {
    DTRAIN_CHECK(v <= 2147483647, UnsupportedError, "gemm on CUDA: dimension {} exceeds 2^31-1", v);
    return static_cast<int>(v);
  };
  if (dt == DType::f64) {
    double alpha = 1.0;
    DTRAIN_CUBLAS_CHECK(cublasDgemm(
        ctx.cublas, ob, oa, i32(n), i32(m), i32(k), &alpha, static_cast<const double*>(b), i32(ldb),
        static_cast<const double*>(a), i32(lda), &beta, static_cast<double*>(out), i32(ldc)));
    return;
  }
  cudaDataType_t type;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  switch (dt) {
    case DType::f32:
      type = CUDA_R_32F;
      if (mode == MathMode::kTf32) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
      break;
    case DType::f16:
      type = CUDA_R_16F;
      break;
    case DType::bf16:
      type = CUDA_R_16BF;
      break;
    default:
      DTRAIN_THROW(DTypeError, "matmul on CUDA: unsupported dtype {}", dtype_name(dt));
  }
  float alpha = 1.f, beta_f = static_cast<float>(beta);
  DTRAIN_CUBLAS_CHECK(cublasGemmEx(ctx.cublas, ob, oa, i32(n), i32(m), i32(k), &alpha, b, type,
                                   i32(ldb), a, type, i32(lda), &beta_f, out, type, i32(ldc),
                                   compute, CUBLAS_GEMM_DEFAULT));
}

Tensor matmul(const Tensor& a, const Tensor& b, MathMode mode) {
  check_same_device("matmul", {a, b});
  // A 2-D operand as cuBLAS sees it: row-major with a leading dimension, or transposed.
  struct Operand {
    Tensor keep;
    bool trans;
    int64_t ld;
  };
  auto as_operand = [](const Tensor& t) {
    const Shape& st = t.strides();
    int64_t rows = t.shape()[0], cols = t.shape()[1];
    if ((st[1] == 1 || cols == 1) && (st[0] >= std::max<int64_t>(cols, 1) || rows == 1)) {
      return Operand{t, false, std::max<int64_t>(rows == 1 ? cols : st[0], 1)};
    }
    if ((st[0] == 1 || rows == 1) && (st[1] >= std::max<int64_t>(rows, 1) || cols == 1)) {
      return Operand{t, true, std::max<int64_t>(cols == 1 ? rows : st[1], 1)};
    }
    Tensor c = contig(t);
    return Operand{c, false, std::max<int64_t>(cols, 1)};
  };
  Operand A = as_operand(a), B = as_operand(b);
  const int64_t m = a.shape()[0], k = a.shape()[1], n = b.shape()[1];
  Tensor out = empty({m, n}, a.options());
  if (k == 0) {
    out.zero_();
    return out;
  }
  gemm(a.device(), a.dtype(), A.trans, B.trans, m, n, k, A.keep.raw_data(), A.ld, B.keep.raw_data(),
       B.ld, 0.0, out.raw_data(), std::max<int64_t>(n, 1), mode);
  return out;
}

// ---- transformer ops ----

namespace {
// Statistics (layer-norm mean/rstd, attention lse and D) are f64 for f64, else f32.
DType stat_dtype(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }
const void* data_or_null(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }
}  // namespace

LayerNormResult layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                   int64_t rows, int64_t d, double eps) {
  check_same_device("layer_norm", {x, weight, bias});
  Tensor xc = contig(x);
  Tensor wc = weight.defined() ? contig(weight) : Tensor();
  Tensor bc = bias.defined() ? contig(bias) : Tensor();
  LayerNormResult r;
  r.y = empty(x.shape(), x.options());
  r.mean = empty({rows}, TensorOptions{stat_dtype(x.dtype()), x.device()});
  r.rstd = empty({rows}, TensorOptions{stat_dtype(x.dtype()), x.device()});
  cuda::layer_norm_forward(x.dtype(), xc.raw_data(), data_or_null(wc), data_or_null(bc), rows, d,
                           eps, r.y.raw_data(), r.mean.raw_data(), r.rstd.raw_data(),
                           stream_of(x.device()));
  return r;
}

std::vector<Tensor> layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                        const Tensor& rstd, const Tensor& weight, int64_t rows,
                                        int64_t d, bool gx, bool gw, bool gb) {
  check_same_device("layer_norm backward", {dy, x, weight});
  Tensor dyc = contiguous_as(dy, x.dtype()), xc = contig(x);
  Tensor wc = weight.defined() ? contig(weight) : Tensor();
  Tensor dx = gx ? empty(x.shape(), x.options()) : Tensor();
  Tensor dw = gw ? empty({d}, x.options()) : Tensor();
  Tensor db = gb ? empty({d}, x.options()) : Tensor();
  Tensor partial;
  if (gw || gb) {
    partial = empty({layer_norm_partial_rows(rows), 2, d},
                    TensorOptions{stat_dtype(x.dtype()), x.device()});
  }
  cuda::layer_norm_backward(
      x.dtype(), dyc.raw_data(), xc.raw_data(), mean.raw_data(), rstd.raw_data(), data_or_null(wc),
      rows, d, gx ? dx.raw_data() : nullptr, gw ? dw.raw_data() : nullptr,
      gb ? db.raw_data() : nullptr, partial.defined() ? partial.raw_data() : nullptr,
      stream_of(x.device()));
  return {dx, dw, db};
}

Tensor gelu_forward(const Tensor& x) {
  Tensor xc = contig(x);
  Tensor y = empty(x.shape(), x.options());
  cuda::gelu_forward(x.dtype(), xc.raw_data(), y.raw_data(), x.numel(), stream_of(x.device()));
  return y;
}

Tensor gelu_backward(const Tensor& dy, const Tensor& x) {
  check_same_device("gelu backward", {dy, x});
  Tensor dyc = contiguous_as(dy, x.dtype()), xc = contig(x);
  Tensor dx = empty(x.shape(), x.options());
  cuda::gelu_backward(x.dtype(), dyc.raw_data(), xc.raw_data(), dx.raw_data(), x.numel(),
                      stream_of(x.device()));
  return dx;
}

namespace {
// Throws UnsupportedError when the attention kernels' tiles for this head size do not
// fit the device's shared memory.
void check_attention_smem(const Tensor& q) {
  const int64_t dh = q.shape()[3];
  const int64_t need = attention_shared_bytes(q.dtype(), dh);
  int limit = 0;
  DTRAIN_CUDA_CHECK(
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.device().index));
  DTRAIN_CHECK(need <= limit, UnsupportedError,
               "scaled_dot_product_attention on CUDA: head dimension {} ({}) needs {} bytes of "
               "shared memory, the device allows {}",
               dh, dtype_name(q.dtype()), need, limit);
}
}  // namespace

AttentionResult attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  check_same_device("scaled_dot_product_attention", {q, k, v});
  check_attention_smem(q);
  const Shape& s = q.shape();
  Tensor qc = contig(q), kc = contig(k), vc = contig(v);
  AttentionResult r;
  r.out = empty(s, q.options());
  r.lse = empty({s[0], s[1], s[2]}, TensorOptions{stat_dtype(q.dtype()), q.device()});
  cuda::attention_forward(q.dtype(), qc.raw_data(), kc.raw_data(), vc.raw_data(), s[0] * s[1], s[2],
                          s[3], causal, 1.0 / std::sqrt(static_cast<double>(s[3])),
                          r.out.raw_data(), r.lse.raw_data(), stream_of(q.device()));
  return r;
}

std::vector<Tensor> attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                       bool causal) {
  check_same_device("scaled_dot_product_attention backward", {dout, q, k, v});
  const Shape& s = q.shape();
  Tensor qc = contig(q), kc = contig(k), vc = contig(v), oc = contig(out);
  Tensor doc = contiguous_as(dout, q.dtype());
  Tensor dq = empty(s, q.options()), dk = empty(s, q.options()), dv = empty(s, q.options());
  Tensor dvec = empty({s[0], s[1], s[2]}, TensorOptions{stat_dtype(q.dtype()), q.device()});
  cuda::attention_backward(q.dtype(), qc.raw_data(), kc.raw_data(), vc.raw_data(), oc.raw_data(),
                           lse.raw_data(), doc.raw_data(), s[0] * s[1], s[2], s[3], causal,
                           1.0 / std::sqrt(static_cast<double>(s[3])), dq.raw_data(), dk.raw_data(),
                           dv.raw_data(), dvec.raw_data(), stream_of(q.device()));
  return {dq, dk, dv};
}

void sgd_update(const Tensor& p, const Tensor& g, const Tensor& buf, const fn::SgdUpdate& u) {
  check_same_device("sgd step", {p, g, buf});
  Tensor gc = contiguous_as(g, p.dtype());
  cuda::sgd_update(p.dtype(), p.raw_data(), gc.raw_data(), buf.defined() ? buf.raw_data() : nullptr,
                   p.numel(), u, stream_of(p.device()));
}

void adam_update(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v,
                 const fn::AdamUpdate& u) {
  check_same_device("adam step", {p, g, m, v});
  Tensor gc = contiguous_as(g, p.dtype());
  cuda::adam_update(p.dtype(), p.raw_data(), gc.raw_data(), m.raw_data(), v.raw_data(), p.numel(),
                    u, stream_of(p.device()));
}

}  // namespace dtrain::cuda
