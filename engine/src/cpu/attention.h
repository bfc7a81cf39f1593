// The fused CPU attention kernel behind scaled_dot_product_attention (ops_attention.cc).
//
// Forward, per (batch, head) and per tile of kBlockQ query rows: S = scale Q K^T (one
// GEMM, only the keys a causal tile can see), the causal mask, a stable softmax per row
// (fn::fast_exp in f32), then O = P V (one GEMM). It keeps the row log-sum-exp
// (lse = max + log sum exp) and not the probabilities, so no [B,H,T,T] tensor lives
// between forward and backward; the backward recomputes P = exp(S - lse) tile by tile
// (flash-attention style) and runs dV += P^T dO, dP = dO V^T, dS = P (dP - D) with
// D = rowsum(dO * O), dQ = scale dS K, dK += scale dS^T Q, all as GEMMs (cpu::gemm).
// (batch, head) pairs run in parallel (cpu::parallel_for) with per-thread scratch of
// kBlockQ x T scores; f64 (the gradient-check dtype, OpenBLAS) runs on one thread.
//
// Operands are strided views: element (b, h, t, d) of q at q.base[b*sb + h*sh + t*ld + d]
// (so the [B,T,H,Dh] -> transpose(1,2) layout of a GPT needs no copy). Outputs (out, lse,
// dq, dk, dv) and dout are contiguous. Not a general masked attention: the only mask is
// causal, and q, k, v have the same [B, H, T, Dh].
#pragma once

#include <cstdint>

namespace dtrain::cpu {

template <typename T>
struct AttentionOperand {
  const T* base;
  int64_t sb, sh, ld;  // strides (elements) of batch, head and row; the last dim has stride 1
};

struct AttentionGeom {
  int64_t batch, heads, t, dh;
  bool causal;
  double scale;  // 1 / sqrt(dh)
};

constexpr int64_t kAttentionBlockQ = 64;

// out [B,H,T,Dh], lse [B,H,T].
template <typename T>
void attention_forward(const AttentionGeom& g, AttentionOperand<T> q, AttentionOperand<T> k,
                       AttentionOperand<T> v, T* out, T* lse);

// dq, dk, dv [B,H,T,Dh] (overwritten) from dout, and the forward's out and lse.
template <typename T>
void attention_backward(const AttentionGeom& g, AttentionOperand<T> q, AttentionOperand<T> k,
                        AttentionOperand<T> v, const T* out, const T* lse, const T* dout, T* dq,
                        T* dk, T* dv);

}  // namespace dtrain::cpu
