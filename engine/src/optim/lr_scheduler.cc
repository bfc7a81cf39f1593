// StepLR and CosineAnnealingLR: closed-form schedules over an epoch counter.
#include "dtrain/engine/optim/lr_scheduler.h"

#include <cmath>
#include <numbers>

namespace dtrain::optim {

LRScheduler::LRScheduler(Optimizer& optimizer) : optimizer_(optimizer), base_lr_(optimizer.lr()) {}

void LRScheduler::apply() const { optimizer_.set_lr(get_lr()); }

void LRScheduler::step() {
  ++last_epoch_;
  apply();
}

void LRScheduler::set_last_epoch(int64_t t) {
  DTRAIN_CHECK(t >= 0, InvalidArgument, "LR scheduler: epoch must be >= 0, got {}", t);
  last_epoch_ = t;
  apply();
}

StepLR::StepLR(Optimizer& optimizer, const StepLROptions& options)
    : LRScheduler(optimizer), options_(options) {
  DTRAIN_CHECK(options.step_size() > 0 && options.gamma() >= 0.0, InvalidArgument,
               "StepLR: step_size must be > 0 and gamma >= 0, got step_size {} gamma {}",
               options.step_size(), options.gamma());
  apply();
}

double StepLR::lr_at(int64_t t) const {
  return base_lr() * std::pow(options_.gamma(), static_cast<double>(t / options_.step_size()));
}

CosineAnnealingLR::CosineAnnealingLR(Optimizer& optimizer, const CosineAnnealingOptions& options)
    : LRScheduler(optimizer), options_(options) {
  DTRAIN_CHECK(options.t_max() > 0 && options.warmup_steps() >= 0 &&
                   options.warmup_steps() < options.t_max() && options.eta_min() >= 0.0,
               InvalidArgument,
               "CosineAnnealingLR: need 0 <= warmup_steps < T_max and eta_min >= 0, got T_max "
               "{} warmup_steps {} eta_min {}",
               options.t_max(), options.warmup_steps(), options.eta_min());
  apply();
}

double CosineAnnealingLR::lr_at(int64_t t) const {
  const int64_t w = options_.warmup_steps();
  if (t < w) return base_lr() * static_cast<double>(t + 1) / static_cast<double>(w);
  const double progress = static_cast<double>(t - w) / static_cast<double>(options_.t_max() - w);
  const double eta_min = options_.eta_min();
  return eta_min + (base_lr() - eta_min) * (1.0 + std::cos(std::numbers::pi * progress)) / 2.0;
}

}  // namespace dtrain::optim
