// Reference GRU: plain loops in double, the test oracle for the fast kernel in
// ops_gru.cc. One layer, batch_first, PyTorch's gate order (r, z, n):
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h
// No BLAS, no functors, no fast math (std::exp, std::tanh): it shares no code with the
// kernel it checks. Inputs f32 or f64, read as double; results are new f64 tensors.
// Forward only (the gradients are checked by finite differences and PyTorch's numbers).
#pragma once

#include "dtrain/engine/ops_gru.h"

namespace dtrain::cpu {

// h0 and the biases may be undefined (zeros).
GruResult gru_reference_forward(const Tensor& x, const GruWeights& w, const Tensor& h0);

}  // namespace dtrain::cpu
