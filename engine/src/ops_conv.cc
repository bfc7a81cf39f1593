// conv2d and max_pool2d (NCHW): input checks, kernel choice, autograd.
//
// The kernels live in cpu/conv.h. Default choice (kAuto), measured with
// bench/conv_kernels on the demo CNN's layers at batch 64, one thread (AMD EPYC with
// AVX-512, OpenBLAS with OPENBLAS_CORETYPE=Haswell), ms for one training step's
// passes of all three convs / both pools:
//   f32 conv: oneDNN in its blocked layouts, reordering inside each call:  7.7 ms
//             (oneDNN on plain NCHW 13.4 ms, im2col + OpenBLAS 18.2 ms). Plain
//             NCHW only wins the input gradient of a 1-channel input (0.5 vs 2.6 ms),
//             which a first layer never computes.
//   f64 conv: im2col (oneDNN has no f64); f64 exists for gradient checks.
//   f32 pool: oneDNN, 1.0 ms (the direct loops take 8.6 ms).
//   f64 pool: the direct loops.
// Backward computes only the gradients whose inputs require grad, and saves only
// what those need: x for the weight gradient, the weight for the input gradient
// (the first layer of a CNN never needs its input gradient). Pooling saves the
// winner of each window (argmax indices, or oneDNN's workspace), not its input.
// Groups (grouped and depthwise) are in ops_conv_grouped.cc.
// Deliberately not supported: dilation, asymmetric stride/padding, ceil mode.
#include "ops_conv.h"

#include <limits>

#include "cpu/conv.h"
#include "dtrain/engine/amp.h"
#include "dtrain/engine/amp_cpu.h"
#include "dtrain/engine/autograd.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

bool is_onednn(ConvAlgo a) { return a == ConvAlgo::kOneDnnPlain || a == ConvAlgo::kOneDnnBlocked; }

cpu::OneDnnLayout layout_of(ConvAlgo a) {
  return a == ConvAlgo::kOneDnnPlain ? cpu::OneDnnLayout::kPlain : cpu::OneDnnLayout::kBlocked;
}

ConvAlgo resolve(ConvAlgo algo, DType dtype) {
  if (algo == ConvAlgo::kAuto) return default_conv_algo(dtype);
  DTRAIN_CHECK(!is_onednn(algo) || dtype == DType::f32, DTypeError,
               "conv2d: the {} kernel computes in f32 only, got {}", conv_algo_name(algo),
               dtype_name(dtype));
  return algo;
}

PoolAlgo resolve(PoolAlgo algo, DType dtype) {
  if (algo == PoolAlgo::kAuto) return default_pool_algo(dtype);
  DTRAIN_CHECK(algo != PoolAlgo::kOneDnn || dtype == DType::f32, DTypeError,
               "max_pool2d: the {} kernel computes in f32 only, got {}", pool_algo_name(algo),
               dtype_name(dtype));
  return algo;
}

