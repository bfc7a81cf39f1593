// Reference convolution (any group count) and max-pooling kernels: the oracle the fast kernels are
// tested against, plus the shared geometry helpers.
//
// Written for obviousness, not speed: every output element is one direct sum over
// its receptive field, accumulated in double, with explicit bounds checks for
// padding. Backward passes gather (each input element sums what it influenced) so
// nothing is accumulated in T. Only the pooling kernels are used outside the tests
// (for f64, where speed does not matter).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "conv.h"

namespace dtrain::cpu {

ConvGeom make_conv_geom(int64_t n, int64_t c, int64_t h, int64_t w, int64_t o, int64_t kh,
                        int64_t kw, int64_t stride, int64_t pad) {
  ConvGeom g{n, c, h, w, o, kh, kw, stride, pad, 0, 0};
  g.oh = (h + 2 * pad - kh) / stride + 1;
  g.ow = (w + 2 * pad - kw) / stride + 1;
  return g;
}

PoolGeom make_pool_geom(int64_t n, int64_t c, int64_t h, int64_t w, int64_t kernel, int64_t stride,
                        int64_t pad) {
  PoolGeom g{n, c, h, w, kernel, stride, pad, 0, 0};
  g.oh = (h + 2 * pad - kernel) / stride + 1;
  g.ow = (w + 2 * pad - kernel) / stride + 1;
  return g;
}

namespace {

bool inside(int64_t v, int64_t size) { return v >= 0 && v < size; }

// Input coordinate that output coordinate `out` reads through kernel tap `k`.
int64_t in_coord(int64_t out, int64_t k, int64_t stride, int64_t pad) {
  return out * stride - pad + k;
}

// Output coordinate that reads input coordinate `in` through tap `k`, or -1 if none.
int64_t out_coord(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t out_size) {
  int64_t t = in + pad - k;
  if (t < 0 || t % stride != 0) return -1;
  t /= stride;
  return t < out_size ? t : -1;
}

}  // namespace

// Any group count: output channel o reads the cg = c / groups input channels of its
// group, from c0 = (o / og) * cg on; the weight is [o, cg, kh, kw] (groups == 1: the
// plain convolution).
template <typename T>
void conv2d_forward_ref(const ConvGeom& g, const T* x, const T* weight, const T* bias, T* y) {
  const int64_t cg = g.c / g.groups, og = g.o / g.groups;
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t o = 0; o < g.o; ++o) {
      const int64_t c0 = (o / og) * cg;
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          double acc = bias ? static_cast<double>(bias[o]) : 0.0;
          for (int64_t c = 0; c < cg; ++c) {
            for (int64_t i = 0; i < g.kh; ++i) {
              int64_t iy = in_coord(oy, i, g.stride, g.pad);
              if (!inside(iy, g.h)) continue;
              for (int64_t j = 0; j < g.kw; ++j) {
                int64_t ix = in_coord(ox, j, g.stride, g.pad);
                if (!inside(ix, g.w)) continue;
                acc += static_cast<double>(x[((n * g.c + c0 + c) * g.h + iy) * g.w + ix]) *
                       static_cast<double>(weight[((o * cg + c) * g.kh + i) * g.kw + j]);
              }
            }
          }
          y[((n * g.o + o) * g.oh + oy) * g.ow + ox] = static_cast<T>(acc);
        }
      }
    }
  }
}

// Gather form: input channel c sums over the output channels of its group.
template <typename T>
void conv2d_backward_data_ref(const ConvGeom& g, const T* dy, const T* weight, T* dx) {
  const int64_t cg = g.c / g.groups, og = g.o / g.groups;
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = 0; c < g.c; ++c) {
      const int64_t o0 = (c / cg) * og, cl = c % cg;
      for (int64_t iy = 0; iy < g.h; ++iy) {
        for (int64_t ix = 0; ix < g.w; ++ix) {
          double acc = 0.0;
          for (int64_t o = o0; o < o0 + og; ++o) {
            for (int64_t i = 0; i < g.kh; ++i) {
              int64_t oy = out_coord(iy, i, g.stride, g.pad, g.oh);
              if (oy < 0) continue;
              for (int64_t j = 0; j < g.kw; ++j) {
                int64_t ox = out_coord(ix, j, g.stride, g.pad, g.ow);
                if (ox < 0) continue;
                acc += static_cast<double>(dy[((n * g.o + o) * g.oh + oy) * g.ow + ox]) *
                       static_cast<double>(weight[((o * cg + cl) * g.kh + i) * g.kw + j]);
              }
            }
          }
          dx[((n * g.c + c) * g.h + iy) * g.w + ix] = static_cast<T>(acc);
        }
      }
    }
  }
}

