// Grouped convolution as per-group im2col + GEMM, and the direct depthwise kernels.
//
// Per group the input (or output gradient) channels of the group are gathered into a
// contiguous [n, c/G, h, w] buffer, so the kernels of conv_im2col.cc run unchanged on
// a sub-geometry; the group's weight rows are already contiguous in [o, c/G, kh, kw].
// The depthwise kernels (G == c) work plane by plane: for each kernel tap they add a
// scaled, shifted input row to an output row, the inner loop running along the row
// over the output columns whose input column is inside the image (no bounds test in
// the loop, so it vectorises for stride 1). Planes run in parallel (parallel.h).
#include <algorithm>
#include <vector>

#include "conv_grouped.h"
#include "parallel.h"

namespace dtrain::cpu {

namespace {

ConvGeom sub_geom(const ConvGeom& g) {
  return make_conv_geom(g.n, group_in(g), g.h, g.w, group_out(g), g.kh, g.kw, g.stride, g.pad);
}

// Copies channels [c0, c0 + cs) of src [n, ctotal, plane] into dst [n, cs, plane], or
// back (to_src).
template <typename T>
void copy_channels(const T* src, T* dst, int64_t n, int64_t ctotal, int64_t c0, int64_t cs,
                   int64_t plane) {
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(src + (i * ctotal + c0) * plane, cs * plane, dst + i * cs * plane);
  }
}
template <typename T>
void scatter_channels(const T* src, T* dst, int64_t n, int64_t ctotal, int64_t c0, int64_t cs,
                      int64_t plane) {
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(src + i * cs * plane, cs * plane, dst + (i * ctotal + c0) * plane);
  }
}

// The output columns [lo, hi) whose input column ox * stride - pad + k is in [0, size).
void valid_range(int64_t k, int64_t stride, int64_t pad, int64_t size, int64_t out_size,
                 int64_t* lo, int64_t* hi) {
  int64_t first = pad - k;  // ox * stride >= first
  *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
  int64_t last = size - 1 + pad - k;  // ox * stride <= last
  *hi = last < 0 ? 0 : std::min(out_size, last / stride + 1);
  if (*hi < *lo) *hi = *lo;
}

}  // namespace

template <typename T>
void conv2d_grouped_forward(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y) {
  const ConvGeom s = sub_geom(g);
  std::vector<T> xg(static_cast<size_t>(g.n * s.c * g.h * g.w));
  std::vector<T> yg(static_cast<size_t>(g.n * s.o * g.oh * g.ow));
  for (int64_t gr = 0; gr < g.groups; ++gr) {
    copy_channels(x, xg.data(), g.n, g.c, gr * s.c, s.c, g.h * g.w);
    conv2d_forward_im2col(s, xg.data(), weight + gr * s.o * s.patch(),
                          bias ? bias + gr * s.o : nullptr, yg.data());
    scatter_channels(yg.data(), y, g.n, g.o, gr * s.o, s.o, g.oh * g.ow);
  }
}

template <typename T>
void conv2d_grouped_backward_data(const ConvGeom& g, const T* dy, const T* weight, T* dx) {
  const ConvGeom s = sub_geom(g);
  std::vector<T> dyg(static_cast<size_t>(g.n * s.o * g.oh * g.ow));
  std::vector<T> dxg(static_cast<size_t>(g.n * s.c * g.h * g.w));
  for (int64_t gr = 0; gr < g.groups; ++gr) {
    copy_channels(dy, dyg.data(), g.n, g.o, gr * s.o, s.o, g.oh * g.ow);
    conv2d_backward_data_im2col(s, dyg.data(), weight + gr * s.o * s.patch(), dxg.data());
    scatter_channels(dxg.data(), dx, g.n, g.c, gr * s.c, s.c, g.h * g.w);
  }
}

template <typename T>
void conv2d_grouped_backward_weights(const ConvGeom& g, const T* x, const T* dy, T* dweight,
                                     T* dbias) {
  const ConvGeom s = sub_geom(g);
  std::vector<T> xg(static_cast<size_t>(g.n * s.c * g.h * g.w));
  std::vector<T> dyg(static_cast<size_t>(g.n * s.o * g.oh * g.ow));
  for (int64_t gr = 0; gr < g.groups; ++gr) {
    copy_channels(x, xg.data(), g.n, g.c, gr * s.c, s.c, g.h * g.w);
    copy_channels(dy, dyg.data(), g.n, g.o, gr * s.o, s.o, g.oh * g.ow);
    conv2d_backward_weights_im2col(s, xg.data(), dyg.data(), dweight + gr * s.o * s.patch(),
                                   dbias ? dbias + gr * s.o : nullptr);
  }
}

