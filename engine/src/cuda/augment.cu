// The augmentation kernel: the per-pixel functor of augment_functors.h, one thread per
// output pixel (augment_kernels.h).
#include "augment_kernels.h"
#include "kernels.h"

#include <cuda_runtime.h>

namespace dtrain::cuda {

namespace {

__global__ void augment_stage_kernel(const float* in, float* out, int64_t n, int64_t channels,
                                     int32_t h, int32_t w, const fn::AugStage* params,
                                     int64_t stages_per_sample, int64_t stage) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t plane = static_cast<int64_t>(h) * w;
  const int64_t p = i / plane;  // which (b, c) plane
  const int64_t b = p / channels;
  const int32_t y = static_cast<int32_t>((i % plane) / w), x = static_cast<int32_t>(i % w);
  const fn::AugStage s = params[b * stages_per_sample + stage];
  out[i] = fn::augment_pixel(s, in + p * plane, h, w, y, x);
}

}  // namespace

void augment_stage(const float* in, float* out, int64_t batch, int64_t channels, int64_t height,
                   int64_t width, const fn::AugStage* params, int64_t stages_per_sample,
                   int64_t stage, void* stream) {
  const int64_t n = batch * channels * height * width;
  if (n == 0) return;
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  augment_stage_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      in, out, n, channels, static_cast<int32_t>(height), static_cast<int32_t>(width), params,
      stages_per_sample, stage);
  check_launch("augment_stage");
}

}  // namespace dtrain::cuda
