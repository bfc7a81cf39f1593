// conv2d and max_pool2d with an explicit kernel choice (internal to the engine).
//
// The public ops in ops.h use kAuto, which picks the measured default for the dtype
// (see ops_conv.cc). Tests force every family to compare it with the reference, and
// bench/conv_kernels forces each to time it. A forced choice that cannot run the
// dtype (oneDNN with f64) throws DTypeError rather than silently switching kernels.
#pragma once

#include "cpu/conv.h"
#include "dtrain/engine/ops.h"

namespace dtrain {

enum class ConvAlgo {
  kAuto,           // the default for the dtype
  kReference,      // cpu::*_ref direct loops (slow; the oracle)
  kIm2col,         // im2col + OpenBLAS GEMM, f32 and f64
  kOneDnnPlain,    // oneDNN on our NCHW/OIHW buffers, f32
  kOneDnnBlocked,  // oneDNN in its preferred layouts, reordering inside each call, f32
};
enum class PoolAlgo {
  kAuto,    // the default for the dtype
  kDirect,  // the plain loops of cpu::max_pool2d_*_ref
  kOneDnn,  // oneDNN pooling, f32
};

const char* conv_algo_name(ConvAlgo algo);
const char* pool_algo_name(PoolAlgo algo);

// What kAuto means for a dtype (never returns kAuto).
ConvAlgo default_conv_algo(DType dtype);
PoolAlgo default_pool_algo(DType dtype);

// The ops of ops.h with the kernels (forward and backward) forced to `algo`.
Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt,
              ConvAlgo algo);
Tensor max_pool2d(const Tensor& x, MaxPool2dOptions opt, PoolAlgo algo);
// The checked geometry of conv2d(x, weight, bias, opt): throws what conv2d throws for
// bad input (the bf16 paths of amp_cpu.cc check through it).
cpu::ConvGeom conv2d_geometry(const Tensor& x, const Tensor& weight, const Tensor& bias,
                              const Conv2dOptions& opt);

// ---- grouped convolution (ops_conv_grouped.cc) ----
// Throws ShapeError unless groups >= 1 divides both channel counts and the weight has
// C / groups input channels; names the numbers.
void check_conv_groups(const Shape& x_shape, const Shape& w_shape, int64_t groups);
// conv2d on the CPU for g.groups > 1 (shapes already checked). kReference runs the
// direct oracle loops; otherwise depthwise (groups == C) runs the direct depthwise
// kernels and other group counts per-group im2col + GEMM (cpu/conv_grouped.h).
Tensor conv2d_grouped_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias,
                          const cpu::ConvGeom& g, ConvAlgo algo);

}  // namespace dtrain
