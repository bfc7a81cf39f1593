// The "mobilenet" reference model and the multiply-add counter (nn/mobilenet.h).
#include "dtrain/engine/nn/mobilenet.h"

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/batchnorm.h"

namespace dtrain::nn {

namespace {

void conv_bn_relu6(Sequential& m, const Conv2dOptions& conv, Generator& gen) {
  m.push_back(std::make_shared<Conv2d>(conv, gen));
  m.push_back(std::make_shared<BatchNorm2d>(conv.out_channels()));
  m.push_back(std::make_shared<ReLU6>());
}

// Depthwise 3x3 (stride s) then pointwise 1x1, each followed by BN and ReLU6.
void separable_block(Sequential& m, int64_t in, int64_t out, int64_t stride, Generator& gen) {
  conv_bn_relu6(m, Conv2dOptions(in, in, 3).stride(stride).padding(1).groups(in).bias(false), gen);
  conv_bn_relu6(m, Conv2dOptions(in, out, 1).bias(false), gen);
}

int64_t layer_macs(const Module& layer, const Tensor& in, const Tensor& out) {
  if (const auto* conv = dynamic_cast<const Conv2d*>(&layer)) {
    const Conv2dOptions& o = conv->options();
    return out.numel() * (o.in_channels() / o.groups()) * o.kernel_size() * o.kernel_size();
  }
  if (const auto* lin = dynamic_cast<const Linear*>(&layer)) {
    return out.numel() * lin->options().in_features();
  }
  if (const auto* lstm = dynamic_cast<const LSTM*>(&layer)) {
    return in.shape()[1] * (lstm->weight_ih.numel() + lstm->weight_hh.numel());
  }
  return 0;
}

}  // namespace

void build_mobilenet(Sequential& m, Generator& gen) {
  conv_bn_relu6(m, Conv2dOptions(1, 16, 3).padding(1).bias(false), gen);
  separable_block(m, 16, 32, 1, gen);
  separable_block(m, 32, 64, 2, gen);
  separable_block(m, 64, 64, 1, gen);
  separable_block(m, 64, 128, 2, gen);
  separable_block(m, 128, 128, 1, gen);
  m.push_back(std::make_shared<GlobalAvgPool2d>());
  m.push_back(std::make_shared<Flatten>());
  m.push_back(std::make_shared<Linear>(128, 10, gen));
}

int64_t count_multiply_adds(Sequential& model, const Shape& sample_shape, DType dtype) {
  Shape shape = sample_shape;
  shape.insert(shape.begin(), 1);
  const bool was_training = model.is_training();
  model.eval();
  NoGradGuard no_grad;
  Tensor x = zeros(shape, TensorOptions{}.with_dtype(dtype));
  int64_t macs = 0;
  for (size_t i = 0; i < model.size(); ++i) {
    Tensor y = model[i]->forward(x);
    macs += layer_macs(*model[i], x, y);
    x = y;
  }
  model.train(was_training);
  return macs;
}

}  // namespace dtrain::nn
