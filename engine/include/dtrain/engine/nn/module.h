// nn::Module: the base of every layer and model.
//
// A Module owns named parameters (leaf tensors that require grad), buffers (state
// that is saved but not trained) and submodules, each in registration order. Names
// are hierarchical: a parameter "weight" of the child "0" of the child "features" is
// "features.0.weight" in named_parameters() and state_dict(), and the child knows its
// own path ("features.0") so that its error messages can name it ("Linear
// 'features.0' (576 -> 64): expected input [N,576], got [64,1024]").
//
// Conventions (libtorch names):
//   register_parameter / register_buffer / register_module, parameters(),
//   named_parameters(), train()/eval(), zero_grad() (gradients become undefined, like
//   set_to_none=True), set_requires_grad(false) to freeze a module for transfer
//   learning (its parameters get no gradient, so optimizers leave them untouched).
//   state_dict() returns detached tensors that share storage with the module;
//   load_state_dict() validates every key, shape and dtype before it copies anything.
//
// Modules are held by std::shared_ptr and are not copyable. A module registered in
// two parents keeps the path of the last registration. Thread-safety: a module is
// built and used by one thread at a time (several threads may run forward on a
// module in eval mode when its layers keep no mutable state, e.g. no Dropout).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dtrain/engine/tensor.h"

namespace dtrain::nn {

// name -> tensor, for checkpoints. Sorted by name.
using StateDict = std::map<std::string, Tensor>;
// name -> tensor in registration order.
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// What load_state_dict found besides the keys it loaded (only filled when strict is
// false; strict loading throws instead).
struct LoadReport {
  std::vector<std::string> missing_keys;     // in the model, not in the dict
  std::vector<std::string> unexpected_keys;  // in the dict, not in the model
};

class Module {
 public:
  // type_name: the layer kind for messages ("Linear", "Sequential", "seed-cnn").
  explicit Module(std::string type_name);
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // The computation. Layers check their input and throw ShapeError/DTypeError naming
  // themselves (describe()) and both shapes.
  virtual Tensor forward(const Tensor& x) = 0;
  Tensor operator()(const Tensor& x) { return forward(x); }

  // ---- identity, for messages ----
  const std::string& type_name() const { return type_name_; }
  // Dotted path inside the root model ("features.0"); "" for a root module.
  const std::string& name() const { return path_; }
  // "Linear 'features.0' (576 -> 64)"; the quoted path is left out for a root module.
  std::string describe() const;
  // The layer's configuration for describe(), e.g. "576 -> 64"; "" when none.
  virtual std::string extra_repr() const { return ""; }
  // A multi-line tree of the module and its children with parameter counts.
  std::string str() const;

  // ---- registration (names: non-empty, no '.', unique within this module) ----
  // Registers a parameter: a leaf (a tensor with autograd history is detached first)
  // that requires grad unless requires_grad is false. Returns the registered handle,
  // which aliases the module's (keep it as a member for direct access).
  Tensor register_parameter(const std::string& name, Tensor tensor, bool requires_grad = true);
  Tensor register_buffer(const std::string& name, Tensor tensor);
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    static_assert(std::is_base_of_v<Module, M>, "register_module needs an nn::Module");
    add_child(name, module);
    return module;
  }

  // ---- traversal (registration order; recurse = include submodules) ----
  std::vector<Tensor> parameters(bool recurse = true) const;
  NamedTensors named_parameters(bool recurse = true) const;
  std::vector<Tensor> buffers(bool recurse = true) const;
  NamedTensors named_buffers(bool recurse = true) const;
  // Direct children, in registration order.
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const {
    return children_;
  }
  std::vector<std::shared_ptr<Module>> children() const;
  // Total element count of the parameters.
  int64_t num_parameters() const;

  // ---- modes ----
  // Sets training mode on this module and every submodule.
  virtual void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }

  // Makes every parameter's grad undefined.
  void zero_grad();
  // Freezes (false) or unfreezes (true) every parameter, recursively. Freezing also
  // drops existing gradients, so an optimizer step cannot touch a frozen parameter.
  void set_requires_grad(bool requires_grad);

  // ---- device ----
  // Moves every parameter and buffer (and any gradient) of this module and its
  // submodules to `device` in place: each tensor keeps its identity -- the handles held
  // by layers, optimizers and hooks stay valid and parameters stay autograd leaves --
  // and only its storage changes. Tensors already on `device` are not touched (to(cpu)
  // of a CPU model is a no-op). Throws UnsupportedError when `device` does not exist.
  void to(const Device& device);

  // ---- checkpoints ----
  // Parameters and buffers by dotted name (detached, sharing storage).
  StateDict state_dict() const;
  // Validates `dict` against this module without changing anything: throws
  // ShapeError for a shape mismatch, DTypeError for a dtype mismatch, and (strict)
  // InvalidArgument listing the missing and unexpected keys.
  LoadReport check_state_dict(const StateDict& dict, bool strict = true) const;
  // check_state_dict, then copies the values in (no autograd recording).
  LoadReport load_state_dict(const StateDict& dict, bool strict = true);

 private:
  void add_child(const std::string& name, std::shared_ptr<Module> child);
  void check_new_name(const std::string& name, const char* what) const;
  void set_path(const std::string& path);
  std::string child_path(const std::string& child) const;
  void collect(NamedTensors& out, const std::string& prefix, bool params, bool recurse) const;
  void append_str(std::string& out, const std::string& label, int depth) const;

  std::string type_name_;
  std::string path_;
  bool training_ = true;
  NamedTensors params_;
  NamedTensors buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

}  // namespace dtrain::nn
