// optim::Optimizer: the base of SGD, Adam and AdamW.
//
// An optimizer holds one list of parameters (a single parameter group) and a
// learning rate that a scheduler may change between steps. step() runs under
// NoGradGuard and skips every parameter whose grad() is undefined: a frozen
// parameter (requires_grad false) never receives a gradient, so it is left
// bit-identical, weight decay included, as in torch.optim. The per-element update
// arithmetic lives in the shared functors of functors.h (fn::SgdUpdate,
// fn::AdamUpdate), which the CUDA backend reuses; the optimizers only loop over
// contiguous parameter/gradient/state buffers.
//
// State (momentum buffers, Adam moments, step counts) is exported by state_dict()
// as a flat name -> Tensor map keyed by parameter index ("state.3.exp_avg",
// "state.3.step", plus "lr"), so it goes through the same archive as model weights.
// load_state_dict() validates the parameter count, every key and every shape before
// it changes anything. State is created lazily on a parameter's first step.
//
// Not here: parameter groups with different hyper-parameters, gradient clipping,
// sharding (ZeRO reuses state_dict's per-index layout).
// Thread-safety: one thread at a time.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dtrain/engine/tensor.h"

namespace dtrain::optim {

// name -> tensor (sorted by name).
using StateDict = std::map<std::string, Tensor>;

class Optimizer {
 public:
  // params: leaf tensors (each at most once, contiguous, floating). lr >= 0.
  Optimizer(std::string name, std::vector<Tensor> params, double lr);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Applies one update to every parameter that has a gradient.
  virtual void step() = 0;
  // Makes every parameter's grad undefined (set_to_none).
  void zero_grad();

  double lr() const { return lr_; }
  void set_lr(double lr);
  const std::vector<Tensor>& params() const { return params_; }
  // "SGD", "Adam", "AdamW".
  const std::string& name() const { return name_; }

  // The optimizer state keyed by parameter index (see the file comment). Tensors
  // are copies, so the dict stays valid while training goes on.
  StateDict state_dict() const;
  // Validates `dict` (DataFormatError naming the key for an unknown key, a wrong
  // parameter count, a state shape that does not match its parameter, a bad step
  // count), then restores it.
  void load_state_dict(const StateDict& dict);

 protected:
  // One named state tensor per parameter; the subclass names them ("exp_avg").
  struct Slot {
    std::string name;
    std::vector<Tensor> per_param;  // undefined until the parameter's first step
  };
  // Registers a per-parameter state tensor with the same shape and dtype as its
  // parameter. Call in the constructor; returns the slot index.
  size_t add_slot(const std::string& name);
  // The state tensor of `slot` for parameter i, created zeroed when absent.
  Tensor& slot_tensor(size_t slot, size_t i);
  bool has_slot_tensor(size_t slot, size_t i) const { return slots_[slot].per_param[i].defined(); }
  // Per-parameter step counts (how many updates parameter i has had).
  std::vector<int64_t> steps_;
  // Throws InvalidArgument naming the parameter when its gradient cannot be used.
  void check_grad(size_t i, const Tensor& grad) const;

 private:
  std::string name_;
  std::vector<Tensor> params_;
  double lr_;
  std::vector<Slot> slots_;
};

}  // namespace dtrain::optim
