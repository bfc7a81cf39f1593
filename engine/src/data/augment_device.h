// The device half of augment_batch (augment.h): engine/src/cuda/augment_cuda.cc in a
// CUDA build, a stub that throws UnsupportedError (augment_device.cc) otherwise.
#pragma once

#include <cstddef>
#include <vector>

#include "dtrain/engine/data/augment_functors.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::data {

// batch: contiguous-able f32 [B,C,H,W] on a CUDA device; params: B * stages_per_sample
// stages, sample-major. Returns the augmented batch on the same device.
Tensor augment_on_device(const Tensor& batch, const std::vector<fn::AugStage>& params,
                         size_t stages_per_sample);

}  // namespace dtrain::data