void check_conv_tensors(const Tensor& x, const Tensor& w, const Tensor& b, int64_t groups) {
  DTRAIN_CHECK(x.defined() && w.defined(), InvalidArgument, "conv2d: undefined input or weight");
  DTRAIN_CHECK(x.device() == w.device(), InvalidArgument,
               "conv2d: input on {} but weight on {}; move them with .to(device)", x.device().str(),
               w.device().str());
  DTRAIN_CHECK(x.dim() == 4, ShapeError, "conv2d: expected input [N,C,H,W], got {}",
               shape_str(x.shape()));
  DTRAIN_CHECK(w.dim() == 4, ShapeError, "conv2d: expected weight [O,C,kh,kw], got {}",
               shape_str(w.shape()));
  DTRAIN_CHECK(x.dtype() == w.dtype(), DTypeError, "conv2d: input is {} but weight is {}",
               dtype_name(x.dtype()), dtype_name(w.dtype()));
  DTRAIN_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64 ||
                   (x.device().is_cuda() && (x.dtype() == DType::f16 || x.dtype() == DType::bf16)),
               DTypeError, "conv2d: unsupported dtype {} on {} (f32 or f64; f16/bf16 on CUDA)",
               dtype_name(x.dtype()), x.device().str());
  const Shape &xs = x.shape(), &ws = w.shape();
  DTRAIN_CHECK(ws[0] > 0 && ws[1] > 0 && ws[2] > 0 && ws[3] > 0, ShapeError,
               "conv2d: weight {} has an empty dimension", shape_str(ws));
  check_conv_groups(xs, ws, groups);
  if (!b.defined()) return;
  DTRAIN_CHECK(b.dtype() == x.dtype(), DTypeError, "conv2d: input is {} but bias is {}",
               dtype_name(x.dtype()), dtype_name(b.dtype()));
  DTRAIN_CHECK(b.device() == x.device(), InvalidArgument, "conv2d: input on {} but bias on {}",
               x.device().str(), b.device().str());
  DTRAIN_CHECK(b.dim() == 1 && b.shape()[0] == ws[0], ShapeError,
               "conv2d: bias {} does not match weight {} (expected [{}])", shape_str(b.shape()),
               shape_str(ws), ws[0]);
}

cpu::ConvGeom check_conv(const Tensor& x, const Tensor& w, const Tensor& b,
                         const Conv2dOptions& opt) {
  check_conv_tensors(x, w, b, opt.groups);
  DTRAIN_CHECK(opt.stride >= 1, InvalidArgument, "conv2d: stride must be >= 1, got {}", opt.stride);
  DTRAIN_CHECK(opt.padding >= 0, InvalidArgument, "conv2d: padding must be >= 0, got {}",
               opt.padding);
  const Shape &xs = x.shape(), &ws = w.shape();
  int64_t ph = xs[2] + 2 * opt.padding, pw = xs[3] + 2 * opt.padding;
  DTRAIN_CHECK(ws[2] <= ph && ws[3] <= pw, ShapeError,
               "conv2d: kernel {}x{} of weight {} is larger than the padded input {}x{} (input "
               "{}, padding {})",
               ws[2], ws[3], shape_str(ws), ph, pw, shape_str(xs), opt.padding);
  cpu::ConvGeom g =
      cpu::make_conv_geom(xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], opt.stride, opt.padding);
  g.groups = opt.groups;
  return g;
}

cpu::PoolGeom check_pool(const Tensor& x, const MaxPool2dOptions& opt) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "max_pool2d: undefined input");
  DTRAIN_CHECK(x.dim() == 4, ShapeError, "max_pool2d: expected input [N,C,H,W], got {}",
               shape_str(x.shape()));
  DTRAIN_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64 ||
                   (x.device().is_cuda() && (x.dtype() == DType::f16 || x.dtype() == DType::bf16)),
               DTypeError, "max_pool2d: unsupported dtype {} on {} (f32 or f64; f16/bf16 on CUDA)",
               dtype_name(x.dtype()), x.device().str());
  DTRAIN_CHECK(opt.kernel >= 1, InvalidArgument, "max_pool2d: kernel must be >= 1, got {}",
               opt.kernel);
  DTRAIN_CHECK(opt.stride >= 0, InvalidArgument,
               "max_pool2d: stride must be >= 1 (or 0 for the kernel size), got {}", opt.stride);
  DTRAIN_CHECK(opt.padding >= 0 && opt.padding <= opt.kernel / 2, InvalidArgument,
               "max_pool2d: padding {} must be between 0 and half the kernel {}", opt.padding,
               opt.kernel);
  const Shape& xs = x.shape();
  int64_t ph = xs[2] + 2 * opt.padding, pw = xs[3] + 2 * opt.padding;
  DTRAIN_CHECK(opt.kernel <= ph && opt.kernel <= pw, ShapeError,
               "max_pool2d: kernel {} is larger than the padded input {}x{} (input {}, padding "
               "{})",
               opt.kernel, ph, pw, shape_str(xs), opt.padding);
  DTRAIN_CHECK(xs[2] * xs[3] <= std::numeric_limits<int32_t>::max(), ShapeError,
               "max_pool2d: input planes {}x{} are too large", xs[2], xs[3]);
  int64_t stride = opt.stride == 0 ? opt.kernel : opt.stride;
  return cpu::make_pool_geom(xs[0], xs[1], xs[2], xs[3], opt.kernel, stride, opt.padding);
}

