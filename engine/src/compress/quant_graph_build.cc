// QuantizedModel::make_graph (quant.h): the int8 graph's ops (quant_graph.h) from the
// quantized layers, their calibrated scales and the ReLU / MaxPool2d / Flatten between
// them; or, for a model the graph cannot run, the reason (graph_unavailable()).
#include <exception>

#include "dtrain/common/error.h"
#include "dtrain/engine/compress/quant.h"

namespace dtrain::compress {

namespace {

// The graph's input scale of a layer: amax / 255 on u8, amax / 127 on s8.
float graph_scale(const QuantizedModel::Layer& l, bool u8) {
  return l.input_scale * 127.f / (u8 ? 255.f : 127.f);
}

Int8GraphOp layer_op(const QuantizedModel::Layer& l, float s_in, float s_next, bool last) {
  Int8GraphOp op;
  op.kind = l.conv ? Int8GraphOp::Kind::kConv : Int8GraphOp::Kind::kLinear;
  op.out = l.out;
  op.in = l.in;
  op.channels = l.channels;
  op.kernel = l.kernel_size;
  op.stride = l.stride;
  op.padding = l.padding;
  op.weight = l.weight;
  op.relu = l.relu;
  op.last = last;
  op.bias.resize(static_cast<size_t>(l.out));
  op.oscale.resize(static_cast<size_t>(l.out));
  for (size_t o = 0; o < op.bias.size(); ++o) {
    const float acc_scale = s_in * l.weight_scale[o];
    op.bias[o] = l.bias[o] / acc_scale;
    op.oscale[o] = acc_scale / s_next;
  }
  return op;
}

Int8GraphOp pool_op(const nn::MaxPool2d& m) {
  Int8GraphOp op;
  op.kind = Int8GraphOp::Kind::kMaxPool;
  op.kernel = m.options().kernel;
  op.stride = m.options().stride > 0 ? m.options().stride : op.kernel;
  op.padding = m.options().padding;
  return op;
}

}  // namespace

void QuantizedModel::make_graph(const Shape& example) {
  // The sequence: the quantized layers (by index) and max-pools, checked first.
  std::vector<int> seq;  // layer index, or -1 - (step index) for a max-pool
  for (size_t i = 0; i < steps_.size(); ++i) {
    const Step& s = steps_[i];
    if (s.fused || dynamic_cast<const nn::Flatten*>(s.module.get())) continue;
    if (s.layer >= 0) {
      seq.push_back(s.layer);
    } else if (dynamic_cast<const nn::MaxPool2d*>(s.module.get()) && !seq.empty()) {
      seq.push_back(-1 - static_cast<int>(i));
    } else {
      graph_reason_ = fmt::format(
          "{} runs in f32 (the int8 graph takes quantized layers, a "
          "ReLU right after one, MaxPool2d after the first, Flatten)",
          s.module->describe());
      return;
    }
  }
  if (seq.empty() || seq.back() < 0 || layers_[static_cast<size_t>(seq.back())].conv) {
    graph_reason_ = "the int8 graph needs a Linear as the last layer";
    return;
  }
  // Scales: a layer's input is u8 when a ReLU ends the layer before it (or, for the first,
  // when its calibrated input was >= 0).
  std::vector<int> qidx;
  for (int v : seq) {
    if (v >= 0) qidx.push_back(v);
  }
  std::vector<float> s_in(qidx.size());
  std::vector<bool> u8(qidx.size());
  for (size_t j = 0; j < qidx.size(); ++j) {
    const Layer& l = layers_[static_cast<size_t>(qidx[j])];
    u8[j] = j == 0 ? l.input_nonneg : layers_[static_cast<size_t>(qidx[j - 1])].relu;
    s_in[j] = graph_scale(l, u8[j]);
  }
  std::vector<Int8GraphOp> ops;
  size_t j = 0;
  for (int v : seq) {
    if (v < 0) {
      ops.push_back(pool_op(
          *dynamic_cast<const nn::MaxPool2d*>(steps_[static_cast<size_t>(-1 - v)].module.get())));
      continue;
    }
    const bool last = j + 1 == qidx.size();
    ops.push_back(
        layer_op(layers_[static_cast<size_t>(v)], s_in[j], last ? 1.f : s_in[j + 1], last));
    ++j;
  }
  try {  // oneDNN may lack an int8 primitive for a shape: then the per-layer path runs
    graph_ = std::make_shared<const Int8Graph>(std::move(ops), s_in[0], u8[0], example);
  } catch (const std::exception& e) {
    graph_reason_ = e.what();
  }
}

}  // namespace dtrain::compress
