// bf16 matrix products and convolutions on oneDNN primitives (internal to the engine):
// bf16 operands, f32 accumulation, f32 results. What amp_cpu.cc runs under
// AutocastGuard(bf16) on the CPU.
//
// Operands arrive as bf16 bit patterns (BFloat16, already rounded by the caller with
// the conversion shared with CUDA); results and biases are f32. Every tensor is plain
// row-major (NCHW / OIHW for convolutions). Primitives are created once per shape and
// thread and then reused (a small per-thread cache, see bf16_onednn.cc).
// Deliberately not done: groups, dilation, bf16 outputs, post-ops.
// Thread-safety: any thread (each has its own primitives and stream).
#pragma once

#include <cstdint>
#include <string>

#include "conv.h"
#include "dtrain/common/dtype.h"

namespace dtrain::cpu {

// True when oneDNN runs bf16 natively here (AVX512-BF16 or AMX).
bool onednn_has_native_bf16();
// oneDNN's effective ISA in words ("avx512_core_bf16", "avx2", ...).
std::string onednn_isa_name();

// C[m,n] = op(A) op(B) (+ bias[n] on every row when bias != nullptr), f32 out.
// A is [m,k] (trans_a: stored [k,m]), B is [k,n] (trans_b: stored [n,k]); all dense.
struct MatmulBf16 {
  int64_t m = 0, n = 0, k = 0;
  bool trans_a = false, trans_b = false;
};
void matmul_bf16_onednn(const MatmulBf16& g, const BFloat16* a, const BFloat16* b,
                        const float* bias, float* c);

// y = conv(x, w) (+ bias); x [n,c,h,w] and w [o,c,kh,kw] bf16, y f32. REQUIRES groups 1.
void conv2d_forward_bf16_onednn(const ConvGeom& g, const BFloat16* x, const BFloat16* w,
                                const float* bias, float* y);
// dx (f32) from dy and w (bf16).
void conv2d_backward_data_bf16_onednn(const ConvGeom& g, const BFloat16* dy, const BFloat16* w,
                                      float* dx);
// dw (f32, overwritten) and db (f32, when not null) from x and dy (bf16).
void conv2d_backward_weights_bf16_onednn(const ConvGeom& g, const BFloat16* x, const BFloat16* dy,
                                         float* dw, float* db);

}  // namespace dtrain::cpu
