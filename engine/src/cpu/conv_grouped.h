// CPU kernels for grouped and depthwise 2-D convolution, NCHW (internal to the engine).
//
// A ConvGeom with groups G > 1 splits the c input and o output channels into G equal
// groups; output channel oc reads only the input channels of its group, and the
// weight is [o, c/G, kh, kw] (as torch.nn.Conv2d(groups=G)). Depthwise is the case
// G == c (each output channel reads one input channel; o = c * multiplier).
//
//   conv2d_*_ref (conv.h) direct loops accumulating in double, any G: the test oracle.
//   *_grouped  per group: gather the group's channels into contiguous buffers and run
//              the im2col + GEMM kernels of conv.h on them (the weight slice of a
//              group is already contiguous).
//   *_depthwise  direct per-plane loops whose inner loop runs along an output row, so
//              it vectorises for stride 1 (G == c only).
// Same conventions as conv.h: outputs are overwritten, dbias may be null.
#pragma once

#include "conv.h"

namespace dtrain::cpu {

// c / groups and o / groups.
inline int64_t group_in(const ConvGeom& g) { return g.c / g.groups; }
inline int64_t group_out(const ConvGeom& g) { return g.o / g.groups; }

template <typename T>
void conv2d_grouped_forward(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y);
template <typename T>
void conv2d_grouped_backward_data(const ConvGeom& g, const T* dy, const T* weight, T* dx);
template <typename T>
void conv2d_grouped_backward_weights(const ConvGeom& g, const T* x, const T* dy, T* dweight,
                                     T* dbias);

// REQUIRES: g.groups == g.c.
template <typename T>
void conv2d_depthwise_forward(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y);
template <typename T>
void conv2d_depthwise_backward_data(const ConvGeom& g, const T* dy, const T* weight, T* dx);
template <typename T>
void conv2d_depthwise_backward_weights(const ConvGeom& g, const T* x, const T* dy, T* dweight,
                                       T* dbias);

}  // namespace dtrain::cpu
