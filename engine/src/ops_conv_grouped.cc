// conv2d with groups > 1 on the CPU: the group checks, kernel choice and autograd.
//
// Kernels (cpu/conv_grouped.h): depthwise (groups == C) runs the direct depthwise
// loops, which beat im2col for one input channel per group (a 9-long GEMM reduction);
// other group counts run im2col + GEMM per group. kReference forces the direct oracle
// loops. oneDNN is not used for groups; f32 and f64 run the same kernels. Backward
// computes only the wanted gradients and saves only what they need, as conv2d does.
#include "cpu/conv_grouped.h"
#include "dtrain/engine/autograd.h"
#include "ops_conv.h"

namespace dtrain {

namespace {

enum class GroupedKernel { kReference, kDepthwise, kPerGroup };

GroupedKernel pick(const cpu::ConvGeom& g, ConvAlgo algo) {
  if (algo == ConvAlgo::kReference) return GroupedKernel::kReference;
  return g.groups == g.c ? GroupedKernel::kDepthwise : GroupedKernel::kPerGroup;
}

template <typename T>
void forward(GroupedKernel k, const cpu::ConvGeom& g, const T* x, const T* w, const T* b, T* y) {
  if (k == GroupedKernel::kReference) return cpu::conv2d_forward_ref(g, x, w, b, y);
  if (k == GroupedKernel::kDepthwise) return cpu::conv2d_depthwise_forward(g, x, w, b, y);
  cpu::conv2d_grouped_forward(g, x, w, b, y);
}

template <typename T>
void backward_data(GroupedKernel k, const cpu::ConvGeom& g, const T* dy, const T* w, T* dx) {
  if (k == GroupedKernel::kReference) return cpu::conv2d_backward_data_ref(g, dy, w, dx);
  if (k == GroupedKernel::kDepthwise) return cpu::conv2d_depthwise_backward_data(g, dy, w, dx);
  cpu::conv2d_grouped_backward_data(g, dy, w, dx);
}

template <typename T>
void backward_weights(GroupedKernel k, const cpu::ConvGeom& g, const T* x, const T* dy, T* dw,
                      T* db) {
  if (k == GroupedKernel::kReference) {
    return cpu::conv2d_backward_weights_ref(g, x, dy, dw, db);
  }
  if (k == GroupedKernel::kDepthwise) {
    return cpu::conv2d_depthwise_backward_weights(g, x, dy, dw, db);
  }
  cpu::conv2d_grouped_backward_weights(g, x, dy, dw, db);
}

struct GroupedSaved {
  cpu::ConvGeom g;
  GroupedKernel kernel;
  Tensor x, w;  // x for the weight gradient, w for the input gradient
  bool gx, gw, gb;
};

std::vector<Tensor> grouped_backward(const GroupedSaved& s, const Tensor& grad) {
  if (!grad.defined()) return {Tensor(), Tensor(), Tensor()};
  const cpu::ConvGeom& g = s.g;
  Tensor dy = grad.contiguous();
  Tensor dx, dw, db;
  if (s.gx) dx = zeros({g.n, g.c, g.h, g.w}, dy.options());
  if (s.gw) dw = zeros({g.o, cpu::group_in(g), g.kh, g.kw}, dy.options());
  if (s.gb) db = zeros({g.o}, dy.options());
  if (g.n == 0) return {dx, dw, db};
  DTRAIN_DISPATCH_FLOAT(dy.dtype(), "conv2d backward", [&] {
    const scalar_t* pdy = dy.data<scalar_t>();
    if (s.gx) backward_data(s.kernel, g, pdy, s.w.data<scalar_t>(), dx.data<scalar_t>());
    if (s.gw) {
      backward_weights(s.kernel, g, s.x.data<scalar_t>(), pdy, dw.data<scalar_t>(),
                       s.gb ? db.data<scalar_t>() : static_cast<scalar_t*>(nullptr));
    }
  });
  if (s.gb && !s.gw) db = sum(dy, {0, 2, 3});
  return {dx, dw, db};
}

}  // namespace

void check_conv_groups(const Shape& xs, const Shape& ws, int64_t groups) {
  DTRAIN_CHECK(groups >= 1, InvalidArgument, "conv2d: groups must be >= 1, got {}", groups);
  DTRAIN_CHECK(groups != 1 || xs[1] == ws[1], ShapeError,
               "conv2d: input {} has {} channels but weight {} expects {}", shape_str(xs), xs[1],
               shape_str(ws), ws[1]);
  DTRAIN_CHECK(xs[1] % groups == 0, ShapeError,
               "conv2d: groups {} does not divide the {} input channels of input {}", groups, xs[1],
               shape_str(xs));
  DTRAIN_CHECK(ws[0] % groups == 0, ShapeError,
               "conv2d: groups {} does not divide the {} output channels of weight {}", groups,
               ws[0], shape_str(ws));
  DTRAIN_CHECK(xs[1] == ws[1] * groups, ShapeError,
               "conv2d: input {} has {} channels but weight {} with groups {} expects {}",
               shape_str(xs), xs[1], shape_str(ws), groups, ws[1] * groups);
}

Tensor conv2d_grouped_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias,
                          const cpu::ConvGeom& g, ConvAlgo algo) {
  DTRAIN_CHECK(algo == ConvAlgo::kAuto || algo == ConvAlgo::kReference || algo == ConvAlgo::kIm2col,
               UnsupportedError, "conv2d: the {} kernel has no grouped convolution (groups {})",
               conv_algo_name(algo), g.groups);
  DTRAIN_CHECK(x.device().is_cpu(), UnsupportedError,
               "conv2d: grouped convolution (groups {}) on {} is not supported", g.groups,
               x.device().str());
  GroupedKernel k = pick(g, algo);
  Tensor xc = x.detach().contiguous(), wc = weight.detach().contiguous();
  Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
  Tensor y = empty({g.n, g.o, g.oh, g.ow}, x.options());
  if (g.n > 0) {
    DTRAIN_DISPATCH_FLOAT(x.dtype(), "conv2d", [&] {
      forward(k, g, xc.data<scalar_t>(), wc.data<scalar_t>(),
              bc.defined() ? bc.data<scalar_t>() : static_cast<const scalar_t*>(nullptr),
              y.data<scalar_t>());
    });
  }
  if (!any_requires_grad({x, weight, bias})) return y;
  bool gx = x.requires_grad(), gw = weight.requires_grad();
  bool gb = bias.defined() && bias.requires_grad();
  GroupedSaved saved{g, k, gw ? xc : Tensor(), gx ? wc : Tensor(), gx, gw, gb};
  return make_function("conv2d", {x, weight, bias}, {y}, [saved](const std::vector<Tensor>& grads) {
    return grouped_backward(saved, grads[0]);
  })[0];
}

}  // namespace dtrain