// ---- convolution kernels on tensors (contiguous, dtype already checked) ----

void conv_forward(ConvAlgo a, const cpu::ConvGeom& g, const Tensor& x, const Tensor& w,
                  const Tensor& b, Tensor& y) {
  if (is_onednn(a)) {
    cpu::conv2d_forward_onednn(g, x.data<float>(), w.data<float>(),
                               b.defined() ? b.data<float>() : nullptr, y.data<float>(),
                               layout_of(a));
    return;
  }
  DTRAIN_DISPATCH_FLOAT(x.dtype(), "conv2d", [&] {
    const scalar_t* pb = b.defined() ? b.data<scalar_t>() : nullptr;
    if (a == ConvAlgo::kReference) {
      cpu::conv2d_forward_ref(g, x.data<scalar_t>(), w.data<scalar_t>(), pb, y.data<scalar_t>());
    } else {
      cpu::conv2d_forward_im2col(g, x.data<scalar_t>(), w.data<scalar_t>(), pb, y.data<scalar_t>());
    }
  });
}

void conv_backward_data(ConvAlgo a, const cpu::ConvGeom& g, const Tensor& dy, const Tensor& w,
                        Tensor& dx) {
  if (is_onednn(a)) {
    cpu::conv2d_backward_data_onednn(g, dy.data<float>(), w.data<float>(), dx.data<float>(),
                                     layout_of(a));
    return;
  }
  DTRAIN_DISPATCH_FLOAT(dy.dtype(), "conv2d backward", [&] {
    if (a == ConvAlgo::kReference) {
      cpu::conv2d_backward_data_ref(g, dy.data<scalar_t>(), w.data<scalar_t>(),
                                    dx.data<scalar_t>());
    } else {
      cpu::conv2d_backward_data_im2col(g, dy.data<scalar_t>(), w.data<scalar_t>(),
                                       dx.data<scalar_t>());
    }
  });
}

// db may be undefined (no bias gradient wanted).
void conv_backward_weights(ConvAlgo a, const cpu::ConvGeom& g, const Tensor& x, const Tensor& dy,
                           Tensor& dw, Tensor& db) {
  if (is_onednn(a)) {
    cpu::conv2d_backward_weights_onednn(g, x.data<float>(), dy.data<float>(), dw.data<float>(),
                                        db.defined() ? db.data<float>() : nullptr, layout_of(a));
    return;
  }
  DTRAIN_DISPATCH_FLOAT(dy.dtype(), "conv2d backward", [&] {
    scalar_t* pdb = db.defined() ? db.data<scalar_t>() : nullptr;
    if (a == ConvAlgo::kReference) {
      cpu::conv2d_backward_weights_ref(g, x.data<scalar_t>(), dy.data<scalar_t>(),
                                       dw.data<scalar_t>(), pdb);
    } else {
      cpu::conv2d_backward_weights_im2col(g, x.data<scalar_t>(), dy.data<scalar_t>(),
                                          dw.data<scalar_t>(), pdb);
    }
  });
}

// What conv2d's backward needs; x and w are kept only when a gradient needs them.
struct ConvSaved {
  cpu::ConvGeom g;
  ConvAlgo algo;
  Tensor x;  // for the weight gradient
  Tensor w;  // for the input gradient
  bool gx, gw, gb;
};

