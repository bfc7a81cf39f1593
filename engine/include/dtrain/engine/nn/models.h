// The reference models, by name, for examples, benchmarks and tests.
//
//   "seed-cnn"   input f32 [B,1,28,28], 10 classes:
//                Conv2d(1,32,3) ReLU MaxPool2d(2) Conv2d(32,64,3) ReLU MaxPool2d(2)
//                Conv2d(64,64,3) ReLU Flatten Linear(576,64) ReLU Linear(64,10)
//   "mlp"        input f32 [B,784] or [B,1,28,28] (flattened), 10 classes:
//                Flatten Linear(784,256) ReLU Linear(256,256) ReLU Linear(256,10)
//   "seed-lstm"  input i64 tokens [B,20] in [0,1000), predicts the next token:
//                Embedding(1000,128) LSTM(128,128) LastTimeStep Linear(128,1000)
//   "mobilenet"  input f32 [B,1,28,28], 10 classes: a MobileNet-v1-style net with
//                BatchNorm2d (train/eval modes, running stats as buffers), nn/mobilenet.h
//
// Every model is an nn::Sequential whose children are named "0", "1", ..., so the
// parameter names are "0.weight", "9.bias", ... A shape or dtype error raised inside
// the model names the failing layer and both shapes, and ends with what the model
// expects ("...; seed-cnn expects input f32 [B,1,28,28]"). Each model's output is
// logits [B, num_classes] for cross_entropy with an i64 [B] target.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/random.h"

namespace dtrain::nn {

struct ModelInfo {
  std::string name;
  std::string input;   // e.g. "f32 [B,1,28,28]"
  std::string target;  // e.g. "i64 [B] in [0,10)"
  Shape input_shape;   // per-sample shape, e.g. {1,28,28}
  DType input_dtype;
  int64_t num_classes;  // output width; also the token vocabulary of seed-lstm
};

// The known model names, in a stable order.
std::vector<std::string> model_names();
// Throws InvalidArgument listing the known names for an unknown one.
const ModelInfo& model_info(const std::string& name);
// A freshly initialised model (PyTorch-default init drawn from gen).
std::shared_ptr<Sequential> make_model(const std::string& name, Generator& gen);

struct Batch {
  Tensor input;
  Tensor target;  // i64 [B]
};
// A random batch of `batch_size` samples with the model's input shape and dtype
// (f32 ~ N(0,1) pixels, or uniform tokens) and uniform class targets, for
// benchmarks and smoke tests.
Batch make_random_batch(const std::string& name, int64_t batch_size, Generator& gen);

}  // namespace dtrain::nn
