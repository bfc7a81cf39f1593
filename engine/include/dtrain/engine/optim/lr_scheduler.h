// Learning-rate schedules: StepLR and CosineAnnealingLR (with optional linear warmup).
//
// A scheduler remembers the optimizer's learning rate at construction (base_lr)
// and sets the optimizer's lr from a closed-form function of an epoch counter
// (which may count steps or epochs; the caller decides how often to call step()).
// The constructor applies epoch 0, as PyTorch's schedulers do, so the usual loop is
//   for (...) { train one epoch/step with opt.lr(); sched.step(); }
//
//   StepLR:             lr(t) = base_lr * gamma^floor(t / step_size)
//   CosineAnnealingLR:  lr(t) = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2
//     (PyTorch's closed form: past T_max it rises again, with period 2 * T_max)
//   with warmup W > 0:  lr(t) = base_lr * (t + 1) / W                        for t < W
//                       lr(t) = cosine above with t -> t - W, T_max -> T_max - W  else
//
// Resuming: set_last_epoch(t) restores the schedule position (save last_epoch()
// with the checkpoint). Thread-safety: one thread at a time.
#pragma once

#include <cstdint>

#include "dtrain/engine/optim/optimizer.h"

namespace dtrain::optim {

class LRScheduler {
 public:
  explicit LRScheduler(Optimizer& optimizer);
  virtual ~LRScheduler() = default;
  LRScheduler(const LRScheduler&) = delete;
  LRScheduler& operator=(const LRScheduler&) = delete;

  // Advances the counter by one and sets the optimizer's lr to get_lr().
  void step();
  // The learning rate for the current counter value.
  double get_lr() const { return lr_at(last_epoch_); }
  // The learning rate the schedule gives at counter value t >= 0.
  virtual double lr_at(int64_t t) const = 0;
  int64_t last_epoch() const { return last_epoch_; }
  // Moves to counter value t (>= 0) and sets the optimizer's lr.
  void set_last_epoch(int64_t t);
  double base_lr() const { return base_lr_; }

 protected:
  // Subclasses call this at the end of their constructor (after their fields are set).
  void apply() const;

 private:
  Optimizer& optimizer_;
  double base_lr_;
  int64_t last_epoch_ = 0;
};

class StepLROptions {
 public:
  explicit StepLROptions(int64_t step_size) : step_size_(step_size) {}
  StepLROptions& gamma(double g) {
    gamma_ = g;
    return *this;
  }
  int64_t step_size() const { return step_size_; }
  double gamma() const { return gamma_; }

 private:
  int64_t step_size_;
  double gamma_ = 0.1;
};

class StepLR : public LRScheduler {
 public:
  StepLR(Optimizer& optimizer, const StepLROptions& options);
  double lr_at(int64_t t) const override;

 private:
  StepLROptions options_;
};

class CosineAnnealingOptions {
 public:
  explicit CosineAnnealingOptions(int64_t t_max) : t_max_(t_max) {}
  CosineAnnealingOptions& eta_min(double v) {
    eta_min_ = v;
    return *this;
  }
  CosineAnnealingOptions& warmup_steps(int64_t w) {
    warmup_ = w;
    return *this;
  }
  int64_t t_max() const { return t_max_; }
  double eta_min() const { return eta_min_; }
  int64_t warmup_steps() const { return warmup_; }

 private:
  int64_t t_max_;
  double eta_min_ = 0.0;
  int64_t warmup_ = 0;
};

class CosineAnnealingLR : public LRScheduler {
 public:
  // Throws InvalidArgument unless 0 <= warmup_steps < t_max.
  CosineAnnealingLR(Optimizer& optimizer, const CosineAnnealingOptions& options);
  double lr_at(int64_t t) const override;

 private:
  CosineAnnealingOptions options_;
};

}  // namespace dtrain::optim