std::vector<Tensor> conv_backward(const ConvSaved& s, const Tensor& grad) {
  if (!grad.defined()) return {Tensor(), Tensor(), Tensor()};
  const cpu::ConvGeom& g = s.g;
  Tensor dy = grad.contiguous();
  TensorOptions opts = dy.options();
  Tensor dx, dw, db;
  if (s.gx) {
    dx = empty({g.n, g.c, g.h, g.w}, opts);
    if (g.n > 0) conv_backward_data(s.algo, g, dy, s.w, dx);
  }
  if (s.gw) {
    dw = zeros({g.o, g.c, g.kh, g.kw}, opts);
    if (s.gb) db = zeros({g.o}, opts);
    if (g.n > 0) conv_backward_weights(s.algo, g, s.x, dy, dw, db);
  } else if (s.gb) {
    db = sum(dy, {0, 2, 3});
  }
  return {dx, dw, db};
}

}  // namespace

const char* conv_algo_name(ConvAlgo algo) {
  switch (algo) {
    case ConvAlgo::kAuto:
      return "auto";
    case ConvAlgo::kReference:
      return "reference";
    case ConvAlgo::kIm2col:
      return "im2col";
    case ConvAlgo::kOneDnnPlain:
      return "onednn-plain";
    case ConvAlgo::kOneDnnBlocked:
      return "onednn-blocked";
  }
  return "?";
}

const char* pool_algo_name(PoolAlgo algo) {
  switch (algo) {
    case PoolAlgo::kAuto:
      return "auto";
    case PoolAlgo::kDirect:
      return "direct";
    case PoolAlgo::kOneDnn:
      return "onednn";
  }
  return "?";
}

ConvAlgo default_conv_algo(DType dtype) {
  return dtype == DType::f32 ? ConvAlgo::kOneDnnBlocked : ConvAlgo::kIm2col;
}

PoolAlgo default_pool_algo(DType dtype) {
  return dtype == DType::f32 ? PoolAlgo::kOneDnn : PoolAlgo::kDirect;
}

Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt,
              ConvAlgo algo) {
  cpu::ConvGeom g = check_conv(x, weight, bias, opt);
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda() || weight.device().is_cuda()) {  // cuDNN (cuda/cudnn_ops.cc)
    Tensor y = cuda::conv2d_forward(x, weight, bias, g);
    if (!any_requires_grad({x, weight, bias})) return y;
    bool gx = x.requires_grad(), gw = weight.requires_grad();
    bool gb = bias.defined() && bias.requires_grad();
    Tensor xs = gw ? x.detach() : Tensor(), ws = weight.detach();
    return make_function("conv2d", {x, weight, bias}, {y},
                         [xs, ws, g, gx, gw, gb](const std::vector<Tensor>& grads) {
                           if (!grads[0].defined()) return std::vector<Tensor>(3);
                           return cuda::conv2d_backward(grads[0], xs, ws, g, gx, gw, gb);
                         })[0];
  }
#endif
  if (g.groups != 1) return conv2d_grouped_cpu(x, weight, bias, g, algo);  // ops_conv_grouped.cc
  ConvAlgo a = resolve(algo, x.dtype());
  Tensor xc = x.detach().contiguous(), wc = weight.detach().contiguous();
  Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
  Tensor y = empty({g.n, g.o, g.oh, g.ow}, x.options());
  if (g.n > 0) conv_forward(a, g, xc, wc, bc, y);
  if (!any_requires_grad({x, weight, bias})) return y;
  bool gx = x.requires_grad(), gw = weight.requires_grad();
  bool gb = bias.defined() && bias.requires_grad();
  ConvSaved saved{g, a, gw ? xc : Tensor(), gx ? wc : Tensor(), gx, gw, gb};
  return make_function("conv2d", {x, weight, bias}, {y}, [saved](const std::vector<Tensor>& grads) {
    return conv_backward(saved, grads[0]);
  })[0];
}

Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt) {
  if (x.defined() && x.dtype() == DType::f32 && opt.groups == 1 &&
      amp::AutocastGuard::dtype() != DType::f32) {  // bf16/f16 autocast (amp_cpu.h)
    return amp::autocast_conv2d(x, weight, bias, opt, amp::AutocastGuard::dtype());
  }
  return conv2d(x, weight, bias, opt, ConvAlgo::kAuto);
}

