// The tensor-level CUDA backend: what the op front ends (engine/src/ops_*.cc,
// tensor.cc, optim/) call when a tensor lives on a CUDA device. Each function checks
// what only the device path needs (same device, supported dtype), makes inputs
// contiguous where a kernel needs it, allocates outputs from the device's caching
// allocator and enqueues on the device's compute stream (runtime.h). Shape checks
// and autograd stay in the front ends, shared with the CPU path.
//
// Compiled only with the CUDA backend (DTRAIN_WITH_CUDA).
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/conv.h"
#include "cuda/kernels.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::cuda {

// Throws DTypeError/InvalidArgument unless every defined tensor is on `device`.
void check_same_device(const char* op, const std::vector<Tensor>& ts);

// ---- memory ----
void fill(const Tensor& t, double value);
// dst = src (converted), any strides; cpu <-> cuda or cuda <-> cuda. Waits for the copy
// when the host side is involved.
void copy(const Tensor& dst, const Tensor& src);

// A device copy of host tensor `host` through pinned memory on the device's copy stream:
// the copy first waits for the compute stream (the destination block may be a recycled
// one still in use there), the compute stream then waits for the copy (an event), and
// the calling thread waits for the copy before the pinned buffer is reused. Meant for
// the DataLoader's prefetch thread, where that wait overlaps the trainer's compute.
Tensor to_device_async(const Tensor& host, const Device& device);

// ---- elementwise ----
Tensor unary(UnaryOp op, const Tensor& x, double alpha = 1.0, double beta = 0.0);
Tensor activation_backward(ActivationBwd op, const Tensor& dy, const Tensor& y);
Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b, const Shape& out_shape);

// ---- reductions ----
// Sums x over the dims where mask is true into a tensor of shape `kept` (1 there).
Tensor sum(const Tensor& x, const std::vector<bool>& mask, const Shape& kept);
// Number of NaN/inf elements (waits for the result).
int64_t count_nonfinite(const Tensor& x);

// ---- softmax and cross-entropy ----
Tensor softmax_forward(const Tensor& x, int64_t outer, int64_t c, int64_t inner, bool log);
Tensor softmax_backward(const Tensor& dy, const Tensor& y, int64_t outer, int64_t c, int64_t inner,
                        bool log);
struct CrossEntropyResult {
  Tensor loss;   // scalar, mean over rows
  Tensor probs;  // [N, C] softmax when requested
};
// Throws InvalidArgument naming the first offending row when a target is out of range.
CrossEntropyResult cross_entropy(const Tensor& logits, const Tensor& target, bool want_probs);
Tensor cross_entropy_backward(const Tensor& probs, const Tensor& target, double scale);

// ---- embedding, dropout ----
Tensor embedding(const Tensor& weight, const Tensor& indices, const Shape& out_shape);
Tensor embedding_backward(const Tensor& dy, const Tensor& indices, const Shape& weight_shape);
// {y, mask}
std::pair<Tensor, Tensor> dropout(const Tensor& x, const fn::DropoutMask& m);

// ---- convolution and max pooling (cuDNN), NCHW, geometry checked by the front end ----
// Strict f32 math (no TF32) for f32; f16/bf16 on the tensor cores; f64 in f64.
Tensor conv2d_forward(const Tensor& x, const Tensor& w, const Tensor& b, const cpu::ConvGeom& g);
// {dx, dw, db}; each only when asked for (gx, gw, gb).
std::vector<Tensor> conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                    const cpu::ConvGeom& g, bool gx, bool gw, bool gb);
Tensor max_pool2d_forward(const Tensor& x, const cpu::PoolGeom& g);
Tensor max_pool2d_backward(const Tensor& dy, const Tensor& x, const Tensor& y,
                           const cpu::PoolGeom& g);

// ---- LSTM (cuDNN RNN API), one layer, batch_first, PyTorch's gate order i, f, g, o ----
struct LstmState;  // descriptors, weight and reserve space of one forward, for backward
struct LstmForward {
  Tensor output, h_n, c_n;  // [B,T,H], [B,H], [B,H]
  std::shared_ptr<LstmState> state;
};
// b_ih/b_hh/h0/c0 may be undefined (zeros).
LstmForward lstm_forward(const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                         const Tensor& b_ih, const Tensor& b_hh, const Tensor& h0,
                         const Tensor& c0);
// {dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0}; d_out/d_hn/d_cn may be undefined (zeros).
std::vector<Tensor> lstm_backward(LstmState& s, const Tensor& d_out, const Tensor& d_hn,
                                  const Tensor& d_cn);

// ---- GEMM (cuBLAS) ----
// kStrict: f32 in full f32; kTf32: f32 inputs rounded to TF32 on the tensor cores.
// f16 and bf16 always use the tensor cores with f32 accumulation; f64 is f64.
enum class MathMode { kStrict, kTf32 };
// out[M,N] = op(a) op(b) (+ beta * out), row-major, as cpu::gemm: a_ptr/b_ptr/out_ptr are
// device pointers of dtype dt with leading dimensions lda/ldb/ldc.
void gemm(const Device& device, DType dt, bool trans_a, bool trans_b, int64_t m, int64_t n,
          int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb, double beta, void* out,
          int64_t ldc, MathMode mode = MathMode::kStrict);
// [M,K] x [K,N] -> [M,N] for contiguous or transposed 2-D views (no autograd).
Tensor matmul(const Tensor& a, const Tensor& b, MathMode mode = MathMode::kStrict);

// ---- transformer ops (shapes checked by the front ends) ----
// x contiguous [rows, d]; weight/bias [d] or undefined. mean/rstd [rows] in the stat dtype
// (f64 for f64 inputs, else f32).
struct LayerNormResult {
  Tensor y, mean, rstd;
};
LayerNormResult layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                   int64_t rows, int64_t d, double eps);
// {dx, dweight, dbias}, each only when asked for (gx, gw, gb).
std::vector<Tensor> layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                        const Tensor& rstd, const Tensor& weight, int64_t rows,
                                        int64_t d, bool gx, bool gw, bool gb);
Tensor gelu_forward(const Tensor& x);
Tensor gelu_backward(const Tensor& dy, const Tensor& x);
// q, k, v [B,H,T,Dh] any strides (copied contiguous). out [B,H,T,Dh], lse [B,H,T] (stat dtype).
struct AttentionResult {
  Tensor out, lse;
};
AttentionResult attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, bool causal);
// {dq, dk, dv}, contiguous.
std::vector<Tensor> attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                       bool causal);

// ---- fused optimizer updates (in place; buf/m/v on the parameter's device) ----
void sgd_update(const Tensor& p, const Tensor& g, const Tensor& buf, const fn::SgdUpdate& u);
void adam_update(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v,
                 const fn::AdamUpdate& u);

}  // namespace dtrain::cuda
