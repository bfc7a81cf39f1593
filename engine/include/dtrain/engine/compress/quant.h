// Post-training int8 quantization of a model's Linear and Conv2d layers, for
// inference on the CPU.
//
// Scheme (symmetric, zero point 0 everywhere):
//   weights      per output channel: scale_w[o] = max|W[o,:]| / 127, q = round(W / scale_w)
//   activations  per tensor, at the input of every Linear/Conv2d: scale_x = amax / 127,
//                amax = the largest |x| seen over the calibration batches (min/max), or
//                the `percentile` of |x| (e.g. 99.99) to ignore outliers
//   one layer    x (f32) -> q_x = clamp(round(x / scale_x), -127, 127) (s8)
//                acc = q_x * q_W^T (s8 x s8 -> s32, exact)
//                y = acc * scale_x * scale_w[o] + b[o] (f32)
// Conv2d runs as im2col of the s8 input ([C*k*k, OH*OW] per image, padding is q = 0)
// and the same GEMM. Layers between (ReLU, MaxPool2d, Flatten) run their f32 forward
// on the dequantized output; a ReLU right after a quantized layer is fused into
// its dequantization. Conv2d runs per image: acc[out, OH*OW] = q_W * cols, which
// is already NCHW. So every quantized layer dequantizes its output and
// the next quantizes its input: requantization through f32.
//
// The int8 kernels (Int8Kernel): oneDNN's (dnnl_gemm_s8s8s32, the int8 convolution
// primitive on NHWC, or im2col + the GEMM) and plain loops with int32 accumulation,
// the test oracle; their int32 results are identical, so the models' outputs are too.
//
// Supported models: an nn::Sequential whose children are Linear, Conv2d (any stride
// and padding), ReLU, MaxPool2d and Flatten (seed-cnn, mlp). Anything else throws
// UnsupportedError naming the layer. When every layer is quantized and the ops between
// them are ReLU (after a layer), MaxPool2d and Flatten, build() also makes the int8 graph
// (quant_graph.h: 8-bit activations from layer to layer), and forward(x) runs it; else
// forward(x) runs the per-layer path above and graph_unavailable() says why. Thread-safety:
// forward() is const and keeps no state; several threads may run it at once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/compress/quant_graph.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::compress {

// kReference: plain loops (GEMM and direct convolution). kOneDnn: dnnl_gemm_s8s8s32 for
// Linear, oneDNN's int8 convolution primitive for Conv2d. kOneDnnIm2col: Conv2d as
// im2col + dnnl_gemm_s8s8s32 (slower; kept as the measured alternative). kGraph: the int8
// graph on oneDNN (quant_graph.h); kGraphReference: the same graph as plain integer loops.
enum class Int8Kernel { kReference, kOneDnn, kOneDnnIm2col, kGraph, kGraphReference };

// C[M,N] = A[M,K] * B[N,K]^T (b_transposed) or A[M,K] * B[K,N], row-major, A and B
// s8, C s32, packed (lda = K, ldb = K or N, ldc = N).
void gemm_s8s8s32(Int8Kernel kernel, int64_t m, int64_t n, int64_t k, const int8_t* a,
                  const int8_t* b, int32_t* c, bool b_transposed = true);

// An int8 convolution: x [n, h, w, c] (NHWC), weights [out, c, k, k] (OIHW),
// y [n, oh, ow, out] (NHWC), s32; square kernel, the same stride and padding on both axes.
struct Int8ConvShape {
  int64_t n = 0, c = 0, h = 0, w = 0, out = 0, k = 1, stride = 1, padding = 0;
  int64_t oh() const { return (h + 2 * padding - k) / stride + 1; }
  int64_t ow() const { return (w + 2 * padding - k) / stride + 1; }
};
// kOneDnn: oneDNN's int8 convolution primitive; kReference: plain loops. Equal results.
void conv_s8s8s32(Int8Kernel kernel, const Int8ConvShape& shape, const int8_t* x, const int8_t* w,
                  int32_t* y);

struct CalibrationOptions {
  double percentile = 100.0;  // of |x| per tensor, in (0, 100]; 100: min/max
  // Layers whose depth K (in features or C*k*k) is below this stay f32 (0: none). With the
  // im2col path seed-cnn's first conv (K = 9) was slower in int8 than in f32; with the
  // conv primitive --min-k 16 measured about the same as 0 (bench/int8_inference).
  int64_t min_k = 0;
};

// Symmetric s8 of v with `scale` (round half away from zero, clamp to +-127).
// Branch-free (min/max, copysign), so a loop over it vectorizes.
inline int8_t quantize_s8(float v, float scale) {
  const float q = std::min(std::max(v / scale, -127.f), 127.f);
  return static_cast<int8_t>(static_cast<int>(q + std::copysign(0.5f, q)));
}

class QuantizedModel {
 public:
  // Quantizes the weights of `model` and calibrates the activation scales by running
  // the f32 model (eval mode, no grad) on `calibration` (at least one batch).
  static QuantizedModel build(const nn::Sequential& model, const std::vector<Tensor>& calibration,
                              const CalibrationOptions& options = {});
  // Logits (f32) for a CPU f32 input; the same input the f32 model takes. Without a
  // kernel: the int8 graph when there is one, else kOneDnn (best_kernel()).
  Tensor forward(const Tensor& x) const { return forward(x, best_kernel()); }
  Tensor forward(const Tensor& x, Int8Kernel kernel) const;
  Int8Kernel best_kernel() const { return graph_ ? Int8Kernel::kGraph : Int8Kernel::kOneDnn; }
  // The int8 graph, or null; then graph_unavailable() names what it cannot run.
  const Int8Graph* graph() const { return graph_.get(); }
  const std::string& graph_unavailable() const { return graph_reason_; }

  // One quantized Linear or Conv2d.
  struct Layer {
    bool conv = false;
    int64_t out = 0, in = 0;                // out channels; K = in features or C*k*k
    int64_t channels = 0, kernel_size = 1;  // conv only
    int64_t stride = 1, padding = 0;
    std::vector<int8_t> weight;       // [out, K]
    std::vector<float> weight_scale;  // [out]
    std::vector<float> bias;          // [out] (zeros when the layer has none)
    float input_scale = 1.f;
    bool relu = false;          // a ReLU that followed the layer, applied in its dequantization
    bool input_nonneg = false;  // every calibrated input value was >= 0
  };
  const std::vector<Layer>& layers() const { return layers_; }

 private:
  struct Step {
    int layer = -1;  // index into layers_, or -1: run `module` in f32
    std::shared_ptr<nn::Module> module;
    bool fused = false;  // a ReLU done by the quantized layer before it
  };
  Tensor run_layer(const Layer& l, const Tensor& x, Int8Kernel kernel) const;
  void make_graph(const Shape& example);  // quant_graph_build.cc
  std::vector<Step> steps_;
  std::vector<Layer> layers_;
  std::shared_ptr<const Int8Graph> graph_;
  std::string graph_reason_;
};

}  // namespace dtrain::compress