cpu::ConvGeom conv2d_geometry(const Tensor& x, const Tensor& weight, const Tensor& bias,
                              const Conv2dOptions& opt) {
  return check_conv(x, weight, bias, opt);
}

namespace {

// Runs the pooling forward; returns what backward needs (argmax i32 [N,C,OH,OW] for
// kDirect, oneDNN's workspace as u8 bytes for kOneDnn).
Tensor pool_forward(PoolAlgo a, const cpu::PoolGeom& g, const Tensor& x, Tensor& y) {
  if (a == PoolAlgo::kOneDnn) {
    auto bytes = static_cast<int64_t>(cpu::max_pool2d_workspace_bytes_onednn(g));
    Tensor ws = empty({bytes}, TensorOptions{}.with_dtype(DType::u8));
    cpu::max_pool2d_forward_onednn(g, x.data<float>(), y.data<float>(), ws.raw_data());
    return ws;
  }
  Tensor argmax = empty(y.shape(), TensorOptions{}.with_dtype(DType::i32));
  DTRAIN_DISPATCH_FLOAT(x.dtype(), "max_pool2d", [&] {
    cpu::max_pool2d_forward_ref(g, x.data<scalar_t>(), y.data<scalar_t>(), argmax.data<int32_t>());
  });
  return argmax;
}

Tensor pool_backward(PoolAlgo a, const cpu::PoolGeom& g, const Tensor& winners,
                     const Tensor& grad) {
  if (!grad.defined()) return Tensor();
  Tensor dy = grad.contiguous();
  Tensor dx = empty({g.n, g.c, g.h, g.w}, dy.options());
  if (a == PoolAlgo::kOneDnn) {
    cpu::max_pool2d_backward_onednn(g, dy.data<float>(), winners.raw_data(), dx.data<float>());
    return dx;
  }
  DTRAIN_DISPATCH_FLOAT(dy.dtype(), "max_pool2d backward", [&] {
    cpu::max_pool2d_backward_ref(g, dy.data<scalar_t>(), winners.data<int32_t>(),
                                 dx.data<scalar_t>());
  });
  return dx;
}

}  // namespace

Tensor max_pool2d(const Tensor& x, MaxPool2dOptions opt, PoolAlgo algo) {
  cpu::PoolGeom g = check_pool(x, opt);
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda()) {  // cuDNN (cuda/cudnn_ops.cc)
    Tensor y = cuda::max_pool2d_forward(x, g);
    if (!any_requires_grad({x})) return y;
    Tensor xs = x.detach(), ys = y.detach();
    return make_function("max_pool2d", {x}, {y}, [xs, ys, g](const std::vector<Tensor>& grads) {
      if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
      return std::vector<Tensor>{cuda::max_pool2d_backward(grads[0], xs, ys, g)};
    })[0];
  }
#endif
  PoolAlgo a = resolve(algo, x.dtype());
  Tensor xc = x.detach().contiguous();
  Tensor y = empty({g.n, g.c, g.oh, g.ow}, x.options());
  if (g.planes() == 0) {
    TensorOptions opts = x.options();
    return make_function("max_pool2d", {x}, {y}, [g, opts](const std::vector<Tensor>&) {
      return std::vector<Tensor>{empty({g.n, g.c, g.h, g.w}, opts)};
    })[0];
  }
  Tensor winners = pool_forward(a, g, xc, y);
  if (!any_requires_grad({x})) return y;
  return make_function("max_pool2d", {x}, {y}, [a, g, winners](const std::vector<Tensor>& grads) {
    return std::vector<Tensor>{pool_backward(a, g, winners, grads[0])};
  })[0];
}

Tensor max_pool2d(const Tensor& x, MaxPool2dOptions opt) {
  return max_pool2d(x, opt, PoolAlgo::kAuto);
}

}  // namespace dtrain
