// Batch normalisation over NCHW (torch.nn.functional.batch_norm), ReLU6, and the
// hook that makes it synchronised across data-parallel ranks.
//
// Training: per channel, the batch mean and the biased variance over (N, H, W)
// normalise x; the running statistics move by `momentum` towards the batch mean and
// the UNBIASED batch variance (count / (count - 1)), as PyTorch does. Eval: the
// running statistics normalise x and are left alone. The running tensors are updated
// in place (no autograd), have x's dtype and shape [C].
//
// Synchronised (SyncBatchNorm): with a StatsAllReduce, forward sums (sum x, sum x^2,
// count) per channel over all ranks before normalising, and backward sums (sum dy,
// sum dy * (x - mean)) the same way, so each rank's outputs and input gradients
// equal those of one rank holding the whole batch. The weight and bias gradients
// stay local (the data-parallel gradient all-reduce combines them). Every rank must
// call it the same number of times in the same order (it is a collective).
//
// CPU, f32 and f64 (statistics accumulate in double). Differentiable in x, weight
// and bias (first order).
#pragma once

#include <cstddef>
#include <functional>

#include "dtrain/engine/tensor.h"

namespace dtrain {

// Sums `count` doubles in place over the data-parallel ranks.
using StatsAllReduce = std::function<void(double* data, size_t count)>;

struct BatchNormOptions {
  bool training = true;
  double momentum = 0.1;
  double eps = 1e-5;
  const StatsAllReduce* reduce = nullptr;  // non-null: synchronised statistics
};

// x [N,C,H,W]; weight, bias, running_mean, running_var [C] with x's dtype.
Tensor batch_norm2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& running_mean,
                    Tensor& running_var, const BatchNormOptions& opt);

// min(max(x, 0), 6), any shape; the gradient is 1 strictly inside (0, 6).
Tensor relu6(const Tensor& x);

}  // namespace dtrain
