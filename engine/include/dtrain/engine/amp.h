// Mixed precision: bf16/f16 compute with f32 master weights, and dynamic loss scaling.
//
// The recipe (one training step):
//   MasterWeights mw(model.parameters());     // model in bf16/f16, masters in f32
//   optim::Adam opt(mw.master(), ...);        // the optimizer updates the masters
//   ...
//   scaler.scale(loss).backward();            // gradients of loss * S reach the model
//   mw.copy_grads_to_master();                // low-precision grads -> f32 master grads
//   if (scaler.step(opt)) mw.copy_master_to_model();
// LossScaler::step unscales the master gradients (g /= S); when any of them is inf or
// NaN it skips the optimizer step, multiplies S by backoff_factor and returns false;
// after growth_interval finite steps in a row it multiplies S by growth_factor
// (fn::LossScaleUpdate, shared with the device code). bf16 has f32's exponent range and
// rarely needs scaling: construct the scaler with enabled = false to keep S = 1 and
// only skip non-finite steps.
//
// Nothing here depends on the device: the same code runs on the CPU (tests) and CUDA.
// Thread-safety: one training thread.
#pragma once

#include <cstdint>
#include <vector>

#include "dtrain/engine/optim/optimizer.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::amp {

// True when any element of t is NaN or +-inf (any floating dtype, any device).
bool has_nonfinite(const Tensor& t);

struct LossScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int growth_interval = 2000;
  bool enabled = true;  // false: scale stays 1, non-finite steps are still skipped
};

class LossScaler {
 public:
  // Throws InvalidArgument for a non-positive scale, growth <= 1, backoff outside (0,1)
  // or growth_interval < 1.
  explicit LossScaler(LossScalerOptions options = {});

  // loss * scale (differentiable).
  Tensor scale(const Tensor& loss) const;
  // Multiplies every defined gradient of params by 1/scale in place; returns true when
  // any gradient holds a NaN or inf.
  bool unscale(const std::vector<Tensor>& params) const;
  // Adjusts the scale after a step (fn::LossScaleUpdate).
  void update(bool found_nonfinite);
  // unscale(opt.params()); opt.step() unless a gradient is non-finite; update().
  // Returns whether the step was taken.
  bool step(optim::Optimizer& opt);

  double scale_value() const { return scale_; }
  int good_steps() const { return good_steps_; }
  int64_t skipped_steps() const { return skipped_; }

 private:
  LossScalerOptions options_;
  float scale_;
  int good_steps_ = 0;
  int64_t skipped_ = 0;
};

// f32 master copies of low-precision parameters (f32 parameters are used as they are).
class MasterWeights {
 public:
  explicit MasterWeights(std::vector<Tensor> model_params);
  // The f32 leaves (requires_grad) to hand to the optimizer, in model_params order.
  const std::vector<Tensor>& master() const { return master_; }
  // master grad = model grad converted to f32 (undefined model grads stay undefined);
  // the model grads are then cleared.
  void copy_grads_to_master();
  // model param = master param, rounded to the model's dtype.
  void copy_master_to_model();

 private:
  std::vector<Tensor> model_;
  std::vector<Tensor> master_;
};

// ---- autocast: matrix products in bf16 inside a scope ----
//
// While an AutocastGuard(DType::bf16) is alive on this thread, linear() on f32
// inputs runs as a bf16 GEMM with f32 accumulation (what tensor cores do with
// bf16 operands and an f32 accumulator): both operands are rounded to bf16 (round to
// nearest even), multiplied (a product of two bf16 values is exact in f32) and summed
// in f32; the bias is added in f32. Backward rounds the incoming gradient to bf16 and
// runs the two GEMMs the same way, so the f32 parameters get the gradients a bf16
// run computes. Everything else (LayerNorm, softmax, attention, losses, the
// optimizer) stays f32, as torch.autocast keeps its "float32 list". The rounding is
// the same code on the CPU and on CUDA (Tensor::to(bf16) and back), so CPU tests
// cover the arithmetic; on CUDA the products then run on f32 cuBLAS (not yet the
// bf16 tensor-core GEMM, which would be faster, not different).
// Thread-safety: the mode is per thread (as NoGradGuard's).
class AutocastGuard {
 public:
  // dtype: bf16 or f16 (DTypeError otherwise); enabled = false leaves it off.
  explicit AutocastGuard(DType dtype = DType::bf16, bool enabled = true);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;
  // The active autocast dtype on this thread; f32 when none.
  static DType dtype();

 private:
  DType previous_;
};

// t rounded to `dtype` and back to t's dtype (not differentiable).
Tensor round_through(const Tensor& t, DType dtype);
// x [..., in] W[out, in]^T + b with the operands rounded to `dtype` (see above);
// differentiable. What linear() calls under an AutocastGuard. bf16 on the CPU runs
// oneDNN's bf16 primitives instead of the f32 GEMM (amp_cpu.h: same products, another
// summation order; conv2d gets the same treatment there).
Tensor autocast_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, DType dtype);

}  // namespace dtrain::amp
