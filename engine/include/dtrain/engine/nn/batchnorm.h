// BatchNorm2d, ReLU6 and GlobalAvgPool2d: the layers MobileNet adds to layers.h.
//
// BatchNorm2d (torch.nn.BatchNorm2d, affine, track_running_stats): parameters
// "weight" (ones) and "bias" (zeros), buffers "running_mean" (zeros) and
// "running_var" (ones), so the running statistics travel with state_dict() and
// every checkpoint. Training mode normalises with the batch statistics and updates
// the running ones; eval mode (Module::eval()) uses the running ones. Setting a
// StatsAllReduce (set_stats_reduce, or parallel::convert_sync_batchnorm) makes it a
// SyncBatchNorm: batch statistics over every data-parallel rank (batch_norm.h).
#pragma once

#include <cstdint>
#include <string>

#include "dtrain/engine/batch_norm.h"
#include "dtrain/engine/nn/module.h"

namespace dtrain::nn {

class BatchNorm2d : public Module {
 public:
  explicit BatchNorm2d(int64_t num_features, double eps = 1e-5, double momentum = 0.1);
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  // Synchronised statistics across ranks (an empty function: local statistics again).
  void set_stats_reduce(StatsAllReduce reduce) { reduce_ = std::move(reduce); }
  bool is_sync() const { return static_cast<bool>(reduce_); }

  Tensor weight, bias;               // [C] parameters
  Tensor running_mean, running_var;  // [C] buffers

 private:
  int64_t num_features_;
  double eps_, momentum_;
  StatsAllReduce reduce_;
};

// min(max(x, 0), 6), any shape.
class ReLU6 : public Module {
 public:
  ReLU6() : Module("ReLU6") {}
  Tensor forward(const Tensor& x) override;
};

// AdaptiveAvgPool2d(1): [N,C,H,W] -> [N,C,1,1], the mean of each plane.
class GlobalAvgPool2d : public Module {
 public:
  GlobalAvgPool2d() : Module("GlobalAvgPool2d") {}
  Tensor forward(const Tensor& x) override;
};

}  // namespace dtrain::nn
