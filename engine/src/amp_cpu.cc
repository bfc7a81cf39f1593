// bf16 autocast on the CPU (amp_cpu.h): the oneDNN path, the emulation, the ISA check.
#include "dtrain/engine/amp_cpu.h"

#include <cstdlib>

#include "cpu/bf16_onednn.h"
#include "dtrain/engine/amp.h"
#include "dtrain/engine/autograd.h"
#include "ops_conv.h"

namespace dtrain::amp {

CpuBf16Path cpu_bf16_path() {
  const char* env = std::getenv("DTRAIN_CPU_BF16");
  const std::string v = env ? env : "";
  if (v == "onednn") return CpuBf16Path::kOneDnn;
  // Unset: oneDNN where the CPU runs bf16 natively; elsewhere the library keeps the
  // emulation (what CUDA runs), and `dtrain train --amp bf16` refuses (train_amp.cc).
  if (v.empty()) return cpu_has_native_bf16() ? CpuBf16Path::kOneDnn : CpuBf16Path::kEmulate;
  DTRAIN_CHECK(v == "emulate", InvalidArgument,
               "DTRAIN_CPU_BF16={}: expected onednn or emulate (unset: onednn where the CPU "
               "has AVX512-BF16 or AMX)",
               v);
  return CpuBf16Path::kEmulate;
}

bool cpu_has_native_bf16() { return cpu::onednn_has_native_bf16(); }

std::string cpu_isa_name() { return cpu::onednn_isa_name(); }

void require_cpu_bf16(CpuBf16Path path) {
  DTRAIN_CHECK(path == CpuBf16Path::kEmulate || cpu_has_native_bf16(), UnsupportedError,
               "bf16 on the CPU needs AVX512-BF16 or AMX; this CPU has {} (oneDNN's effective "
               "ISA). Train in f32, or set DTRAIN_CPU_BF16=emulate for the (slow) rounded-f32 "
               "emulation",
               cpu_isa_name());
}

namespace {

void check_cpu_f32(const char* op, const Tensor& x, const Tensor& w, const Tensor& b) {
  for (const Tensor* t : {&x, &w, &b}) {
    if (!t->defined()) continue;
    DTRAIN_CHECK(t->device().is_cpu() && t->dtype() == DType::f32, DTypeError,
                 "{}: the oneDNN bf16 path takes f32 CPU tensors, got {} on {}", op,
                 dtype_name(t->dtype()), t->device().str());
  }
}

BFloat16* bf16_data(const Tensor& t) { return t.defined() ? t.data<BFloat16>() : nullptr; }

// t (f32, detached) rounded to bf16 with the conversion shared with CUDA (BFloat16's
// round to nearest even), in one pass over contiguous memory.
Tensor to_bf16(const Tensor& t) {
  Tensor c = t.detach().contiguous();
  Tensor out = empty(c.shape(), TensorOptions{DType::bf16, c.device()});
  const float* p = c.data<float>();
  BFloat16* q = out.data<BFloat16>();
  for (int64_t i = 0, n = c.numel(); i < n; ++i) q[i] = BFloat16(p[i]);
  return out;
}

// db[o] = the sum of dy[n, o, :, :] over n (dy contiguous NCHW f32): 16 running sums
// per plane (so the compiler keeps them in one vector register), added in order.
Tensor bias_grad_nchw(const Tensor& dy) {
  const Shape& s = dy.shape();
  const int64_t n = s[0], o = s[1], hw = s[2] * s[3];
  Tensor db = zeros({o}, dy.options());
  const float* p = dy.data<float>();
  float* out = db.data<float>();
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t c = 0; c < o; ++c) {
      const float* plane = p + (b * o + c) * hw;
      float acc[16] = {};
      int64_t i = 0;
      for (; i + 16 <= hw; i += 16) {
        for (int j = 0; j < 16; ++j) acc[j] += plane[i + j];
      }
      float total = 0;
      for (float a : acc) total += a;
      for (; i < hw; ++i) total += plane[i];
      out[c] += total;
    }
  }
  return db;
}

// Forward: t rounded to dt; backward: the gradient unchanged (straight through).
Tensor rounded_operand(const Tensor& t, DType dt) {
  Tensor r = round_through(t, dt);
  if (!t.requires_grad()) return r;
  return make_function("autocast_round", {t}, {r},
                       [](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0]}; })[0];
}

// Forward: t; backward: the gradient rounded to dt.
Tensor rounded_gradient(const Tensor& t, DType dt) {
  if (!t.requires_grad()) return t;
  return make_function(
      "autocast_round_grad", {t}, {t.detach()}, [dt](const std::vector<Tensor>& g) {
        return std::vector<Tensor>{g[0].defined() ? round_through(g[0], dt) : Tensor()};
      })[0];
}

// What the linear's backward needs: the bf16 operands the gradients read.
struct LinearSaved {
  int64_t m, in, out;
  Shape x_shape;
  Tensor xb, wb;  // xb for the weight gradient, wb for the input gradient
  bool gx, gw, gb;
};