template <typename T>
void conv2d_depthwise_forward(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y) {
  const int64_t m = g.o / g.c, ohw = g.oh * g.ow;
  parallel_for(g.n * g.o, threads_for(g.n * g.o, g.n * g.o * ohw * g.kh * g.kw),
               [&](int64_t begin, int64_t end, int) {
                 for (int64_t p = begin; p < end; ++p) {
                   const int64_t oc = p % g.o, n = p / g.o;
                   const T* xp = x + (n * g.c + oc / m) * g.h * g.w;
                   const T* wp = weight + oc * g.kh * g.kw;
                   T* yp = y + p * ohw;
                   std::fill_n(yp, ohw, bias ? bias[oc] : T(0));
                   for (int64_t kx = 0; kx < g.kw; ++kx) {
                     int64_t lo, hi;
                     valid_range(kx, g.stride, g.pad, g.w, g.ow, &lo, &hi);
                     for (int64_t ky = 0; ky < g.kh; ++ky) {
                       const T wv = wp[ky * g.kw + kx];
                       for (int64_t oy = 0; oy < g.oh; ++oy) {
                         const int64_t iy = oy * g.stride - g.pad + ky;
                         if (iy < 0 || iy >= g.h) continue;
                         const T* xr = xp + iy * g.w - g.pad + kx;
                         T* yr = yp + oy * g.ow;
                         for (int64_t ox = lo; ox < hi; ++ox) yr[ox] += wv * xr[ox * g.stride];
                       }
                     }
                   }
                 }
               });
}

template <typename T>
void conv2d_depthwise_backward_data(const ConvGeom& g, const T* dy, const T* weight, T* dx) {
  const int64_t m = g.o / g.c, ohw = g.oh * g.ow;
  parallel_for(g.n * g.c, threads_for(g.n * g.c, g.n * g.o * ohw * g.kh * g.kw),
               [&](int64_t begin, int64_t end, int) {
                 for (int64_t p = begin; p < end; ++p) {
                   const int64_t c = p % g.c, n = p / g.c;
                   T* dxp = dx + p * g.h * g.w;
                   std::fill_n(dxp, g.h * g.w, T(0));
                   for (int64_t oc = c * m; oc < (c + 1) * m; ++oc) {
                     const T* dyp = dy + (n * g.o + oc) * ohw;
                     const T* wp = weight + oc * g.kh * g.kw;
                     for (int64_t kx = 0; kx < g.kw; ++kx) {
                       int64_t lo, hi;
                       valid_range(kx, g.stride, g.pad, g.w, g.ow, &lo, &hi);
                       for (int64_t ky = 0; ky < g.kh; ++ky) {
                         const T wv = wp[ky * g.kw + kx];
                         for (int64_t oy = 0; oy < g.oh; ++oy) {
                           const int64_t iy = oy * g.stride - g.pad + ky;
                           if (iy < 0 || iy >= g.h) continue;
                           T* dxr = dxp + iy * g.w - g.pad + kx;
                           const T* dyr = dyp + oy * g.ow;
                           for (int64_t ox = lo; ox < hi; ++ox) dxr[ox * g.stride] += wv * dyr[ox];
                         }
                       }
                     }
                   }
                 }
               });
}

template <typename T>
void conv2d_depthwise_backward_weights(const ConvGeom& g, const T* x, const T* dy, T* dweight,
                                       T* dbias) {
  const int64_t m = g.o / g.c, ohw = g.oh * g.ow;
  parallel_for(g.o, threads_for(g.o, g.n * g.o * ohw * g.kh * g.kw),
               [&](int64_t begin, int64_t end, int) {
                 for (int64_t oc = begin; oc < end; ++oc) {
                   for (int64_t ky = 0; ky < g.kh; ++ky) {
                     for (int64_t kx = 0; kx < g.kw; ++kx) {
                       int64_t lo, hi;
                       valid_range(kx, g.stride, g.pad, g.w, g.ow, &lo, &hi);
                       double acc = 0.0;
                       for (int64_t n = 0; n < g.n; ++n) {
                         const T* xp = x + (n * g.c + oc / m) * g.h * g.w;
                         const T* dyp = dy + (n * g.o + oc) * ohw;
                         for (int64_t oy = 0; oy < g.oh; ++oy) {
                           const int64_t iy = oy * g.stride - g.pad + ky;
                           if (iy < 0 || iy >= g.h) continue;
                           const T* xr = xp + iy * g.w - g.pad + kx;
                           const T* dyr = dyp + oy * g.ow;
                           T row = 0;
                           for (int64_t ox = lo; ox < hi; ++ox) row += dyr[ox] * xr[ox * g.stride];
                           acc += static_cast<double>(row);
                         }
                       }
                       dweight[(oc * g.kh + ky) * g.kw + kx] = static_cast<T>(acc);
                     }
                   }
                   if (!dbias) continue;
                   double b = 0.0;
                   for (int64_t n = 0; n < g.n; ++n) {
                     const T* dyp = dy + (n * g.o + oc) * ohw;
                     for (int64_t k = 0; k < ohw; ++k) b += static_cast<double>(dyp[k]);
                   }
                   dbias[oc] = static_cast<T>(b);
                 }
               });
}

#define DTRAIN_INSTANTIATE(T)                                                                    \
  template void conv2d_grouped_forward<T>(const ConvGeom&, const T*, const T*, const T*, T*);    \
  template void conv2d_grouped_backward_data<T>(const ConvGeom&, const T*, const T*, T*);        \
  template void conv2d_grouped_backward_weights<T>(const ConvGeom&, const T*, const T*, T*, T*); \
  template void conv2d_depthwise_forward<T>(const ConvGeom&, const T*, const T*, const T*, T*);  \
  template void conv2d_depthwise_backward_data<T>(const ConvGeom&, const T*, const T*, T*);      \
  template void conv2d_depthwise_backward_weights<T>(const ConvGeom&, const T*, const T*, T*, T*);
DTRAIN_INSTANTIATE(float)
DTRAIN_INSTANTIATE(double)
#undef DTRAIN_INSTANTIATE

}  // namespace dtrain::cpu
