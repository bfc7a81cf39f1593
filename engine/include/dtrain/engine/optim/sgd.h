// optim::SGD: stochastic gradient descent with momentum, Nesterov momentum,
// dampening and (coupled, L2) weight decay, exactly as torch.optim.SGD:
//
//   g += weight_decay * p
//   buf = g on a parameter's first step, else momentum * buf + (1 - dampening) * g
//   d = nesterov ? g + momentum * buf : buf        (d = g when momentum is 0)
//   p -= lr * d
//
// The arithmetic is fn::SgdUpdate (functors.h), shared with the CUDA backend.
// State: "state.<i>.momentum_buffer" (only when momentum != 0) and "state.<i>.step".
#pragma once

#include <vector>

#include "dtrain/engine/optim/optimizer.h"

namespace dtrain::optim {

class SGDOptions {
 public:
  explicit SGDOptions(double lr) : lr_(lr) {}
  SGDOptions& lr(double v) {
    lr_ = v;
    return *this;
  }
  SGDOptions& momentum(double v) {
    momentum_ = v;
    return *this;
  }
  SGDOptions& dampening(double v) {
    dampening_ = v;
    return *this;
  }
  SGDOptions& weight_decay(double v) {
    weight_decay_ = v;
    return *this;
  }
  SGDOptions& nesterov(bool on) {
    nesterov_ = on;
    return *this;
  }
  double lr() const { return lr_; }
  double momentum() const { return momentum_; }
  double dampening() const { return dampening_; }
  double weight_decay() const { return weight_decay_; }
  bool nesterov() const { return nesterov_; }

 private:
  double lr_;
  double momentum_ = 0.0;
  double dampening_ = 0.0;
  double weight_decay_ = 0.0;
  bool nesterov_ = false;
};

class SGD : public Optimizer {
 public:
  // Throws InvalidArgument for negative values, or nesterov without momentum or
  // with dampening (as torch.optim.SGD).
  SGD(std::vector<Tensor> params, const SGDOptions& options);
  void step() override;
  const SGDOptions& options() const { return options_; }

 private:
  SGDOptions options_;
  size_t momentum_slot_;
};

}  // namespace dtrain::optim