std::vector<Tensor> linear_backward(const LinearSaved& s, const Tensor& grad) {
  if (!grad.defined()) return std::vector<Tensor>(3);
  NoGradGuard no_grad;
  Tensor g2 = grad.reshape({s.m, s.out});
  Tensor gb16 = to_bf16(g2);
  Tensor dx, dw, db;
  if (s.gx) {
    dx = empty({s.m, s.in}, g2.options());
    cpu::matmul_bf16_onednn({s.m, s.in, s.out, false, false}, bf16_data(gb16), bf16_data(s.wb),
                            nullptr, dx.data<float>());
    dx = dx.reshape(s.x_shape);
  }
  if (s.gw) {
    dw = zeros({s.out, s.in}, g2.options());
    if (s.m > 0) {
      cpu::matmul_bf16_onednn({s.out, s.in, s.m, true, false}, bf16_data(gb16), bf16_data(s.xb),
                              nullptr, dw.data<float>());
    }
  }
  if (s.gb) db = sum(g2, {0});
  return {dx, dw, db};
}

}  // namespace

Tensor onednn_bf16_linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  require_cpu_bf16(CpuBf16Path::kOneDnn);
  check_cpu_f32("linear", x, weight, bias);
  const int64_t in = weight.size(1), out = weight.size(0);
  DTRAIN_CHECK(in > 0, ShapeError, "linear (bf16): weight {} has no input features",
               shape_str(weight.shape()));
  const int64_t m = x.numel() / in;
  Shape out_shape = x.shape();
  out_shape.back() = out;
  Tensor xb = to_bf16(x), wb = to_bf16(weight);
  Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
  Tensor y = empty({m, out}, x.options());
  cpu::matmul_bf16_onednn({m, out, in, false, true}, bf16_data(xb), bf16_data(wb),
                          bc.defined() ? bc.data<float>() : nullptr, y.data<float>());
  y = y.reshape(out_shape);
  if (!any_requires_grad({x, weight, bias})) return y;
  bool gx = x.requires_grad(), gw = weight.requires_grad();
  bool gb = bias.defined() && bias.requires_grad();
  LinearSaved saved{m, in, out, x.shape(), gw ? xb : Tensor(), gx ? wb : Tensor(), gx, gw, gb};
  return make_function(
      "bf16_linear", {x, weight, bias}, {y},
      [saved](const std::vector<Tensor>& g) { return linear_backward(saved, g[0]); })[0];
}

namespace {

struct ConvSavedBf16 {
  cpu::ConvGeom g;
  Tensor xb, wb;  // xb for the weight gradient, wb for the input gradient
  bool gx, gw, gb;
};

std::vector<Tensor> conv_backward(const ConvSavedBf16& s, const Tensor& grad) {
  if (!grad.defined()) return std::vector<Tensor>(3);
  NoGradGuard no_grad;
  const cpu::ConvGeom& g = s.g;
  Tensor dy = grad.contiguous();
  Tensor dyb = to_bf16(dy);
  Tensor dx, dw, db;
  if (s.gx) {
    dx = empty({g.n, g.c, g.h, g.w}, dy.options());
    if (g.n > 0) {
      cpu::conv2d_backward_data_bf16_onednn(g, bf16_data(dyb), bf16_data(s.wb), dx.data<float>());
    }
  }
  if (s.gw) {
    dw = zeros({g.o, g.c, g.kh, g.kw}, dy.options());
    if (g.n > 0) {
      cpu::conv2d_backward_weights_bf16_onednn(g, bf16_data(s.xb), bf16_data(dyb), dw.data<float>(),
                                               nullptr);
    }
  }
  if (s.gb) db = bias_grad_nchw(dy);  // from the f32 gradient, as the emulation's bias add
  return {dx, dw, db};
}

}  // namespace

Tensor onednn_bf16_conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias,
                          Conv2dOptions opt) {
  require_cpu_bf16(CpuBf16Path::kOneDnn);
  cpu::ConvGeom g = conv2d_geometry(x, weight, bias, opt);
  check_cpu_f32("conv2d", x, weight, bias);
  DTRAIN_CHECK(g.groups == 1, UnsupportedError,
               "conv2d (bf16): groups {} is not supported by the oneDNN bf16 path (groups 1)",
               g.groups);
  Tensor xb = to_bf16(x), wb = to_bf16(weight);
  Tensor bc = bias.defined() ? bias.detach().contiguous() : Tensor();
  Tensor y = empty({g.n, g.o, g.oh, g.ow}, x.options());
  if (g.n > 0) {
    cpu::conv2d_forward_bf16_onednn(g, bf16_data(xb), bf16_data(wb),
                                    bc.defined() ? bc.data<float>() : nullptr, y.data<float>());
  }
  if (!any_requires_grad({x, weight, bias})) return y;
  bool gx = x.requires_grad(), gw = weight.requires_grad();
  bool gb = bias.defined() && bias.requires_grad();
  ConvSavedBf16 saved{g, gw ? xb : Tensor(), gx ? wb : Tensor(), gx, gw, gb};
  return make_function(
      "bf16_conv2d", {x, weight, bias}, {y},
      [saved](const std::vector<Tensor>& grads) { return conv_backward(saved, grads[0]); })[0];
}

Tensor emulated_conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt,
                       DType dtype) {
  conv2d_geometry(x, weight, bias, opt);  // the checks (and errors) of conv2d
  Tensor y = conv2d(rounded_operand(x, dtype), rounded_operand(weight, dtype), Tensor(), opt,
                    ConvAlgo::kAuto);
  y = rounded_gradient(y, dtype);
  if (bias.defined()) y = add(y, bias.reshape({1, -1, 1, 1}));
  return y;
}

Tensor autocast_conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt,
                       DType dtype) {
  if (dtype == DType::bf16 && x.device().is_cpu() && cpu_bf16_path() == CpuBf16Path::kOneDnn) {
    return onednn_bf16_conv2d(x, weight, bias, opt);
  }
  return emulated_conv2d(x, weight, bias, opt, dtype);
}

}  // namespace dtrain::amp
