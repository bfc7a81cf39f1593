// Launchers of dtrain's own CUDA kernels, as plain C++ declarations over raw device
// pointers (no CUDA types, no tensors), so .cc front ends call them and only the .cu
// files see nvcc. Every launcher enqueues on `stream` (a cudaStream_t) and returns
// without waiting; launch errors are thrown as dtrain errors.
//
// Element types: the floating launchers take f32, f64, f16 and bf16. Half types are
// loaded into float, computed in float with the shared functors of
// dtrain/engine/functors.h, and rounded once on store (the CPU backend computes the
// same functors in f32/f64, so the tests compare like with like). Sums accumulate in
// double, softmax rows in the compute type, with the combine steps of functors.h
// (fn::Add, fn::Max).
#pragma once

#include <cstdint>

#include "dtrain/common/dtype.h"
#include "dtrain/engine/functors.h"

namespace dtrain::cuda {

constexpr int kMaxDims = 8;

// Implemented in runtime.cc (C++, where fmt builds the dtrain error).
[[noreturn]] void throw_unsupported_dtype(const char* op, DType dt);
void check_launch(const char* op);  // throws when the last launch failed

// A strided view: nd dims of `shape` walked in row-major order with `strides`
// (elements). Dims of stride 0 broadcast.
struct Strided {
  int nd = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
};

// ---- memory ----
// p[0..n) = value, any dtype.
void fill(DType dt, void* p, int64_t n, double value, void* stream);
// dst[i] = convert(src at the i-th row-major position of g); floating <-> floating, or
// the same dtype for integers. dst is contiguous.
void gather(DType src_dt, const void* src, const Strided& g, DType dst_dt, void* dst, int64_t n,
            void* stream);
// dst at the i-th row-major position of g = src[i], same dtype (copy_ into a view).
void scatter(DType dt, const void* src, void* dst, const Strided& g, int64_t n, void* stream);

// ---- elementwise ----
enum class UnaryOp : int { kAffine, kExp, kLog, kRelu, kTanh, kSigmoid };
// y = op(x) over n contiguous elements; kAffine is alpha * x + beta.
void unary(UnaryOp op, DType dt, const void* x, void* y, int64_t n, double alpha, double beta,
           void* stream);
enum class ActivationBwd : int { kRelu, kTanh, kSigmoid };
// dx = bwd(dy, y), y the saved forward output.
void activation_backward(ActivationBwd op, DType dt, const void* dy, const void* y, void* dx,
                         int64_t n, void* stream);
enum class BinaryOp : int { kAdd, kSub, kMul, kDiv };
// out (contiguous, shape of ga/gb) = op(a, b); ga/gb give a's and b's strides over the
// output shape (0 on broadcast dims).
void binary(BinaryOp op, DType dt, const void* a, const Strided& ga, const void* b,
            const Strided& gb, void* out, int64_t n, void* stream);

// ---- reductions ----
// out[j] = sum of x over the reduced dims: `kept` walks the output elements (strides into
// x), `reduced` walks the elements summed into one output. x and out have dtype dt.
void reduce_sum(DType dt, const void* x, const Strided& kept, const Strided& reduced, void* out,
                int64_t n_out, int64_t n_reduced, void* stream);
// *count (device int) += number of NaN/inf elements of x.
void count_nonfinite(DType dt, const void* x, int64_t n, int* count, void* stream);

// ---- softmax and cross-entropy over [outer, c, inner] ----
void softmax_forward(DType dt, const void* x, void* y, int64_t outer, int64_t c, int64_t inner,
                     bool log, void* stream);
void softmax_backward(DType dt, const void* dy, const void* y, void* dx, int64_t outer, int64_t c,
                      int64_t inner, bool log, void* stream);
// Row r of logits x [n, c]: row_loss[r] (f32 or f64 by dt) = logsumexp - x[target]; probs
// (nullable) = softmax. *bad (device int64, init -1) gets a row with an out-of-range target.
void cross_entropy_forward(DType dt, const void* x, const int64_t* target, int64_t n, int64_t c,
                           void* probs, void* row_loss, int64_t* bad, void* stream);
// dx = (probs - onehot(target)) * scale.
void cross_entropy_backward(DType dt, const void* probs, const int64_t* target, int64_t n,
                            int64_t c, double scale, void* dx, void* stream);

// ---- embedding and dropout ----
// out[i, :] = w[idx[i], :]; *bad (device int64, init -1) gets a position with an index
// outside [0, v).
void embedding_forward(DType dt, const void* w, const int64_t* idx, int64_t n, int64_t d, int64_t v,
                       void* out, int64_t* bad, void* stream);
// dw[idx[i], :] += dy[i, :] (atomic; f32 and f64). dw must be zeroed.
void embedding_backward(DType dt, const void* dy, const int64_t* idx, int64_t n, int64_t d,
                        int64_t v, void* dw, void* stream);
// mask[i] = fn::DropoutMask{seed, p}(i) (0 or 1/(1-p)), y = x * mask.
void dropout(DType dt, const void* x, void* y, void* mask, int64_t n, const fn::DropoutMask& m,
             void* stream);

// ---- transformer ops (transformer.cu, attention.cu) ----
// Layer norm over rows of d contiguous elements: y = LayerNormFwd(x, mean, rstd, w, b);
// w/b nullable (ones/zeros). mean/rstd [rows] have the stat dtype (f64 for f64, else f32).
void layer_norm_forward(DType dt, const void* x, const void* w, const void* b, int64_t rows,
                        int64_t d, double eps, void* y, void* mean, void* rstd, void* stream);
// dx (nullable) = LayerNormBwd per row; dw/db (nullable) = column sums of dy * xhat and dy.
// `partial` is device scratch of layer_norm_partial_rows(rows) * 2 * d stat-dtype elements.
void layer_norm_backward(DType dt, const void* dy, const void* x, const void* mean,
                         const void* rstd, const void* w, int64_t rows, int64_t d, void* dx,
                         void* dw, void* db, void* partial, void* stream);
int64_t layer_norm_partial_rows(int64_t rows);
// y = GeluFwd(x); dx = GeluBwd(dy, x), over n contiguous elements.
void gelu_forward(DType dt, const void* x, void* y, int64_t n, void* stream);
void gelu_backward(DType dt, const void* dy, const void* x, void* dx, int64_t n, void* stream);
// Attention over bh = B*H contiguous heads of [t, dh]: out [bh, t, dh], lse [bh, t] (stat
// dtype). The caller checks attention_shared_bytes(dt, dh) against the device's limit.
void attention_forward(DType dt, const void* q, const void* k, const void* v, int64_t bh, int64_t t,
                       int64_t dh, bool causal, double scale, void* out, void* lse, void* stream);
// dq, dk, dv (overwritten); `dvec` is device scratch of bh * t stat-dtype elements.
void attention_backward(DType dt, const void* q, const void* k, const void* v, const void* out,
                        const void* lse, const void* dout, int64_t bh, int64_t t, int64_t dh,
                        bool causal, double scale, void* dq, void* dk, void* dv, void* dvec,
                        void* stream);
// The most dynamic shared memory (bytes) any attention kernel needs for head size dh.
int64_t attention_shared_bytes(DType dt, int64_t dh);

// ---- fused optimizer updates (one kernel per parameter tensor) ----
void sgd_update(DType dt, void* p, const void* g, void* buf, int64_t n, const fn::SgdUpdate& u,
                void* stream);
void adam_update(DType dt, void* p, const void* g, void* m, void* v, int64_t n,
                 const fn::AdamUpdate& u, void* stream);

}  // namespace dtrain::cuda
