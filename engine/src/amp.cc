// Mixed precision (amp.h): loss scaling and master weights, device-independent.
#include "dtrain/engine/amp.h"

#include <cmath>

#include "dtrain/engine/amp_cpu.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain::amp {

bool has_nonfinite(const Tensor& t) {
  DTRAIN_CHECK(t.defined() && is_floating(t.dtype()), DTypeError,
               "has_nonfinite: expected a floating tensor, got {}",
               t.defined() ? dtype_name(t.dtype()) : "an undefined one");
#ifdef DTRAIN_WITH_CUDA
  if (t.device().is_cuda()) return cuda::count_nonfinite(t) > 0;
#endif
  Tensor c = t.dtype() == DType::f64 ? t.contiguous() : t.to(DType::f64);
  const double* p = c.data<double>();
  for (int64_t i = 0, n = c.numel(); i < n; ++i) {
    if (!fn::is_finite(p[i])) return true;
  }
  return false;
}

LossScaler::LossScaler(LossScalerOptions options)
    : options_(options), scale_(static_cast<float>(options.enabled ? options.init_scale : 1.0)) {
  DTRAIN_CHECK(options.init_scale > 0 && std::isfinite(options.init_scale), InvalidArgument,
               "LossScaler: init_scale must be positive and finite, got {}", options.init_scale);
  DTRAIN_CHECK(options.growth_factor > 1.0, InvalidArgument,
               "LossScaler: growth_factor must be > 1, got {}", options.growth_factor);
  DTRAIN_CHECK(options.backoff_factor > 0.0 && options.backoff_factor < 1.0, InvalidArgument,
               "LossScaler: backoff_factor must be in (0,1), got {}", options.backoff_factor);
  DTRAIN_CHECK(options.growth_interval >= 1, InvalidArgument,
               "LossScaler: growth_interval must be >= 1, got {}", options.growth_interval);
}

Tensor LossScaler::scale(const Tensor& loss) const {
  return scale_ == 1.0f ? loss : mul_scalar(loss, static_cast<double>(scale_));
}

bool LossScaler::unscale(const std::vector<Tensor>& params) const {
  NoGradGuard no_grad;
  bool found = false;
  const double inv = 1.0 / static_cast<double>(scale_);
  for (const Tensor& p : params) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    if (scale_ != 1.0f) g.copy_(mul_scalar(g, inv));
    found = found || has_nonfinite(g);
  }
  return found;
}

void LossScaler::update(bool found_nonfinite) {
  if (found_nonfinite) ++skipped_;
  if (!options_.enabled) return;
  fn::LossScaleUpdate{static_cast<float>(options_.growth_factor),
                      static_cast<float>(options_.backoff_factor),
                      options_.growth_interval}(found_nonfinite, scale_, good_steps_);
}

bool LossScaler::step(optim::Optimizer& opt) {
  bool found = unscale(opt.params());
  if (!found) opt.step();
  update(found);
  return !found;
}

MasterWeights::MasterWeights(std::vector<Tensor> model_params) : model_(std::move(model_params)) {
  master_.reserve(model_.size());
  for (const Tensor& p : model_) {
    DTRAIN_CHECK(p.defined() && is_floating(p.dtype()), DTypeError,
                 "MasterWeights: parameter '{}' is not a floating tensor", p.name());
    if (p.dtype() == DType::f32) {
      master_.push_back(p);
      continue;
    }
    Tensor m = p.detach().to(DType::f32);
    m.set_requires_grad(true);
    m.set_name(p.name());
    master_.push_back(m);
  }
}

void MasterWeights::copy_grads_to_master() {
  for (size_t i = 0; i < model_.size(); ++i) {
    if (model_[i].is_same(master_[i])) continue;
    Tensor g = model_[i].grad();
    master_[i].set_grad(g.defined() ? g.to(DType::f32) : Tensor());
    model_[i].set_grad(Tensor());
  }
}

void MasterWeights::copy_master_to_model() {
  for (size_t i = 0; i < model_.size(); ++i) {
    if (model_[i].is_same(master_[i])) continue;
    Tensor(model_[i]).copy_(master_[i]);  // rounds f32 -> bf16/f16
  }
}

// ---- autocast ----

namespace {

DType& autocast_state() {
  thread_local DType active = DType::f32;
  return active;
}

// a [m,k] @ b [k,n] with both operands rounded to `dt`; backward rounds the gradient.
Tensor rounded_mm(const Tensor& a, const Tensor& b, DType dt) {
  Tensor ar = round_through(a, dt), br = round_through(b, dt);
  Tensor y;
  {
    NoGradGuard no_grad;
    y = matmul(ar, br);
  }
  auto backward = [ar, br, dt](const std::vector<Tensor>& g) {
    if (!g[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
    NoGradGuard no_grad;
    Tensor gr = round_through(g[0], dt);
    return std::vector<Tensor>{matmul(gr, br.t()), matmul(ar.t(), gr)};
  };
  return make_function("autocast_mm", {a, b}, {y}, backward)[0];
}

}  // namespace

AutocastGuard::AutocastGuard(DType dtype, bool enabled) : previous_(autocast_state()) {
  DTRAIN_CHECK(dtype == DType::bf16 || dtype == DType::f16, DTypeError,
               "autocast: {} is not a 16-bit float type (bf16 or f16)", dtype_name(dtype));
  if (enabled) autocast_state() = dtype;
}

AutocastGuard::~AutocastGuard() { autocast_state() = previous_; }

DType AutocastGuard::dtype() { return autocast_state(); }

Tensor round_through(const Tensor& t, DType dtype) {
  NoGradGuard no_grad;
  return t.to(dtype).to(t.dtype());
}

Tensor autocast_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, DType dtype) {
  // bf16 on the CPU: oneDNN's bf16 primitives (amp_cpu.h) unless DTRAIN_CPU_BF16=emulate.
  if (dtype == DType::bf16 && x.device().is_cpu() && cpu_bf16_path() == CpuBf16Path::kOneDnn) {
    return onednn_bf16_linear(x, weight, bias);
  }
  return emulated_linear(x, weight, bias, dtype);
}

Tensor emulated_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, DType dtype) {
  const int64_t in = weight.size(1), out = weight.size(0);
  Shape out_shape = x.shape();
  out_shape.back() = out;
  Tensor y = rounded_mm(x.reshape({-1, in}), weight.t(), dtype);
  if (bias.defined()) y = add(y, bias);
  return y.reshape(out_shape);
}

}  // namespace dtrain::amp
