// Convolution as GEMM: im2col / col2im around cpu::gemm (OpenBLAS), f32 and f64.
//
// Images are processed in groups of G so that every GEMM has at least min_cols
// columns: the patches of G images sit side by side in one column matrix
// col [K = c*kh*kw, G*P] (P = oh*ow output pixels per image), so
//   forward           Y_g [o, G*P]  = W [o, K] . col
//   backward data     dcol [K, G*P] = W^T . dY_g,  then col2im adds dcol into dx
//   backward weights  dW [o, K]    += dY_g . col^T (col recomputed from x)
// With G == 1 the GEMM reads and writes the NCHW tensors directly; with G > 1 the
// [o, G*P] blocks are scattered to / gathered from NCHW with one copy. Late layers
// of a CNN have few pixels per image (3x3 in the demo model), where one GEMM per
// image would be tiny; grouping keeps the GEMMs large.
//
// Scratch memory (col and the [o, G*P] block) comes from the caching allocator, so
// a training loop reuses the same blocks every step. Nothing is parallelised here:
// OpenBLAS uses however many threads set_num_threads() gave it.
// Deliberately not done: dilation, groups, and the 1x1 "no im2col needed" shortcut.
#include <algorithm>
#include <cstring>

#include "blas.h"
#include "conv.h"
#include "dtrain/engine/allocator.h"

namespace dtrain::cpu {

namespace {

// A typed block from the engine's caching allocator, returned on destruction.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t count)
      : bytes_(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T)),
        ptr_(static_cast<T*>(default_allocator(Device::cpu())->allocate(bytes_))) {}
  ~Scratch() { default_allocator(Device::cpu())->deallocate(ptr_, bytes_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  size_t bytes_;
  T* ptr_;
};

// Output positions [lo, hi) along one axis whose input coordinate
// out * stride - pad + tap falls inside [0, size).
struct Span {
  int64_t lo, hi;
};

Span valid_span(int64_t tap, int64_t stride, int64_t pad, int64_t size, int64_t out_size) {
  int64_t lo = pad > tap ? (pad - tap + stride - 1) / stride : 0;
  int64_t top = size - 1 + pad - tap;  // largest out * stride allowed
  int64_t hi = top < 0 ? 0 : top / stride + 1;
  lo = std::min(lo, out_size);
  hi = std::clamp(hi, lo, out_size);
  return {lo, hi};
}

// One row of col (kernel tap (i, j) of one input plane): row[oy * ow + ox] =
// plane[(oy*s - pad + i) * w + ox*s - pad + j], zero where that falls in the padding.
template <typename T>
void im2col_row(const ConvGeom& g, const T* plane, int64_t i, int64_t j, T* row) {
  Span ys = valid_span(i, g.stride, g.pad, g.h, g.oh);
  Span xs = valid_span(j, g.stride, g.pad, g.w, g.ow);
  std::fill(row, row + ys.lo * g.ow, T(0));
  for (int64_t oy = ys.lo; oy < ys.hi; ++oy) {
    T* dst = row + oy * g.ow;
    int64_t base = (oy * g.stride - g.pad + i) * g.w - g.pad + j;
    std::fill(dst, dst + xs.lo, T(0));
    if (g.stride == 1) {
      std::memcpy(dst + xs.lo, plane + base + xs.lo,
                  static_cast<size_t>(xs.hi - xs.lo) * sizeof(T));
    } else {
      for (int64_t ox = xs.lo; ox < xs.hi; ++ox) dst[ox] = plane[base + ox * g.stride];
    }
    std::fill(dst + xs.hi, dst + g.ow, T(0));
  }
  std::fill(row + ys.hi * g.ow, row + g.pixels(), T(0));
}

// The adjoint of im2col_row: adds row back into the input positions it was read from.
template <typename T>
void col2im_row(const ConvGeom& g, const T* row, int64_t i, int64_t j, T* plane) {
  Span ys = valid_span(i, g.stride, g.pad, g.h, g.oh);
  Span xs = valid_span(j, g.stride, g.pad, g.w, g.ow);
  for (int64_t oy = ys.lo; oy < ys.hi; ++oy) {
    const T* src = row + oy * g.ow;
    int64_t base = (oy * g.stride - g.pad + i) * g.w - g.pad + j;
    for (int64_t ox = xs.lo; ox < xs.hi; ++ox) plane[base + ox * g.stride] += src[ox];
  }
}

// Writes the K rows of one image's patches at col, rows `ld` apart.
template <typename T>
void im2col(const ConvGeom& g, const T* img, T* col, int64_t ld) {
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        im2col_row(g, img + c * g.h * g.w, i, j, col + ((c * g.kh + i) * g.kw + j) * ld);
      }
    }
  }
}

// Overwrites one image's dx with the sum of its patch gradients.
template <typename T>
void col2im(const ConvGeom& g, const T* col, int64_t ld, T* img) {
  std::fill(img, img + g.c * g.h * g.w, T(0));
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        col2im_row(g, col + ((c * g.kh + i) * g.kw + j) * ld, i, j, img + c * g.h * g.w);
      }
    }
  }
}

int64_t group_size(const ConvGeom& g, int64_t min_cols) {
  int64_t p = std::max<int64_t>(g.pixels(), 1);
  return std::clamp<int64_t>((min_cols + p - 1) / p, 1, std::max<int64_t>(g.n, 1));
}

