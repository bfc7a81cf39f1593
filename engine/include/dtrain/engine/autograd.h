// Define-by-run reverse-mode autograd.
//
// Every differentiable op that sees an input requiring grad records a Node: the
// backward function of that op, holding only what its backward needs, plus one Edge
// per input pointing at the Node that produced that input (or at the input leaf's
// AccumulateGrad node). Tensor::backward() walks the graph from the output in
// reverse topological order, summing the gradients that flow into each Node before
// calling it once, and accumulates (+=) into the grad() of each leaf.
//
// Custom functions are first-class. Either subclass Node, or use make_function()
// with a backward lambda:
//
//   // identity forward, all-reduce backward (tensor parallelism's "f" operator)
//   Tensor copy_to_tp_region(const Tensor& x, Communicator& comm) {
//     return make_function("copy_to_tp_region", {x}, {x.detach()},
//         [&comm](const std::vector<Tensor>& g) {
//           Tensor dx = g[0].clone();
//           comm.allreduce(dx.raw_data(), dx.numel(), ...);
//           return std::vector<Tensor>{dx};
//         })[0];
//   }
//
// The backward lambda receives one gradient per output (an undefined Tensor when no
// gradient reached that output: treat it as zero) and returns one gradient per input
// (undefined for inputs with no gradient). Returned gradients must have the input's
// shape and dtype; the engine checks and names the function when they do not.
//
// GradMode: NoGradGuard disables recording on the current thread (evaluation,
// optimizer updates). Thread-safety: a graph is built and run by one thread.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/tensor.h"

namespace dtrain {

struct Edge {
  std::shared_ptr<Node> node;  // null: that input needs no gradient
  uint32_t input_nr = 0;       // which output of `node` the input was
};

class Node {
 public:
  virtual ~Node() = default;
  // grads: one per output of this node (may be undefined = zero).
  // Returns one gradient per input (next_edges().size()), undefined where none.
  virtual std::vector<Tensor> apply(std::vector<Tensor> grads) = 0;
  virtual std::string name() const = 0;

  const std::vector<Edge>& next_edges() const { return next_edges_; }
  uint32_t num_outputs() const { return num_outputs_; }
  // Shapes/dtypes of the inputs, to validate returned gradients.
  struct InputMeta {
    Shape shape;
    DType dtype;
  };
  const std::vector<InputMeta>& input_meta() const { return input_meta_; }

  // Wires this node to its inputs; called by record().
  void set_inputs(const std::vector<Tensor>& inputs);
  void set_num_outputs(uint32_t n) { num_outputs_ = n; }

 private:
  std::vector<Edge> next_edges_;
  std::vector<InputMeta> input_meta_;
  uint32_t num_outputs_ = 1;
};

// The sink for a leaf: adds the incoming gradient into the leaf's grad().
class AccumulateGrad final : public Node {
 public:
  explicit AccumulateGrad(std::weak_ptr<TensorImpl> leaf) : leaf_(std::move(leaf)) {}
  std::vector<Tensor> apply(std::vector<Tensor> grads) override;
  std::string name() const override { return "AccumulateGrad"; }

 private:
  std::weak_ptr<TensorImpl> leaf_;
};

class GradMode {
 public:
  static bool is_enabled();
  static void set_enabled(bool enabled);
};

class NoGradGuard {
 public:
  NoGradGuard() : prev_(GradMode::is_enabled()) { GradMode::set_enabled(false); }
  ~NoGradGuard() { GradMode::set_enabled(prev_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// True when grad mode is on and any input requires grad.
bool any_requires_grad(const std::vector<Tensor>& inputs);

// Attaches `node` as grad_fn of `outputs` (in order) when any input requires grad
// and grad mode is on; otherwise leaves the outputs plain. Returns the outputs.
std::vector<Tensor> record(const std::shared_ptr<Node>& node, const std::vector<Tensor>& inputs,
                           std::vector<Tensor> outputs);
Tensor record(const std::shared_ptr<Node>& node, const std::vector<Tensor>& inputs, Tensor output);

using BackwardFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& grad_outputs)>;

// A node whose backward is a lambda (see the file comment).
class LambdaNode final : public Node {
 public:
  LambdaNode(std::string name, BackwardFn fn) : name_(std::move(name)), fn_(std::move(fn)) {}
  std::vector<Tensor> apply(std::vector<Tensor> grads) override { return fn_(grads); }
  std::string name() const override { return name_; }

 private:
  std::string name_;
  BackwardFn fn_;
};

// Records a custom function: `outputs` were computed from `inputs` without autograd;
// `backward` maps output gradients to input gradients.
std::vector<Tensor> make_function(std::string name, const std::vector<Tensor>& inputs,
                                  std::vector<Tensor> outputs, BackwardFn backward);

// Runs backward from `roots` with the given seed gradients (same length).
void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads);

// Gradients of `outputs` w.r.t. `inputs`, returned instead of accumulated into
// grad() (used by gradient checks). Inputs that get no gradient yield zeros.
std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs);

}  // namespace dtrain
