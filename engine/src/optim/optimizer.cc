// Optimizer base: parameter validation, lazily created per-parameter state, and the
// flat, index-keyed state dict ("lr", "num_params", "state.<i>.<slot>",
// "state.<i>.step") with all-or-nothing validation on load.
#include "dtrain/engine/optim/optimizer.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <set>

namespace dtrain::optim {

namespace {

// Parses "state.<i>.<rest>"; false when `key` does not have that form.
bool parse_state_key(const std::string& key, size_t& index, std::string& rest) {
  const std::string prefix = "state.";
  if (key.compare(0, prefix.size(), prefix) != 0) return false;
  size_t dot = key.find('.', prefix.size());
  if (dot == std::string::npos || dot == prefix.size()) return false;
  const char* first = key.data() + prefix.size();
  const char* last = key.data() + dot;
  auto [ptr, ec] = std::from_chars(first, last, index);
  if (ec != std::errc() || ptr != last) return false;
  rest = key.substr(dot + 1);
  return !rest.empty();
}

Tensor scalar_i64(int64_t v) { return from_vector<int64_t>({v}, {}); }

}  // namespace

Optimizer::Optimizer(std::string name, std::vector<Tensor> params, double lr)
    : name_(std::move(name)), params_(std::move(params)) {
  DTRAIN_CHECK(!params_.empty(), InvalidArgument, "{}: got an empty parameter list", name_);
  std::set<const TensorImpl*> seen;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    DTRAIN_CHECK(p.defined(), InvalidArgument, "{}: parameter {} is undefined", name_, i);
    DTRAIN_CHECK(p.dtype() == DType::f32 || p.dtype() == DType::f64, DTypeError,
                 "{}: parameter {} {} has dtype {}; optimizers update f32 or f64 parameters", name_,
                 i, shape_str(p.shape()), dtype_name(p.dtype()));
    DTRAIN_CHECK(p.is_leaf() && p.is_contiguous(), InvalidArgument,
                 "{}: parameter {} {} must be a contiguous leaf tensor", name_, i,
                 shape_str(p.shape()));
    DTRAIN_CHECK(seen.insert(p.impl()).second, InvalidArgument,
                 "{}: parameter {} {} appears more than once", name_, i, shape_str(p.shape()));
  }
  steps_.assign(params_.size(), 0);
  set_lr(lr);
}

void Optimizer::set_lr(double lr) {
  DTRAIN_CHECK(std::isfinite(lr) && lr >= 0.0, InvalidArgument,
               "{}: learning rate must be finite and >= 0, got {}", name_, lr);
  lr_ = lr;
}

void Optimizer::zero_grad() {
  for (Tensor& p : params_) p.set_grad(Tensor());
}

size_t Optimizer::add_slot(const std::string& name) {
  slots_.push_back({name, std::vector<Tensor>(params_.size())});
  return slots_.size() - 1;
}

Tensor& Optimizer::slot_tensor(size_t slot, size_t i) {
  Tensor& t = slots_[slot].per_param[i];
  if (!t.defined()) t = zeros_like(params_[i]);
  return t;
}

void Optimizer::check_grad(size_t i, const Tensor& grad) const {
  const Tensor& p = params_[i];
  DTRAIN_CHECK(grad.shape() == p.shape() && grad.dtype() == p.dtype(), InvalidArgument,
               "{}: parameter {} is {} {} but its gradient is {} {}", name_, i,
               dtype_name(p.dtype()), shape_str(p.shape()), dtype_name(grad.dtype()),
               shape_str(grad.shape()));
}

StateDict Optimizer::state_dict() const {
  StateDict out;
  out.emplace("lr", from_vector<double>({lr_}, {}));
  out.emplace("num_params", scalar_i64(static_cast<int64_t>(params_.size())));
  for (size_t i = 0; i < params_.size(); ++i) {
    if (steps_[i] > 0) out.emplace(fmt::format("state.{}.step", i), scalar_i64(steps_[i]));
    for (const Slot& s : slots_) {
      if (s.per_param[i].defined()) {
        out.emplace(fmt::format("state.{}.{}", i, s.name), s.per_param[i].clone());
      }
    }
  }
  return out;
}