// The images [n0, n0 + count) of an NCHW-like tensor with `rows` channels of P pixels,
// viewed as one [rows, count*P] block: returned in place when count == 1, else
// gathered into `buf`.
template <typename T>
const T* gather_block(const ConvGeom& g, const T* t, int64_t rows, int64_t n0, int64_t count,
                      T* buf) {
  int64_t p = g.pixels();
  if (count == 1) return t + n0 * rows * p;
  for (int64_t b = 0; b < count; ++b) {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(buf + r * count * p + b * p, t + ((n0 + b) * rows + r) * p,
                  static_cast<size_t>(p) * sizeof(T));
    }
  }
  return buf;
}

// The inverse of gather_block for the output y [n, o, P].
template <typename T>
void scatter_block(const ConvGeom& g, const T* buf, int64_t n0, int64_t count, T* y) {
  int64_t p = g.pixels();
  for (int64_t b = 0; b < count; ++b) {
    for (int64_t r = 0; r < g.o; ++r) {
      std::memcpy(y + ((n0 + b) * g.o + r) * p, buf + r * count * p + b * p,
                  static_cast<size_t>(p) * sizeof(T));
    }
  }
}

}  // namespace

template <typename T>
void conv2d_forward_im2col(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y,
                           int64_t min_cols) {
  int64_t gs = group_size(g, min_cols), p = g.pixels(), k = g.patch();
  int64_t in_img = g.c * g.h * g.w;
  Scratch<T> col(k * gs * p);
  Scratch<T> block(gs > 1 ? g.o * gs * p : 0);
  for (int64_t n0 = 0; n0 < g.n; n0 += gs) {
    int64_t count = std::min(gs, g.n - n0), ld = count * p;
    for (int64_t b = 0; b < count; ++b) im2col(g, x + (n0 + b) * in_img, col.get() + b * p, ld);
    T* out = count == 1 ? y + n0 * g.o * p : block.get();
    if (bias) {
      for (int64_t r = 0; r < g.o; ++r) std::fill(out + r * ld, out + (r + 1) * ld, bias[r]);
    }
    gemm(false, false, g.o, ld, k, T(1), weight, k, col.get(), ld, T(bias ? 1 : 0), out, ld);
    if (count > 1) scatter_block(g, out, n0, count, y);
  }
}

template <typename T>
void conv2d_backward_data_im2col(const ConvGeom& g, const T* dy, const T* weight, T* dx,
                                 int64_t min_cols) {
  int64_t gs = group_size(g, min_cols), p = g.pixels(), k = g.patch();
  int64_t in_img = g.c * g.h * g.w;
  Scratch<T> col(k * gs * p);
  Scratch<T> block(gs > 1 ? g.o * gs * p : 0);
  for (int64_t n0 = 0; n0 < g.n; n0 += gs) {
    int64_t count = std::min(gs, g.n - n0), ld = count * p;
    const T* dyg = gather_block(g, dy, g.o, n0, count, block.get());
    gemm(true, false, k, ld, g.o, T(1), weight, k, dyg, ld, T(0), col.get(), ld);
    for (int64_t b = 0; b < count; ++b) col2im(g, col.get() + b * p, ld, dx + (n0 + b) * in_img);
  }
}

template <typename T>
void conv2d_backward_weights_im2col(const ConvGeom& g, const T* x, const T* dy, T* dweight,
                                    T* dbias, int64_t min_cols) {
  int64_t gs = group_size(g, min_cols), p = g.pixels(), k = g.patch();
  int64_t in_img = g.c * g.h * g.w;
  std::fill(dweight, dweight + g.o * k, T(0));
  Scratch<T> col(k * gs * p);
  Scratch<T> block(gs > 1 ? g.o * gs * p : 0);
  for (int64_t n0 = 0; n0 < g.n; n0 += gs) {
    int64_t count = std::min(gs, g.n - n0), ld = count * p;
    const T* dyg = gather_block(g, dy, g.o, n0, count, block.get());
    for (int64_t b = 0; b < count; ++b) im2col(g, x + (n0 + b) * in_img, col.get() + b * p, ld);
    gemm(false, true, g.o, k, ld, T(1), dyg, ld, col.get(), ld, T(1), dweight, k);
  }
  if (!dbias) return;
  for (int64_t o = 0; o < g.o; ++o) {
    double acc = 0.0;
    for (int64_t n = 0; n < g.n; ++n) {
      const T* src = dy + (n * g.o + o) * p;
      for (int64_t q = 0; q < p; ++q) acc += static_cast<double>(src[q]);
    }
    dbias[o] = static_cast<T>(acc);
  }
}

#define DTRAIN_INSTANTIATE_IM2COL(T)                                                              \
  template void conv2d_forward_im2col<T>(const ConvGeom&, const T*, const T*, const T*, T*,       \
                                         int64_t);                                                \
  template void conv2d_backward_data_im2col<T>(const ConvGeom&, const T*, const T*, T*, int64_t); \
  template void conv2d_backward_weights_im2col<T>(const ConvGeom&, const T*, const T*, T*, T*,    \
                                                  int64_t);
DTRAIN_INSTANTIATE_IM2COL(float)
DTRAIN_INSTANTIATE_IM2COL(double)
#undef DTRAIN_INSTANTIATE_IM2COL

}  // namespace dtrain::cpu
