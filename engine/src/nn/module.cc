// nn::Module: registration, hierarchical names, traversal, modes and state dicts.
//
// Paths are pushed down at registration time: register_module() gives the child
// the path "<parent path>.<name>" and re-paths its whole subtree, so a layer can
// name itself in messages without knowing its parent. Loading a state dict is
// all-or-nothing: every key, shape and dtype is checked before the first copy.
#include "dtrain/engine/nn/module.h"

#include <fmt/format.h>

#include <set>

#include "dtrain/engine/autograd.h"

namespace dtrain::nn {

namespace {

std::string quoted_list(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) {
    if (!out.empty()) out += ", ";
    out += "'" + n + "'";
  }
  return out;
}

}  // namespace

Module::Module(std::string type_name) : type_name_(std::move(type_name)) {}

std::string Module::describe() const {
  std::string s = type_name_;
  if (!path_.empty()) s += " '" + path_ + "'";
  std::string extra = extra_repr();
  if (!extra.empty()) s += " (" + extra + ")";
  return s;
}

void Module::append_str(std::string& out, const std::string& label, int depth) const {
  std::string indent(static_cast<size_t>(depth) * 2, ' ');
  std::string extra = extra_repr();
  out += indent + (label.empty() ? "" : "(" + label + "): ") + type_name_;
  if (!extra.empty()) out += "(" + extra + ")";
  if (depth == 0) out += fmt::format("  [{} parameters]", num_parameters());
  out += "\n";
  for (const auto& [name, child] : children_) child->append_str(out, name, depth + 1);
}

std::string Module::str() const {
  std::string out;
  append_str(out, "", 0);
  return out;
}

void Module::check_new_name(const std::string& name, const char* what) const {
  DTRAIN_CHECK(!name.empty() && name.find('.') == std::string::npos, InvalidArgument,
               "{}: cannot register {} '{}': names must be non-empty and contain no '.'",
               describe(), what, name);
  auto taken = [&](const auto& list) {
    for (const auto& entry : list) {
      if (entry.first == name) return true;
    }
    return false;
  };
  DTRAIN_CHECK(!taken(params_) && !taken(buffers_) && !taken(children_), InvalidArgument,
               "{}: cannot register {} '{}': the name is already used", describe(), what, name);
}

std::string Module::child_path(const std::string& child) const {
  return path_.empty() ? child : path_ + "." + child;
}

void Module::set_path(const std::string& path) {
  path_ = path;
  for (auto& [name, child] : children_) child->set_path(child_path(name));
}

Tensor Module::register_parameter(const std::string& name, Tensor tensor, bool requires_grad) {
  check_new_name(name, "parameter");
  DTRAIN_CHECK(tensor.defined(), InvalidArgument, "{}: parameter '{}' is undefined", describe(),
               name);
  DTRAIN_CHECK(is_floating(tensor.dtype()), DTypeError,
               "{}: parameter '{}' must be floating point, got {}", describe(), name,
               dtype_name(tensor.dtype()));
  if (!tensor.is_leaf()) tensor = tensor.detach();
  tensor.set_requires_grad(requires_grad);
  params_.emplace_back(name, tensor);
  return tensor;
}

Tensor Module::register_buffer(const std::string& name, Tensor tensor) {
  check_new_name(name, "buffer");
  DTRAIN_CHECK(tensor.defined(), InvalidArgument, "{}: buffer '{}' is undefined", describe(), name);
  if (!tensor.is_leaf() || tensor.requires_grad()) tensor = tensor.detach();
  buffers_.emplace_back(name, tensor);
  return tensor;
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> child) {
  check_new_name(name, "module");
  DTRAIN_CHECK(child != nullptr, InvalidArgument, "{}: module '{}' is null", describe(), name);
  DTRAIN_CHECK(child.get() != this, InvalidArgument, "{}: cannot register itself as '{}'",
               describe(), name);
  child->set_path(child_path(name));
  children_.emplace_back(name, std::move(child));
}

void Module::collect(NamedTensors& out, const std::string& prefix, bool params,
                     bool recurse) const {
  for (const auto& [name, t] : params ? params_ : buffers_) out.emplace_back(prefix + name, t);
  if (!recurse) return;
  for (const auto& [name, child] : children_)
    child->collect(out, prefix + name + ".", params, true);
}

NamedTensors Module::named_parameters(bool recurse) const {
  NamedTensors out;
  collect(out, "", true, recurse);
  return out;
}

NamedTensors Module::named_buffers(bool recurse) const {
  NamedTensors out;
  collect(out, "", false, recurse);
  return out;
}

std::vector<Tensor> Module::parameters(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& [name, t] : named_parameters(recurse)) out.push_back(t);
  return out;
}

std::vector<Tensor> Module::buffers(bool recurse) const {
  std::vector<Tensor> out;
  for (auto& [name, t] : named_buffers(recurse)) out.push_back(t);
  return out;
}

