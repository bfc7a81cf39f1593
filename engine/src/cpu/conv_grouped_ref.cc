// Reference grouped convolution: direct sums accumulated in double, any group count.
// The oracle for the per-group im2col kernels and the depthwise kernels
// (conv_grouped.cc); written for obviousness, not speed.
#include <vector>

#include "conv_grouped.h"

namespace dtrain::cpu {

namespace {

bool inside(int64_t v, int64_t size) { return v >= 0 && v < size; }

int64_t in_coord(int64_t out, int64_t k, int64_t stride, int64_t pad) {
  return out * stride - pad + k;
}

// One output element: the sum over the input channels of oc's group.
template <typename T>
double output_at(const ConvGeom& g, const T* x, const T* weight, int64_t n, int64_t oc, int64_t oy,
                 int64_t ox) {
  const int64_t cg = group_in(g), c0 = (oc / group_out(g)) * cg;
  double acc = 0.0;
  for (int64_t ci = 0; ci < cg; ++ci) {
    for (int64_t i = 0; i < g.kh; ++i) {
      int64_t iy = in_coord(oy, i, g.stride, g.pad);
      if (!inside(iy, g.h)) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t ix = in_coord(ox, j, g.stride, g.pad);
        if (!inside(ix, g.w)) continue;
        acc += static_cast<double>(x[((n * g.c + c0 + ci) * g.h + iy) * g.w + ix]) *
               static_cast<double>(weight[((oc * cg + ci) * g.kh + i) * g.kw + j]);
      }
    }
  }
  return acc;
}

}  // namespace

template <typename T>
void conv2d_grouped_forward_ref(const ConvGeom& g, const T* x, const T* weight, const T* bias,
                                T* y) {
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t oc = 0; oc < g.o; ++oc) {
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          double acc = bias ? static_cast<double>(bias[oc]) : 0.0;
          acc += output_at(g, x, weight, n, oc, oy, ox);
          y[((n * g.o + oc) * g.oh + oy) * g.ow + ox] = static_cast<T>(acc);
        }
      }
    }
  }
}

// Scatter form, accumulated in a double buffer: each output element adds its
// gradient to every input element it read.
template <typename T>
void conv2d_grouped_backward_data_ref(const ConvGeom& g, const T* dy, const T* weight, T* dx) {
  const int64_t cg = group_in(g), og = group_out(g);
  std::vector<double> acc(static_cast<size_t>(g.n * g.c * g.h * g.w), 0.0);
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t oc = 0; oc < g.o; ++oc) {
      const int64_t c0 = (oc / og) * cg;
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          double d = static_cast<double>(dy[((n * g.o + oc) * g.oh + oy) * g.ow + ox]);
          for (int64_t ci = 0; ci < cg; ++ci) {
            for (int64_t i = 0; i < g.kh; ++i) {
              int64_t iy = in_coord(oy, i, g.stride, g.pad);
              if (!inside(iy, g.h)) continue;
              for (int64_t j = 0; j < g.kw; ++j) {
                int64_t ix = in_coord(ox, j, g.stride, g.pad);
                if (!inside(ix, g.w)) continue;
                acc[static_cast<size_t>(((n * g.c + c0 + ci) * g.h + iy) * g.w + ix)] +=
                    d * static_cast<double>(weight[((oc * cg + ci) * g.kh + i) * g.kw + j]);
              }
            }
          }
        }
      }
    }
  }
  for (size_t k = 0; k < acc.size(); ++k) dx[k] = static_cast<T>(acc[k]);
}

template <typename T>
void conv2d_grouped_backward_weights_ref(const ConvGeom& g, const T* x, const T* dy, T* dweight,
                                         T* dbias) {
  const int64_t cg = group_in(g), og = group_out(g);
  for (int64_t oc = 0; oc < g.o; ++oc) {
    const int64_t c0 = (oc / og) * cg;
    double bsum = 0.0;
    for (int64_t ci = 0; ci < cg; ++ci) {
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
                acc += static_cast<double>(dy[((n * g.o + oc) * g.oh + oy) * g.ow + ox]) *
                       static_cast<double>(x[((n * g.c + c0 + ci) * g.h + iy) * g.w + ix]);
              }
            }
          }
          dweight[((oc * cg + ci) * g.kh + i) * g.kw + j] = static_cast<T>(acc);
        }
      }
    }
    for (int64_t k = 0; k < g.n * g.oh * g.ow; ++k) {
      int64_t n = k / (g.oh * g.ow), p = k % (g.oh * g.ow);
      bsum += static_cast<double>(dy[(n * g.o + oc) * g.oh * g.ow + p]);
    }
    if (dbias) dbias[oc] = static_cast<T>(bsum);
  }
}

#define DTRAIN_INSTANTIATE(T)                                                                     \
  template void conv2d_grouped_forward_ref<T>(const ConvGeom&, const T*, const T*, const T*, T*); \
  template void conv2d_grouped_backward_data_ref<T>(const ConvGeom&, const T*, const T*, T*);     \
  template void conv2d_grouped_backward_weights_ref<T>(const ConvGeom&, const T*, const T*, T*, T*);
DTRAIN_INSTANTIATE(float)
DTRAIN_INSTANTIATE(double)
#undef DTRAIN_INSTANTIATE

}  // namespace dtrain::cpu
