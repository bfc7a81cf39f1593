// gru: one GRU layer, batch_first, PyTorch's gate order (r, z, n) and equations, so
// weights exported from torch.nn.GRU give the same numbers:
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//   h' = (1 - z) * n + z * h
// Differentiable in every input (x, the four weights, h0). f32 and f64 (f64 for
// gradient checks); CPU only (a CUDA tensor is an UnsupportedError). The plain
// reference in engine/src/cpu/gru_ref.h is the test oracle of the forward.
#pragma once

#include "dtrain/engine/tensor.h"

namespace dtrain {

struct GruWeights {
  Tensor w_ih;  // [3H, I], gate order r, z, n (as PyTorch)
  Tensor w_hh;  // [3H, H]
  Tensor b_ih;  // [3H] or undefined
  Tensor b_hh;  // [3H] or undefined
};
struct GruResult {
  Tensor output;  // [B, T, H]
  Tensor h_n;     // [B, H]
};
// x [B,T,I]; h0 [B,H] or undefined (zeros). Throws ShapeError / DTypeError naming
// the tensor and both shapes.
GruResult gru(const Tensor& x, const GruWeights& w, const Tensor& h0 = Tensor());

}  // namespace dtrain
