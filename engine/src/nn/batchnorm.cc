// BatchNorm2d, ReLU6 and GlobalAvgPool2d (nn/batchnorm.h).
#include "dtrain/engine/nn/batchnorm.h"

#include <fmt/format.h>

#include "dtrain/engine/ops.h"

namespace dtrain::nn {

BatchNorm2d::BatchNorm2d(int64_t num_features, double eps, double momentum)
    : Module("BatchNorm2d"), num_features_(num_features), eps_(eps), momentum_(momentum) {
  DTRAIN_CHECK(num_features > 0 && eps > 0 && momentum >= 0 && momentum <= 1, InvalidArgument,
               "BatchNorm2d: invalid options (features {}, eps {}, momentum {})", num_features, eps,
               momentum);
  weight = register_parameter("weight", ones({num_features}));
  bias = register_parameter("bias", zeros({num_features}));
  running_mean = register_buffer("running_mean", zeros({num_features}));
  running_var = register_buffer("running_var", ones({num_features}));
}

std::string BatchNorm2d::extra_repr() const {
  return fmt::format("{}, eps {}, momentum {}{}", num_features_, eps_, momentum_,
                     is_sync() ? ", sync" : "");
}

Tensor BatchNorm2d::forward(const Tensor& x) {
  DTRAIN_CHECK(x.dim() == 4 && x.shape()[1] == num_features_, ShapeError,
               "{}: expected input [N,{},H,W], got {}", describe(), num_features_,
               shape_str(x.shape()));
  DTRAIN_CHECK(x.dtype() == weight.dtype(), DTypeError, "{}: expected {} input, got {}", describe(),
               dtype_name(weight.dtype()), dtype_name(x.dtype()));
  BatchNormOptions opt{is_training(), momentum_, eps_, reduce_ ? &reduce_ : nullptr};
  return batch_norm2d(x, weight, bias, running_mean, running_var, opt);
}

Tensor ReLU6::forward(const Tensor& x) { return relu6(x); }

Tensor GlobalAvgPool2d::forward(const Tensor& x) {
  DTRAIN_CHECK(x.dim() == 4, ShapeError, "{}: expected input [N,C,H,W], got {}", describe(),
               shape_str(x.shape()));
  return mean(x, {2, 3}, /*keepdim=*/true);
}

}  // namespace dtrain::nn