template <typename T>
void conv2d_backward_weights_ref(const ConvGeom& g, const T* x, const T* dy, T* dweight, T* dbias) {
  const int64_t cg = g.c / g.groups, og = g.o / g.groups;
  for (int64_t o = 0; o < g.o; ++o) {
    const int64_t c0 = (o / og) * cg;
    for (int64_t c = 0; c < cg; ++c) {
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          double acc = 0.0;
          for (int64_t n = 0; n < g.n; ++n) {
            for (int64_t oy = 0; oy < g.oh; ++oy) {
              int64_t iy = in_coord(oy, i, g.stride, g.pad);
              if (!inside(iy, g.h)) continue;
              for (int64_t ox = 0; ox < g.ow; ++ox) {
                int64_t ix = in_coord(ox, j, g.stride, g.pad);
                if (!inside(ix, g.w)) continue;
                acc += static_cast<double>(dy[((n * g.o + o) * g.oh + oy) * g.ow + ox]) *
                       static_cast<double>(x[((n * g.c + c0 + c) * g.h + iy) * g.w + ix]);
              }
            }
          }
          dweight[((o * cg + c) * g.kh + i) * g.kw + j] = static_cast<T>(acc);
        }
      }
    }
  }
  if (!dbias) return;
  for (int64_t o = 0; o < g.o; ++o) {
    double acc = 0.0;
    for (int64_t n = 0; n < g.n; ++n) {
      const T* p = dy + (n * g.o + o) * g.pixels();
      for (int64_t k = 0; k < g.pixels(); ++k) acc += static_cast<double>(p[k]);
    }
    dbias[o] = static_cast<T>(acc);
  }
}

template <typename T>
void max_pool2d_forward_ref(const PoolGeom& g, const T* x, T* y, int32_t* argmax) {
  for (int64_t plane = 0; plane < g.planes(); ++plane) {
    const T* xp = x + plane * g.h * g.w;
    for (int64_t oy = 0; oy < g.oh; ++oy) {
      for (int64_t ox = 0; ox < g.ow; ++ox) {
        T best = -std::numeric_limits<T>::infinity();
        int64_t best_at = -1;
        for (int64_t i = 0; i < g.kernel; ++i) {
          int64_t iy = in_coord(oy, i, g.stride, g.pad);
          if (!inside(iy, g.h)) continue;
          for (int64_t j = 0; j < g.kernel; ++j) {
            int64_t ix = in_coord(ox, j, g.stride, g.pad);
            if (!inside(ix, g.w)) continue;
            T v = xp[iy * g.w + ix];
            if (best_at < 0 || v > best || (std::isnan(v) && !std::isnan(best))) {
              best = v;
              best_at = iy * g.w + ix;
            }
          }
        }
        int64_t out = (plane * g.oh + oy) * g.ow + ox;
        y[out] = best;
        argmax[out] = static_cast<int32_t>(best_at);
      }
    }
  }
}

template <typename T>
void max_pool2d_backward_ref(const PoolGeom& g, const T* dy, const int32_t* argmax, T* dx) {
  std::vector<double> acc(static_cast<size_t>(g.h * g.w));
  for (int64_t plane = 0; plane < g.planes(); ++plane) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t k = plane * g.oh * g.ow; k < (plane + 1) * g.oh * g.ow; ++k) {
      acc[static_cast<size_t>(argmax[k])] += static_cast<double>(dy[k]);
    }
    T* dxp = dx + plane * g.h * g.w;
    for (size_t k = 0; k < acc.size(); ++k) dxp[k] = static_cast<T>(acc[k]);
  }
}

#define DTRAIN_INSTANTIATE_REF(T)                                                            \
  template void conv2d_forward_ref<T>(const ConvGeom&, const T*, const T*, const T*, T*);    \
  template void conv2d_backward_data_ref<T>(const ConvGeom&, const T*, const T*, T*);        \
  template void conv2d_backward_weights_ref<T>(const ConvGeom&, const T*, const T*, T*, T*); \
  template void max_pool2d_forward_ref<T>(const PoolGeom&, const T*, T*, int32_t*);          \
  template void max_pool2d_backward_ref<T>(const PoolGeom&, const T*, const int32_t*, T*);
DTRAIN_INSTANTIATE_REF(float)
DTRAIN_INSTANTIATE_REF(double)
#undef DTRAIN_INSTANTIATE_REF

}  // namespace dtrain::cpu
