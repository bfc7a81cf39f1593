// The int8 inference graph of a QuantizedModel (quant.h): activations stay 8-bit from
// layer to layer, f32 only at the input quantize and the final logits.
//
// Ops (one per quantized layer or max-pool; Flatten is folded into the Linear after it):
//   input     f32 NCHW -> u8 (when the calibrated input was >= 0) or s8, NHWC, with the
//             first layer's scale (quantize_s8 / quantize_u8: round half away, clamp)
//   conv      oneDNN int8 convolution, NHWC; requantization in its output scales
//   linear    oneDNN int8 inner product; after a Flatten its src is the 4D NHWC tensor
//             and its weights [out, C, H, W], so no reorder of the activations
//   max-pool  oneDNN max pooling on u8/s8 (max commutes with the monotone requantization)
// Requantization of a layer with input scale s_in, weight scales s_w[o] and bias b[o]
// into the next layer's input scale s_next:
//   q = sat(rne((acc + b[o] / (s_in * s_w[o])) * (s_in * s_w[o] / s_next)))
// dst u8 (0..255, s_next = amax / 255) when a ReLU follows the layer (the saturation at 0
// is the ReLU; it is also a post-op), else s8 (-128..127, s_next = amax / 127); the last
// layer writes f32 logits with s_next = 1. Symmetric: zero point 0 everywhere.
//
// Weights are reordered into oneDNN's preferred (blocked) layout when the graph is built
// (for the calibration batch's shape); the primitives of an input shape are created on
// its first call and cached, keyed by the shape. A later shape whose primitives want
// another weight layout reorders once more and keeps that copy too.
//
// The reference kernel runs the same ops as plain integer loops with the same scales,
// rounding and saturation: the oracle of tests/test_quant_graph.cc. Thread-safety:
// run() is const; the cache is guarded by a mutex, every call has its own buffers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dtrain/engine/tensor.h"

namespace dtrain::compress {

// Symmetric u8 of v >= 0 with `scale` (round half away from zero, clamp to [0, 255]).
inline uint8_t quantize_u8(float v, float scale) {
  const float q = std::min(std::max(v / scale, 0.f), 255.f);
  return static_cast<uint8_t>(static_cast<int>(q + 0.5f));
}

// One requantized output: rne((acc + bias) * oscale), saturated to u8 or s8; the
// reference kernel's arithmetic, which oneDNN's output scales do in f32 too.
inline int32_t requantize(int32_t acc, float bias, float oscale, bool u8) {
  float v = std::nearbyint((static_cast<float>(acc) + bias) * oscale);
  const float lo = u8 ? 0.f : -128.f, hi = u8 ? 255.f : 127.f;
  return static_cast<int32_t>(v < lo ? lo : (v > hi ? hi : v));
}

struct Int8GraphOp {
  enum class Kind { kConv, kLinear, kMaxPool };
  Kind kind = Kind::kConv;
  // conv / linear: weight [out, K] s8 (K = C*k*k, or C*H*W after a Flatten: NCHW order)
  int64_t out = 0, in = 0, channels = 0, kernel = 1, stride = 1, padding = 0;
  std::vector<int8_t> weight;
  std::vector<float> bias;    // [out], divided by s_in * s_w[o] (added to the s32 sum)
  std::vector<float> oscale;  // [out], s_in * s_w[o] / s_next
  bool relu = false;          // a ReLU follows (dst u8)
  bool last = false;          // dst f32 logits
};

class Int8Graph {
 public:
  // `ops` as QuantizedModel::build makes them; input_scale / input_u8: the first layer's.
  // `example` is the calibration batch's shape: its weights are reordered now.
  Int8Graph(std::vector<Int8GraphOp> ops, float input_scale, bool input_u8, const Shape& example);
  ~Int8Graph();
  Int8Graph(const Int8Graph&) = delete;
  Int8Graph& operator=(const Int8Graph&) = delete;

  // Logits [N, out] for a CPU f32 input; reference: plain loops instead of oneDNN.
  // trace (tests): each op's 8-bit output, NHWC (or [N, out]), widened to int32.
  Tensor run(const Tensor& x, bool reference,
             std::vector<std::vector<int32_t>>* trace = nullptr) const;
  const std::vector<Int8GraphOp>& ops() const { return ops_; }
  float input_scale() const { return input_scale_; }
  bool input_u8() const { return input_u8_; }
  size_t cached_shapes() const;  // how many input shapes have primitives (tests)

  struct Plan;  // quant_graph.cc: the oneDNN primitives of one input shape
  struct Impl;

 private:
  const Plan& plan_for(const Shape& s) const;
  Tensor run_onednn(const Tensor& x, std::vector<std::vector<int32_t>>* trace) const;
  Tensor run_reference(const Tensor& x, std::vector<std::vector<int32_t>>* trace) const;

  std::vector<Int8GraphOp> ops_;
  float input_scale_ = 1.f;
  bool input_u8_ = false;
  std::unique_ptr<Impl> impl_;  // engine, reordered weights, plan cache
  mutable std::mutex mu_;
};

// The first layer's input quantized into NHWC (x: f32 NCHW [N,C,H,W] or [N,K]); u8 or s8
// bytes. Shared by the oneDNN and the reference paths.
std::vector<uint8_t> quantize_input_nhwc(const Tensor& x, float scale, bool u8);

}  // namespace dtrain::compress
