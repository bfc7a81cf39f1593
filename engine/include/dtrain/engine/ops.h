// The differentiable operators of the engine.
//
// Each op checks its inputs (shapes, dtypes) and throws ShapeError/DTypeError naming
// the op and both shapes, computes its output with a CPU kernel, and records a
// backward Node when an input requires grad (autograd.h). Kernels live in
// engine/src/cpu/: a fast kernel (OpenBLAS / oneDNN / vectorised loops) and, for the
// non-trivial ones, a plain reference kernel that the tests use as the oracle.
// Floating ops compute in f32 or f64 (f64 exists for gradient checks).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "dtrain/engine/random.h"
#include "dtrain/engine/tensor.h"

namespace dtrain {

// ---- elementwise, with numpy broadcasting ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add_scalar(const Tensor& a, double s);
Tensor mul_scalar(const Tensor& a, double s);
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor relu(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor sigmoid(const Tensor& a);
inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator+(const Tensor& a, double s) { return add_scalar(a, s); }
inline Tensor operator-(const Tensor& a, double s) { return add_scalar(a, -s); }
inline Tensor operator*(const Tensor& a, double s) { return mul_scalar(a, s); }
inline Tensor operator/(const Tensor& a, double s) { return mul_scalar(a, 1.0 / s); }
inline Tensor operator-(const Tensor& a) { return neg(a); }

// Shape the result of broadcasting a and b; throws ShapeError naming `op`.
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);
// Sums g over broadcast dimensions so it has `shape` (the backward of broadcasting).
Tensor sum_to(const Tensor& g, const Shape& shape);

// ---- reductions ----
Tensor sum(const Tensor& a);  // all elements -> scalar (shape [])
Tensor sum(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim = false);
Tensor mean(const Tensor& a);
Tensor mean(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim = false);

// ---- linear algebra ----
// [M,K] x [K,N] -> [M,N]; also [B,M,K] x [B,K,N] -> [B,M,N]. Transposed views are
// handed to BLAS as transposes, not copied.
Tensor matmul(const Tensor& a, const Tensor& b);
// y = x W^T + b; x [..., in], weight [out, in], bias [out] or undefined.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias);

// ---- convolution and pooling (NCHW) ----
struct Conv2dOptions {
  int64_t stride = 1;
  int64_t padding = 0;
  // Grouped convolution (torch.nn.Conv2d groups): C and O split into `groups` equal
  // groups, weight [O, C/groups, kh, kw]; groups == C is depthwise.
  int64_t groups = 1;
};
// x [N,C,H,W], weight [O,C/groups,kh,kw], bias [O] or undefined.
Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt = {});
struct MaxPool2dOptions {
  int64_t kernel = 2;
  int64_t stride = 0;  // 0: same as kernel
  int64_t padding = 0;
};
Tensor max_pool2d(const Tensor& x, MaxPool2dOptions opt = {});

// ---- softmax and losses ----
Tensor softmax(const Tensor& x, int64_t dim);
Tensor log_softmax(const Tensor& x, int64_t dim);
// logits [N,C], target i64 [N] with values in [0,C); mean over the batch.
Tensor cross_entropy(const Tensor& logits, const Tensor& target);

// ---- embedding, recurrent, regularisation ----
// weight [V,D], indices i64 of any shape -> [..., D]. Throws on an index out of range.
Tensor embedding(const Tensor& weight, const Tensor& indices);

struct LstmWeights {
  Tensor w_ih;  // [4H, I], gate order i, f, g, o (as PyTorch)
  Tensor w_hh;  // [4H, H]
  Tensor b_ih;  // [4H] or undefined
  Tensor b_hh;  // [4H] or undefined
};
struct LstmResult {
  Tensor output;  // [B, T, H]
  Tensor h_n;     // [B, H]
  Tensor c_n;     // [B, H]
};
// One layer, batch_first: x [B,T,I]; h0/c0 [B,H] or undefined (zeros).
LstmResult lstm(const Tensor& x, const LstmWeights& w, const Tensor& h0 = Tensor(),
                const Tensor& c0 = Tensor());

// ---- transformer ops (ops_transformer.cc, ops_attention.cc) ----
// Normalises over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias (biased
// variance, as torch.nn.functional.layer_norm). weight and bias are [D] or undefined.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5);
// GELU, tanh approximation (GPT-2; torch gelu(approximate="tanh")).
Tensor gelu(const Tensor& x);
// Attention of q, k, v [B, H, T, Dh] (any strides) -> [B, H, T, Dh] contiguous:
// softmax(q k^T / sqrt(Dh) + mask) v, mask = -inf above the diagonal when causal.
Tensor scaled_dot_product_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal);
// Concatenation along dim (shapes equal elsewhere) and torch.split-style chunks of split_size
// (the last may be smaller); both differentiable.
Tensor cat(const std::vector<Tensor>& xs, int64_t dim);
std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim);

// Inverted dropout: zeroes each element with probability p and scales the rest by
// 1/(1-p) when training; identity otherwise.
Tensor dropout(const Tensor& x, double p, bool training, Generator& gen);

}  // namespace dtrain
