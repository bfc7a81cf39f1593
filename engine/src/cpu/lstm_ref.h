// Reference LSTM: plain loops in double, the test oracle for the fast kernel in
// ops_lstm.cc. One layer, batch_first, PyTorch's gate order (i, f, g, o):
//   a = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh,  i, f, o = sigmoid, g = tanh
//   c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t)
// It uses no BLAS, no functors and no fast math (std::exp, std::tanh), so it shares
// no code with the kernel it checks. Inputs may be f32 or f64 and are read as double;
// every result is a new contiguous f64 tensor. Not differentiable, not fast.
#pragma once

#include "dtrain/engine/ops.h"

namespace dtrain::cpu {

struct LstmReferenceGrads {
  Tensor dx;     // [B,T,I]
  Tensor dh0;    // [B,H]
  Tensor dc0;    // [B,H]
  Tensor dw_ih;  // [4H,I]
  Tensor dw_hh;  // [4H,H]
  Tensor db_ih;  // [4H]
  Tensor db_hh;  // [4H] (equal to db_ih: both biases enter the same sum)
};

// Forward. h0/c0 and the biases may be undefined (zeros).
LstmResult lstm_reference_forward(const Tensor& x, const LstmWeights& w, const Tensor& h0,
                                  const Tensor& c0);

// Backward by plain backpropagation through time (recomputes the forward). Any of
// d_output [B,T,H], d_hn [B,H], d_cn [B,H] may be undefined (zero).
LstmReferenceGrads lstm_reference_backward(const Tensor& x, const LstmWeights& w, const Tensor& h0,
                                           const Tensor& c0, const Tensor& d_output,
                                           const Tensor& d_hn, const Tensor& d_cn);

}  // namespace dtrain::cpu
