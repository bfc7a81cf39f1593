// Magnitude pruning of the Linear and Conv2d weights of a model.
//
// prune_by_magnitude() zeroes the smallest-magnitude weights so that exactly
// floor(sparsity * n) of them are zero: n counts every prunable weight of the model
// (global: one threshold over all of them) or of each layer (per layer: the same
// fraction of every weight tensor). Ties at the threshold are broken by position, so
// the count is exact. Biases are never pruned.
//
// The result is a PruneMasks: for each pruned parameter (by its state_dict name,
// "0.weight") a 0/1 f32 mask of the weight's shape. Keeping a pruned model pruned
// while it trains is the caller's job, in this order each step:
//   backward -> masks.mask_gradients(model) -> optimizer.step() -> masks.apply(model)
// (masking the gradients keeps momentum buffers from growing on pruned weights;
// re-applying to the weights makes the zeros exact even with weight decay).
//
// Checkpoints: to_json()/from_json() store the masks bit-packed (hex, row-major) with
// the sparsity and mode, for a checkpoint's `extra` (serialize.h), so a resumed run
// keeps exactly the same mask. Errors: InvalidArgument for a sparsity outside [0,1),
// a model without prunable weights, or masks that do not fit the model (naming the
// parameter and both shapes).
#pragma once

#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "dtrain/engine/nn/module.h"

namespace dtrain::compress {

struct PruneOptions {
  double sparsity = 0.5;  // in [0, 1)
  bool global = false;    // one threshold over every prunable weight
};

class PruneMasks {
 public:
  PruneMasks() = default;
  // Zeroes the weights in place (see the file comment) and returns the masks.
  static PruneMasks prune_by_magnitude(nn::Module& model, const PruneOptions& options);
  // Multiplies each masked parameter by its mask (in place, not recorded by autograd).
  void apply(nn::Module& model) const;
  // The same for the parameters' gradients (those that are defined).
  void mask_gradients(nn::Module& model) const;

  bool empty() const { return masks_.empty(); }
  const std::map<std::string, Tensor>& masks() const { return masks_; }
  const PruneOptions& options() const { return options_; }

  nlohmann::json to_json() const;
  // Validates every name and shape against `model`.
  static PruneMasks from_json(const nlohmann::json& j, const nn::Module& model);

 private:
  PruneOptions options_;
  std::map<std::string, Tensor> masks_;  // name -> f32 0/1, the weight's shape
};

// Names of the prunable weights (Linear and Conv2d "weight"), in registration order.
std::vector<std::string> prunable_weights(const nn::Module& model);

// Zero entries / all entries over the prunable weights of the model (0 when none).
struct SparsityReport {
  int64_t zeros = 0;
  int64_t total = 0;
  double fraction() const { return total > 0 ? static_cast<double>(zeros) / total : 0.0; }
};
SparsityReport weight_sparsity(const nn::Module& model);

}  // namespace dtrain::compress