void Optimizer::load_state_dict(const StateDict& dict) {
  auto scalar = [&](const char* key, DType dtype) -> Tensor {
    auto it = dict.find(key);
    DTRAIN_CHECK(it != dict.end(), DataFormatError, "{} load_state_dict: missing key '{}'", name_,
                 key);
    const Tensor& t = it->second;
    DTRAIN_CHECK(t.defined() && t.numel() == 1 && t.dtype() == dtype, DataFormatError,
                 "{} load_state_dict: '{}' must be a one-element {} tensor", name_, key,
                 dtype_name(dtype));
    return t;
  };
  double lr = scalar("lr", DType::f64).item();
  int64_t n = static_cast<int64_t>(scalar("num_params", DType::i64).item());
  DTRAIN_CHECK(n == static_cast<int64_t>(params_.size()), DataFormatError,
               "{} load_state_dict: the state is for {} parameters, this optimizer has {}", name_,
               n, params_.size());
  DTRAIN_CHECK(std::isfinite(lr) && lr >= 0.0, DataFormatError,
               "{} load_state_dict: bad learning rate {}", name_, lr);

  std::vector<int64_t> steps(params_.size(), 0);
  std::vector<std::vector<Tensor>> slot_values(slots_.size(), std::vector<Tensor>(params_.size()));
  for (const auto& [key, t] : dict) {
    if (key == "lr" || key == "num_params") continue;
    size_t i = 0;
    std::string rest;
    DTRAIN_CHECK(parse_state_key(key, i, rest) && i < params_.size(), DataFormatError,
                 "{} load_state_dict: unexpected key '{}' (this optimizer has {} parameters)",
                 name_, key, params_.size());
    DTRAIN_CHECK(t.defined(), DataFormatError, "{} load_state_dict: '{}' is undefined", name_, key);
    if (rest == "step") {
      DTRAIN_CHECK(t.numel() == 1 && t.dtype() == DType::i64, DataFormatError,
                   "{} load_state_dict: '{}' must be a one-element i64 tensor", name_, key);
      steps[i] = static_cast<int64_t>(t.item());
      DTRAIN_CHECK(steps[i] >= 1, DataFormatError,
                   "{} load_state_dict: '{}' is {}, expected a count >= 1", name_, key, steps[i]);
      continue;
    }
    size_t slot = 0;
    while (slot < slots_.size() && slots_[slot].name != rest) ++slot;
    DTRAIN_CHECK(slot < slots_.size(), DataFormatError,
                 "{} load_state_dict: unexpected key '{}' ({} keeps no '{}' state)", name_, key,
                 name_, rest);
    const Tensor& p = params_[i];
    DTRAIN_CHECK(t.shape() == p.shape() && t.dtype() == p.dtype(), DataFormatError,
                 "{} load_state_dict: '{}' is {} {} but parameter {} is {} {}", name_, key,
                 dtype_name(t.dtype()), shape_str(t.shape()), i, dtype_name(p.dtype()),
                 shape_str(p.shape()));
    slot_values[slot][i] = t;
  }
  for (size_t s = 0; s < slots_.size(); ++s) {
    for (size_t i = 0; i < params_.size(); ++i) {
      DTRAIN_CHECK(!slot_values[s][i].defined() || steps[i] >= 1, DataFormatError,
                   "{} load_state_dict: 'state.{}.{}' is present but 'state.{}.step' is not", name_,
                   i, slots_[s].name, i);
    }
  }
  // Everything checked: apply.
  lr_ = lr;
  steps_ = steps;
  for (size_t s = 0; s < slots_.size(); ++s) {
    for (size_t i = 0; i < params_.size(); ++i) {
      const Tensor& v = slot_values[s][i];
      // A slot lives where its parameter lives (state loads on the CPU; the model may
      // be on a GPU). to() returns *this on the same device, hence the clone.
      slots_[s].per_param[i] =
          v.defined() ? v.contiguous().clone().to(params_[i].device()) : Tensor();
    }
  }
}

}  // namespace dtrain::optim