std::vector<std::shared_ptr<Module>> Module::children() const {
  std::vector<std::shared_ptr<Module>> out;
  for (const auto& [name, child] : children_) out.push_back(child);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const Tensor& p : parameters()) n += p.numel();
  return n;
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [name, child] : children_) child->train(on);
}

void Module::zero_grad() {
  for (Tensor& p : parameters()) p.set_grad(Tensor());
}

void Module::set_requires_grad(bool requires_grad) {
  for (Tensor& p : parameters()) {
    p.set_requires_grad(requires_grad);
    if (!requires_grad) p.set_grad(Tensor());
  }
}

void Module::to(const Device& device) {
  NoGradGuard no_grad;
  std::vector<Tensor> all = parameters();
  for (const Tensor& b : buffers()) all.push_back(b);
  std::vector<std::pair<TensorImpl*, Tensor>> moves;  // validated and copied first
  for (const Tensor& t : all) {
    if (t.device() == device) continue;
    bool seen = false;  // a tied tensor is moved once
    for (const auto& m : moves) seen = seen || m.first == t.impl();
    if (seen) continue;
    moves.emplace_back(t.impl(), t.contiguous().to(device));
  }
  for (auto& [impl, moved] : moves) {
    if (impl->grad != nullptr && Tensor(impl->grad).device() != device) {
      impl->grad = Tensor(impl->grad).contiguous().to(device).impl_ptr();
    }
    impl->storage = moved.impl()->storage;
    impl->offset = moved.impl()->offset;
    impl->strides = moved.impl()->strides;
  }
}

StateDict Module::state_dict() const {
  StateDict out;
  for (auto& [name, t] : named_parameters()) out.emplace(name, t.detach());
  for (auto& [name, t] : named_buffers()) out.emplace(name, t.detach());
  return out;
}

LoadReport Module::check_state_dict(const StateDict& dict, bool strict) const {
  NamedTensors own = named_parameters();
  NamedTensors bufs = named_buffers();
  own.insert(own.end(), bufs.begin(), bufs.end());
  LoadReport report;
  std::vector<std::string> shape_errors, dtype_errors;
  std::set<std::string> own_names;
  for (const auto& [name, t] : own) {
    own_names.insert(name);
    auto it = dict.find(name);
    if (it == dict.end()) {
      report.missing_keys.push_back(name);
      continue;
    }
    const Tensor& src = it->second;
    DTRAIN_CHECK(src.defined(), InvalidArgument, "load_state_dict: '{}' is undefined", name);
    if (src.shape() != t.shape()) {
      shape_errors.push_back(fmt::format("'{}' has shape {} in the checkpoint but {} in the model",
                                         name, shape_str(src.shape()), shape_str(t.shape())));
    } else if (src.dtype() != t.dtype()) {
      dtype_errors.push_back(fmt::format("'{}' has dtype {} in the checkpoint but {} in the model",
                                         name, dtype_name(src.dtype()), dtype_name(t.dtype())));
    }
  }
  for (const auto& [name, t] : dict) {
    if (!own_names.count(name)) report.unexpected_keys.push_back(name);
  }
  DTRAIN_CHECK(shape_errors.empty(), ShapeError, "load_state_dict: {}",
               fmt::join(shape_errors, "; "));
  DTRAIN_CHECK(dtype_errors.empty(), DTypeError, "load_state_dict: {}",
               fmt::join(dtype_errors, "; "));
  if (strict && (!report.missing_keys.empty() || !report.unexpected_keys.empty())) {
    std::string msg = "load_state_dict into " + describe() + ":";
    if (!report.missing_keys.empty()) {
      msg += fmt::format(" missing key(s) {} (in the model, not in the checkpoint)",
                         quoted_list(report.missing_keys));
    }
    if (!report.unexpected_keys.empty()) {
      msg +=
          fmt::format("{} unexpected key(s) {} (in the checkpoint, not in the model)",
                      report.missing_keys.empty() ? "" : ";", quoted_list(report.unexpected_keys));
    }
    DTRAIN_THROW(InvalidArgument, "{}", msg);
  }
  return report;
}

LoadReport Module::load_state_dict(const StateDict& dict, bool strict) {
  LoadReport report = check_state_dict(dict, strict);
  NoGradGuard no_grad;
  auto load = [&](const NamedTensors& list) {
    for (const auto& [name, t] : list) {
      auto it = dict.find(name);
      if (it == dict.end()) continue;
      const Tensor& src = it->second;
      bool same =
          src.impl()->storage == t.impl()->storage && src.impl()->offset == t.impl()->offset;
      if (!same) Tensor(t).copy_(src);
    }
  };
  load(named_parameters());
  load(named_buffers());
  return report;
}

}  // namespace dtrain::nn
