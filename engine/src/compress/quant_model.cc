// QuantizedModel (quant.h): weight quantization, calibration and the int8 forward.
#include <algorithm>
#include <cmath>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/quant.h"

namespace dtrain::compress {

namespace {

bool runs_in_f32(const nn::Module& m) {
  return dynamic_cast<const nn::ReLU*>(&m) || dynamic_cast<const nn::MaxPool2d*>(&m) ||
         dynamic_cast<const nn::Flatten*>(&m);
}

// A layer whose GEMM depth K (in features, or C*k*k) is below min_k stays f32.
bool too_narrow(const nn::Module& m, int64_t min_k) {
  if (auto* conv = dynamic_cast<const nn::Conv2d*>(&m)) {
    const auto& o = conv->options();
    return o.in_channels() * o.kernel_size() * o.kernel_size() < min_k;
  }
  auto* lin = dynamic_cast<const nn::Linear*>(&m);
  return lin != nullptr && lin->options().in_features() < min_k;
}

// Per-output-channel symmetric s8 of a weight [out, ...] (f32, CPU).
void quantize_weight(const Tensor& w, QuantizedModel::Layer& l) {
  Tensor c = w.contiguous();
  const float* p = c.data<float>();
  l.weight.resize(static_cast<size_t>(l.out * l.in));
  l.weight_scale.resize(static_cast<size_t>(l.out));
  for (int64_t o = 0; o < l.out; ++o) {
    float amax = 0.f;
    for (int64_t i = 0; i < l.in; ++i) amax = std::max(amax, std::fabs(p[o * l.in + i]));
    float scale = amax > 0.f ? amax / 127.f : 1.f;
    l.weight_scale[static_cast<size_t>(o)] = scale;
    for (int64_t i = 0; i < l.in; ++i) {
      l.weight[static_cast<size_t>(o * l.in + i)] = quantize_s8(p[o * l.in + i], scale);
    }
  }
}

QuantizedModel::Layer make_layer(const nn::Module& m) {
  QuantizedModel::Layer l;
  Tensor w, b;
  if (auto* lin = dynamic_cast<const nn::Linear*>(&m)) {
    l.out = lin->options().out_features();
    l.in = lin->options().in_features();
    w = lin->weight;
    b = lin->bias;
  } else {
    auto* conv = dynamic_cast<const nn::Conv2d*>(&m);
    const auto& o = conv->options();
    l.conv = true;
    l.out = o.out_channels();
    l.channels = o.in_channels();
    l.kernel_size = o.kernel_size();
    l.stride = o.stride();
    l.padding = o.padding();
    l.in = l.channels * l.kernel_size * l.kernel_size;
    w = conv->weight;
    b = conv->bias;
  }
  DTRAIN_CHECK(w.dtype() == DType::f32 && w.device().is_cpu(), UnsupportedError,
               "quantize: {} needs f32 CPU weights", m.describe());
  quantize_weight(w, l);
  l.bias.assign(static_cast<size_t>(l.out), 0.f);
  if (b.defined()) l.bias = b.contiguous().to_vector<float>();
  return l;
}

// The |x| at `percentile` (100: the maximum).
float abs_percentile(const Tensor& x, double percentile) {
  std::vector<float> v = x.contiguous().to_vector<float>();
  for (float& f : v) f = std::fabs(f);
  if (v.empty()) return 0.f;
  if (percentile >= 100.0) return *std::max_element(v.begin(), v.end());
  size_t k =
      static_cast<size_t>(std::floor(percentile / 100.0 * static_cast<double>(v.size() - 1)));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

// im2col of image `b` of a quantized NCHW input into cols [C*k*k, OH*OW]: row
// (c, kh, kw), column (oh, ow); taps in the padding are 0 (the quantized zero). Each
// row is a strided copy of input rows (a memcpy when the stride is 1).
void im2col_s8(const int8_t* x, const Shape& s, const QuantizedModel::Layer& l, int64_t b,
               int64_t oh, int64_t ow, int8_t* cols) {
  const int64_t c = s[1], h = s[2], w = s[3], k = l.kernel_size, st = l.stride;
  for (int64_t ch = 0; ch < c; ++ch) {
    for (int64_t ky = 0; ky < k; ++ky) {
      for (int64_t kx = 0; kx < k; ++kx) {
        int8_t* row = cols + ((ch * k + ky) * k + kx) * oh * ow;
        // output columns xo whose input column xo*st - pad + kx lies inside [0, w)
        int64_t lo = 0, hi = ow;
        while (lo < ow && lo * st - l.padding + kx < 0) ++lo;
        while (hi > lo && (hi - 1) * st - l.padding + kx >= w) --hi;
        for (int64_t y = 0; y < oh; ++y) {
          int8_t* dst = row + y * ow;
          const int64_t iy = y * st - l.padding + ky;
          if (iy < 0 || iy >= h) {
            std::fill_n(dst, ow, int8_t{0});
            continue;
          }
          const int8_t* src = x + ((b * c + ch) * h + iy) * w - l.padding + kx;
          std::fill_n(dst, lo, int8_t{0});
          std::fill_n(dst + hi, ow - hi, int8_t{0});
          if (st == 1) {
            std::copy(src + lo, src + hi, dst + lo);
          } else {
            for (int64_t xo = lo; xo < hi; ++xo) dst[xo] = src[xo * st];
          }
        }
      }
    }
  }
}

// y[o, p] = acc[o, p] * scale_x * scale_w[o] + b[o] (then ReLU when fused), rows of P.
void dequantize_rows(const int32_t* acc, const QuantizedModel::Layer& l, int64_t p, float* y) {
  for (int64_t o = 0; o < l.out; ++o) {
    const float scale = l.input_scale * l.weight_scale[static_cast<size_t>(o)];
    const float bias = l.bias[static_cast<size_t>(o)];
    for (int64_t i = 0; i < p; ++i) {
      float v = static_cast<float>(acc[o * p + i]) * scale + bias;
      y[o * p + i] = l.relu && v < 0.f ? 0.f : v;
    }
  }
}

// A conv through conv_s8s8s32: x (f32 NCHW) quantized into NHWC, y dequantized to NCHW.
void run_direct_conv(const QuantizedModel::Layer& l, const float* x, const Shape& s,
                     Int8Kernel kernel, float* y) {
  Int8ConvShape cs{s[0], s[1], s[2], s[3], l.out, l.kernel_size, l.stride, l.padding};
  const int64_t hw = cs.h * cs.w, plane = cs.oh() * cs.ow();
  std::vector<int8_t> qx(static_cast<size_t>(cs.n * hw * cs.c));
  for (int64_t b = 0; b < cs.n; ++b) {
    for (int64_t c = 0; c < cs.c; ++c) {
      const float* src = x + (b * cs.c + c) * hw;
      int8_t* dst = qx.data() + b * hw * cs.c + c;
      for (int64_t i = 0; i < hw; ++i) dst[i * cs.c] = quantize_s8(src[i], l.input_scale);
    }
  }
  std::vector<int32_t> acc(static_cast<size_t>(cs.n * plane * l.out));
  conv_s8s8s32(kernel, cs, qx.data(), l.weight.data(), acc.data());
  constexpr int64_t kTile = 64;  // positions per pass: the tile of acc stays in L1
  for (int64_t b = 0; b < cs.n; ++b) {
    for (int64_t i0 = 0; i0 < plane; i0 += kTile) {
      const int64_t i1 = std::min(plane, i0 + kTile);
      for (int64_t o = 0; o < l.out; ++o) {
        const float scale = l.input_scale * l.weight_scale[static_cast<size_t>(o)];
        const float bias = l.bias[static_cast<size_t>(o)];
        const int32_t* a = acc.data() + b * plane * l.out + o;
        float* out = y + (b * l.out + o) * plane;
        for (int64_t i = i0; i < i1; ++i) {
          float v = static_cast<float>(a[i * l.out]) * scale + bias;
          out[i] = l.relu && v < 0.f ? 0.f : v;
        }
      }
    }
  }
}

}  // namespace

QuantizedModel QuantizedModel::build(const nn::Sequential& model,
                                     const std::vector<Tensor>& calibration,
                                     const CalibrationOptions& options) {
  DTRAIN_CHECK(!calibration.empty(), InvalidArgument,
               "quantize: calibration needs at least one batch, got 0");
  DTRAIN_CHECK(options.percentile > 0 && options.percentile <= 100, InvalidArgument,
               "quantize: percentile must be in (0, 100], got {}", options.percentile);
  QuantizedModel q;
  for (const auto& [name, child] : model.named_children()) {
    Step step;
    step.module = child;
    if (dynamic_cast<nn::ReLU*>(child.get()) && !q.steps_.empty() && q.steps_.back().layer >= 0) {
      step.fused = true;  // into the quantized layer before it
      q.layers_[static_cast<size_t>(q.steps_.back().layer)].relu = true;
    }
    if (!runs_in_f32(*child) && !too_narrow(*child, options.min_k)) {
      DTRAIN_CHECK(dynamic_cast<nn::Linear*>(child.get()) || dynamic_cast<nn::Conv2d*>(child.get()),
                   UnsupportedError,
                   "quantize: {} is not supported (Linear, Conv2d, ReLU, MaxPool2d, Flatten)",
                   child->describe());
      auto* conv = dynamic_cast<nn::Conv2d*>(child.get());
      DTRAIN_CHECK(conv == nullptr || conv->options().groups() == 1, UnsupportedError,
                   "quantize: {} is a grouped/depthwise convolution (groups {}); int8 takes "
                   "groups 1 only",
                   child->describe(), conv ? conv->options().groups() : 1);
      step.layer = static_cast<int>(q.layers_.size());
      q.layers_.push_back(make_layer(*child));
    }
    q.steps_.push_back(step);
  }
  // Calibration: the f32 model, child by child, recording the inputs' range.
  NoGradGuard ng;
  std::vector<float> amax(q.layers_.size(), 0.f);
  std::vector<char> nonneg(q.layers_.size(), 1);
  for (const Tensor& batch : calibration) {
    Tensor x = batch;
    for (const Step& s : q.steps_) {
      if (s.layer >= 0) {
        float& a = amax[static_cast<size_t>(s.layer)];
        a = std::max(a, abs_percentile(x, options.percentile));
        auto v = x.contiguous().to_vector<float>();
        if (std::any_of(v.begin(), v.end(), [](float f) { return f < 0.f; })) {
          nonneg[static_cast<size_t>(s.layer)] = 0;
        }
      }
      bool was_training = s.module->is_training();
      s.module->eval();
      x = s.module->forward(x);
      s.module->train(was_training);
    }
  }
  for (size_t i = 0; i < q.layers_.size(); ++i) {
    q.layers_[i].input_scale = amax[i] > 0.f ? amax[i] / 127.f : 1.f;
    q.layers_[i].input_nonneg = nonneg[i] != 0;
  }
  q.make_graph(calibration.front().shape());
  return q;
}

Tensor QuantizedModel::run_layer(const Layer& l, const Tensor& x, Int8Kernel kernel) const {
  Tensor c = x.contiguous();
  const float* p = c.data<float>();
  std::vector<int8_t> qx(static_cast<size_t>(c.numel()));
  for (size_t i = 0; i < qx.size(); ++i) qx[i] = quantize_s8(p[i], l.input_scale);
  const Shape& s = c.shape();
  if (!l.conv) {  // acc[N, out] = q_x[N, K] * q_W[out, K]^T
    DTRAIN_CHECK(s.size() == 2 && s[1] == l.in, ShapeError,
                 "quantized linear: expected input [N,{}], got {}", l.in, shape_str(s));
    std::vector<int32_t> acc(static_cast<size_t>(s[0] * l.out));
    gemm_s8s8s32(kernel, s[0], l.out, l.in, qx.data(), l.weight.data(), acc.data());
    Tensor y = empty({s[0], l.out});
    float* out = y.data<float>();
    for (int64_t r = 0; r < s[0]; ++r) {
      for (int64_t o = 0; o < l.out; ++o) {
        float v = static_cast<float>(acc[static_cast<size_t>(r * l.out + o)]) *
                      (l.input_scale * l.weight_scale[static_cast<size_t>(o)]) +
                  l.bias[static_cast<size_t>(o)];
        out[r * l.out + o] = l.relu && v < 0.f ? 0.f : v;
      }
    }
    return y;
  }
  DTRAIN_CHECK(s.size() == 4 && s[1] == l.channels, ShapeError,
               "quantized conv: expected input [N,{},H,W], got {}", l.channels, shape_str(s));
  const int64_t oh = (s[2] + 2 * l.padding - l.kernel_size) / l.stride + 1;
  const int64_t ow = (s[3] + 2 * l.padding - l.kernel_size) / l.stride + 1;
  const int64_t plane = oh * ow;
  Tensor y = empty({s[0], l.out, oh, ow});
  if (kernel != Int8Kernel::kOneDnnIm2col) {
    run_direct_conv(l, p, s, kernel, y.data<float>());
    return y;
  }
  std::vector<int8_t> cols(static_cast<size_t>(plane * l.in));
  std::vector<int32_t> acc(static_cast<size_t>(l.out * plane));
  for (int64_t b = 0; b < s[0]; ++b) {  // per image: acc[out, P] = q_W[out, K] * cols[K, P]
    im2col_s8(qx.data(), s, l, b, oh, ow, cols.data());
    gemm_s8s8s32(kernel, l.out, plane, l.in, l.weight.data(), cols.data(), acc.data(),
                 /*b_transposed=*/false);
    dequantize_rows(acc.data(), l, plane, y.data<float>() + b * l.out * plane);
  }
  return y;
}

Tensor QuantizedModel::forward(const Tensor& x, Int8Kernel kernel) const {
  DTRAIN_CHECK(x.dtype() == DType::f32 && x.device().is_cpu(), DTypeError,
               "quantized model: expected a CPU f32 input, got {}", dtype_name(x.dtype()));
  NoGradGuard ng;
  if (kernel == Int8Kernel::kGraph || kernel == Int8Kernel::kGraphReference) {
    DTRAIN_CHECK(graph_ != nullptr, UnsupportedError, "quantized model: no int8 graph: {}",
                 graph_reason_);
    return graph_->run(x, kernel == Int8Kernel::kGraphReference);
  }
  Tensor h = x;
  for (const Step& s : steps_) {
    if (s.fused) continue;
    h = s.layer >= 0 ? run_layer(layers_[static_cast<size_t>(s.layer)], h, kernel)
                     : s.module->forward(h);
  }
  return h;
}

}  // namespace dtrain::compress
