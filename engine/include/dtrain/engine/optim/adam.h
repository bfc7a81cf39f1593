// optim::Adam and optim::AdamW, exactly as torch.optim.Adam / AdamW (amsgrad off):
//
//   Adam:  g += weight_decay * p                 (L2 penalty, coupled)
//   AdamW: p *= 1 - lr * weight_decay            (decoupled weight decay)
//   t += 1;  m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g^2
//   p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
//
// The arithmetic is fn::AdamUpdate (functors.h), shared with the CUDA backend; the
// bias corrections are computed once per parameter and step, in double.
// State: "state.<i>.exp_avg", "state.<i>.exp_avg_sq", "state.<i>.step" (t is per
// parameter, as in PyTorch: a parameter without a gradient does not advance).
#pragma once

#include <vector>

#include "dtrain/engine/optim/optimizer.h"

namespace dtrain::optim {

// Shared setters for AdamOptions and AdamWOptions (they differ in the default
// weight decay, as in PyTorch: 0 for Adam, 0.01 for AdamW).
template <typename Self>
class AdamOptionsBase {
 public:
  Self& lr(double v) {
    lr_ = v;
    return self();
  }
  Self& betas(double beta1, double beta2) {
    beta1_ = beta1;
    beta2_ = beta2;
    return self();
  }
  Self& eps(double v) {
    eps_ = v;
    return self();
  }
  Self& weight_decay(double v) {
    weight_decay_ = v;
    return self();
  }
  double lr() const { return lr_; }
  double beta1() const { return beta1_; }
  double beta2() const { return beta2_; }
  double eps() const { return eps_; }
  double weight_decay() const { return weight_decay_; }

 protected:
  AdamOptionsBase(double lr, double weight_decay) : lr_(lr), weight_decay_(weight_decay) {}

 private:
  Self& self() { return static_cast<Self&>(*this); }
  double lr_;
  double beta1_ = 0.9;
  double beta2_ = 0.999;
  double eps_ = 1e-8;
  double weight_decay_;
};

class AdamOptions : public AdamOptionsBase<AdamOptions> {
 public:
  explicit AdamOptions(double lr = 1e-3) : AdamOptionsBase(lr, 0.0) {}
};

class AdamWOptions : public AdamOptionsBase<AdamWOptions> {
 public:
  explicit AdamWOptions(double lr = 1e-3) : AdamOptionsBase(lr, 1e-2) {}
};

class Adam : public Optimizer {
 public:
  // Throws InvalidArgument for lr < 0, eps < 0, weight_decay < 0 or a beta outside
  // [0, 1).
  Adam(std::vector<Tensor> params, const AdamOptions& options);
  void step() override;
  double beta1() const { return beta1_; }
  double beta2() const { return beta2_; }
  double eps() const { return eps_; }
  double weight_decay() const { return weight_decay_; }
  bool decoupled_weight_decay() const { return decoupled_; }

 protected:
  Adam(std::string name, std::vector<Tensor> params, double lr, double beta1, double beta2,
       double eps, double weight_decay, bool decoupled);

 private:
  double beta1_, beta2_, eps_, weight_decay_;
  bool decoupled_;
  size_t exp_avg_slot_, exp_avg_sq_slot_;
};

class AdamW : public Adam {
 public:
  AdamW(std::vector<Tensor> params, const AdamWOptions& options);
};

}  // namespace dtrain::optim
