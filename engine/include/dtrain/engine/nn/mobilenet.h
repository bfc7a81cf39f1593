// "mobilenet": a small MobileNet-v1-style network for MNIST (input f32 [B,1,28,28],
// 10 classes), and the multiply-add count of a reference model.
//
//   stem   Conv2d(1,16,3,pad 1,no bias) BatchNorm2d(16) ReLU6                28x28
//   5 depthwise-separable blocks, each
//          Conv2d(c,c,3,stride s,pad 1,groups c,no bias) BatchNorm2d(c) ReLU6
//          Conv2d(c,c',1,no bias) BatchNorm2d(c') ReLU6
//          16->32 s1 (28x28), 32->64 s2 (14x14), 64->64 s1, 64->128 s2 (7x7), 128->128 s1
//   head   GlobalAvgPool2d Flatten Linear(128,10)
// 36,874 parameters, 3.29 M multiply-adds per sample (seed-cnn: 93,322 and 2.79 M);
// `dtrain models` prints both.
#pragma once

#include <cstdint>
#include <string>

#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/random.h"

namespace dtrain::nn {

// Appends the layers above to m (make_model("mobilenet") calls it).
void build_mobilenet(Sequential& m, Generator& gen);

// Multiply-adds of one sample's forward pass through a Sequential model: every
// Conv2d (output elements x in_channels / groups x k x k), Linear (output elements
// x in_features) and LSTM (timesteps x the elements of its two weight matrices);
// other layers count 0. Runs the model once on a zero sample in eval mode, then
// restores the mode.
int64_t count_multiply_adds(Sequential& model, const Shape& sample_shape, DType dtype);

}  // namespace dtrain::nn
