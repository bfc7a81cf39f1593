// Launcher of the augmentation kernel (augment.cu), over raw device pointers, like
// kernels.h. One thread per output pixel computes fn::augment_pixel, the CPU's
// arithmetic (augment_functors.h).
#pragma once

#include <cstdint>

#include "dtrain/engine/data/augment_functors.h"

namespace dtrain::cuda {

// out[b,c,:,:] = stage `stage` of sample b applied to in[b,c,:,:], for every b, c.
// params: device array of batch * stages_per_sample AugStage, sample-major.
void augment_stage(const float* in, float* out, int64_t batch, int64_t channels, int64_t height,
                   int64_t width, const fn::AugStage* params, int64_t stages_per_sample,
                   int64_t stage, void* stream);

}  // namespace dtrain::cuda
