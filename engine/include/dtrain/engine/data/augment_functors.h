// The per-pixel arithmetic of data augmentation, shared by the CPU loops
// (engine/src/data/augment.cc) and the CUDA kernels (engine/src/cuda/augment.cu).
//
// One AugStage is one transform of one sample with its random draws already made
// (on the host, by draw_augment_params in augment.h): a crop offset, a flip bit, a
// 2x3 inverse affine matrix or a mean/std. augment_pixel() computes one output pixel
// of one channel plane from the stage's input plane. Multiply-adds are written as
// explicit fmaf (correctly rounded on both sides), the only other operations are
// subtraction, division and floorf, so a CPU and a GPU give bit-identical images.
// Nothing here may throw or use std:: containers (it compiles under nvcc).
#pragma once

#include <cmath>
#include <cstdint>

#include "dtrain/engine/functors.h"  // DTRAIN_HD

namespace dtrain::fn {

enum AugKind : int32_t {
  kAugCrop = 0,       // out(y,x) = in(y + dy - pad, x + dx - pad), 0 outside
  kAugFlip = 1,       // out(y,x) = in(y, W-1-x) when flip, else in(y,x)
  kAugAffine = 2,     // out(y,x) = bilinear(in, m * (x, y, 1)), 0 outside
  kAugNormalize = 3,  // out = (in - mean) / std
};

struct AugStage {
  int32_t kind = kAugNormalize;
  int32_t dx = 0, dy = 0, pad = 0;  // crop: offset in [0, 2*pad]
  int32_t flip = 0;                 // flip: 1 = mirror this sample
  float m[6] = {1, 0, 0, 0, 1, 0};  // affine: source x = m0 x + m1 y + m2, y = m3 x + m4 y + m5
  float mean = 0, std = 1;          // normalize
};

DTRAIN_HD float aug_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// in(y, x) of an H x W plane, 0 outside.
DTRAIN_HD float aug_at(const float* in, int32_t h, int32_t w, int32_t y, int32_t x) {
  return (y >= 0 && y < h && x >= 0 && x < w) ? in[y * w + x] : 0.0f;
}

DTRAIN_HD float aug_bilinear(const float* in, int32_t h, int32_t w, float sx, float sy) {
  float fx0 = floorf(sx), fy0 = floorf(sy);
  float fx = sx - fx0, fy = sy - fy0;
  int32_t x0 = static_cast<int32_t>(fx0), y0 = static_cast<int32_t>(fy0);
  float v00 = aug_at(in, h, w, y0, x0), v01 = aug_at(in, h, w, y0, x0 + 1);
  float v10 = aug_at(in, h, w, y0 + 1, x0), v11 = aug_at(in, h, w, y0 + 1, x0 + 1);
  float top = aug_fma(fx, v01 - v00, v00);
  float bottom = aug_fma(fx, v11 - v10, v10);
  return aug_fma(fy, bottom - top, top);
}

// One output pixel (y, x) of one channel plane under stage s.
DTRAIN_HD float augment_pixel(const AugStage& s, const float* in, int32_t h, int32_t w, int32_t y,
                              int32_t x) {
  switch (s.kind) {
    case kAugCrop:
      return aug_at(in, h, w, y + s.dy - s.pad, x + s.dx - s.pad);
    case kAugFlip:
      return in[y * w + (s.flip ? w - 1 - x : x)];
    case kAugAffine: {
      float fx = static_cast<float>(x), fy = static_cast<float>(y);
      float sx = aug_fma(s.m[0], fx, aug_fma(s.m[1], fy, s.m[2]));
      float sy = aug_fma(s.m[3], fx, aug_fma(s.m[4], fy, s.m[5]));
      return aug_bilinear(in, h, w, sx, sy);
    }
    default:
      return (in[y * w + x] - s.mean) / s.std;
  }
}

}  // namespace dtrain::fn
