// CPU kernels for 2-D convolution and max pooling, NCHW (internal to the engine).
//
// Three kernel families compute the same functions on raw contiguous buffers:
//   *_ref     plain direct loops accumulating in double: the test oracle (conv_ref.cc).
//             The pooling ones double as the f64 pooling path.
//   *_im2col  im2col / col2im around cpu::gemm (OpenBLAS), f32 and f64 (conv_im2col.cc).
//   *_onednn  oneDNN primitives, f32 only (conv_onednn.cc).
// ops_conv.cc checks shapes, picks a family and records autograd; these kernels do
// no argument checking beyond what their REQUIRES lines state.
//
// Conventions shared by every family:
//   x [n,c,h,w], weight [o,c,kh,kw], bias [o] or null, y [n,o,oh,ow]; one stride and
//   one padding for both spatial dimensions and both sides (as torch.nn.Conv2d).
//   Forward and backward kernels overwrite their outputs (no accumulation).
//   Max pooling pads with -inf; the first maximum in window scan order wins (as
//   PyTorch), and NaN counts as a maximum. argmax holds the index of the winner
//   inside its input plane (iy * w + ix).
// Thread-safety: every kernel may run concurrently on different buffers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain::cpu {

struct ConvGeom {
  int64_t n = 0, c = 0, h = 0, w = 0;  // input
  int64_t o = 0, kh = 0, kw = 0;       // weight (o output channels, c input channels)
  int64_t stride = 1, pad = 0;
  int64_t oh = 0, ow = 0;  // output
  int64_t groups = 1;      // > 1: weight [o, c/groups, kh, kw] (conv_grouped.h)
  int64_t patch() const { return c * kh * kw; }  // the GEMM reduction size
  int64_t pixels() const { return oh * ow; }     // output pixels per image and channel
};

// Fills in oh and ow. REQUIRES: stride >= 1, pad >= 0, kh <= h + 2 pad, kw <= w + 2 pad.
ConvGeom make_conv_geom(int64_t n, int64_t c, int64_t h, int64_t w, int64_t o, int64_t kh,
                        int64_t kw, int64_t stride, int64_t pad);

struct PoolGeom {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t kernel = 2, stride = 2, pad = 0;
  int64_t oh = 0, ow = 0;
  int64_t planes() const { return n * c; }
};

// Fills in oh and ow. REQUIRES: stride >= 1, 0 <= pad <= kernel / 2, kernel <= h + 2 pad
// and kernel <= w + 2 pad (so every window holds at least one input element).
PoolGeom make_pool_geom(int64_t n, int64_t c, int64_t h, int64_t w, int64_t kernel, int64_t stride,
                        int64_t pad);

// ---- reference (T = float or double) ----
template <typename T>
void conv2d_forward_ref(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y);
template <typename T>
void conv2d_backward_data_ref(const ConvGeom& g, const T* dy, const T* weight, T* dx);
// dbias may be null.
template <typename T>
void conv2d_backward_weights_ref(const ConvGeom& g, const T* x, const T* dy, T* dweight, T* dbias);
template <typename T>
void max_pool2d_forward_ref(const PoolGeom& g, const T* x, T* y, int32_t* argmax);
template <typename T>
void max_pool2d_backward_ref(const PoolGeom& g, const T* dy, const int32_t* argmax, T* dx);

// ---- im2col + GEMM (T = float or double) ----
// Small images are grouped so each GEMM has at least `min_cols` columns (images x
// output pixels); 1 means one GEMM per image. The default was picked with
// bench/conv_kernels (demo CNN, one step: 18.2 ms vs 18.8 per image, 20.0 for one
// GEMM over the whole batch; it matters for the 3x3-pixel last layer).
inline constexpr int64_t kIm2colMinCols = 512;
template <typename T>
void conv2d_forward_im2col(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y,
                           int64_t min_cols = kIm2colMinCols);
template <typename T>
void conv2d_backward_data_im2col(const ConvGeom& g, const T* dy, const T* weight, T* dx,
                                 int64_t min_cols = kIm2colMinCols);
// dbias may be null.
template <typename T>
void conv2d_backward_weights_im2col(const ConvGeom& g, const T* x, const T* dy, T* dweight,
                                    T* dbias, int64_t min_cols = kIm2colMinCols);

// ---- oneDNN (f32) ----
// kPlain hands oneDNN our NCHW/OIHW buffers as they are; kBlocked lets it choose its
// preferred (blocked) layouts and reorders to and from them inside the call.
enum class OneDnnLayout { kPlain, kBlocked };
void conv2d_forward_onednn(const ConvGeom& g, const float* x, const float* weight,
                           const float* bias, float* y, OneDnnLayout layout);
void conv2d_backward_data_onednn(const ConvGeom& g, const float* dy, const float* weight, float* dx,
                                 OneDnnLayout layout);
// dbias may be null.
void conv2d_backward_weights_onednn(const ConvGeom& g, const float* x, const float* dy,
                                    float* dweight, float* dbias, OneDnnLayout layout);
// Max pooling keeps oneDNN's opaque workspace (which element won) between the passes.
size_t max_pool2d_workspace_bytes_onednn(const PoolGeom& g);
void max_pool2d_forward_onednn(const PoolGeom& g, const float* x, float* y, void* workspace);
void max_pool2d_backward_onednn(const PoolGeom& g, const float* dy, const void* workspace,
                                float* dx);

}  // namespace dtrain::cpu
