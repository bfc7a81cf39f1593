#include "dtrain/engine/autograd.h"

#include <unordered_map>
#include <unordered_set>

#include "dtrain/engine/ops.h"

namespace dtrain {

namespace {
thread_local bool g_grad_enabled = true;  // per-thread mode flag, like torch's GradMode

std::shared_ptr<Node> grad_accumulator(const Tensor& leaf) {
  TensorImpl* impl = leaf.impl();
  if (!impl->grad_accumulator) {
    impl->grad_accumulator = std::make_shared<AccumulateGrad>(leaf.impl_ptr());
  }
  return impl->grad_accumulator;
}

Edge edge_of(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return {};
  if (t.grad_fn()) return {t.grad_fn(), t.output_nr()};
  return {grad_accumulator(t), 0};
}

void accumulate(Tensor& slot, const Tensor& g) {
  if (!g.defined()) return;
  if (!slot.defined()) {
    slot = g;
  } else {
    slot = add(slot, g);
  }
}
}  // namespace

bool GradMode::is_enabled() { return g_grad_enabled; }
void GradMode::set_enabled(bool enabled) { g_grad_enabled = enabled; }

void Node::set_inputs(const std::vector<Tensor>& inputs) {
  next_edges_.clear();
  input_meta_.clear();
  for (const Tensor& t : inputs) {
    next_edges_.push_back(edge_of(t));
    if (t.defined()) {
      input_meta_.push_back({t.shape(), t.dtype()});
    } else {
      input_meta_.push_back({{}, DType::f32});
    }
  }
}

std::vector<Tensor> AccumulateGrad::apply(std::vector<Tensor> grads) {
  auto leaf = leaf_.lock();
  if (!leaf || !grads[0].defined()) return {};
  if (!leaf->grad) {
    // Take the incoming buffer when nobody else can see it; otherwise copy, so that
    // in-place updates of grad() never write into a tensor that is shared.
    const Tensor& g = grads[0];
    bool sole_owner = g.impl_ptr().use_count() == 1 && g.impl()->storage.use_count() == 1 &&
                      g.is_contiguous() && g.impl()->offset == 0;
    leaf->grad = sole_owner ? g.impl_ptr() : g.clone().impl_ptr();
    leaf->grad->grad_fn.reset();
    leaf->grad->requires_grad = false;
  } else {
    Tensor acc(leaf->grad);
    NoGradGuard ng;
    Tensor sum = add(acc, grads[0]);
    acc.copy_(sum);
  }
  if (!leaf->post_accumulate_grad_hooks.empty()) {
    Tensor param(leaf);
    for (const auto& hook : leaf->post_accumulate_grad_hooks) hook(param);
  }
  return {};
}

bool any_requires_grad(const std::vector<Tensor>& inputs) {
  if (!GradMode::is_enabled()) return false;
  for (const Tensor& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

std::vector<Tensor> record(const std::shared_ptr<Node>& node, const std::vector<Tensor>& inputs,
                           std::vector<Tensor> outputs) {
  if (!any_requires_grad(inputs)) return outputs;
  node->set_inputs(inputs);
  node->set_num_outputs(static_cast<uint32_t>(outputs.size()));
  for (size_t i = 0; i < outputs.size(); ++i) {
    TensorImpl* impl = outputs[i].impl();
    impl->requires_grad = true;
    impl->grad_fn = node;
    impl->output_nr = static_cast<uint32_t>(i);
  }
  return outputs;
}

Tensor record(const std::shared_ptr<Node>& node, const std::vector<Tensor>& inputs, Tensor output) {
  return record(node, inputs, std::vector<Tensor>{std::move(output)})[0];
}

std::vector<Tensor> make_function(std::string name, const std::vector<Tensor>& inputs,
                                  std::vector<Tensor> outputs, BackwardFn backward) {
  if (!any_requires_grad(inputs)) return outputs;
  // Outputs must be fresh handles so that giving them a grad_fn does not touch a
  // tensor the caller still holds (for example an input passed through unchanged).
  for (Tensor& o : outputs) {
    o = make_view(o, o.shape(), o.strides(), o.impl()->offset);
  }
  auto node = std::make_shared<LambdaNode>(std::move(name), std::move(backward));
  return record(node, inputs, std::move(outputs));
}

void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads) {
  DTRAIN_CHECK(roots.size() == grads.size(), InvalidArgument,
               "backward: {} outputs but {} gradients", roots.size(), grads.size());
  // 1. Discover the graph and count, for each node, how many edges point at it.
  std::unordered_map<Node*, int> deps;
  std::unordered_map<Node*, std::shared_ptr<Node>> keep;
  std::vector<Node*> stack;
  for (const Tensor& r : roots) {
    Edge e = edge_of(r);
    DTRAIN_CHECK(e.node != nullptr, InvalidArgument,
                 "backward: the output {} does not require grad (no parameter or input that "
                 "requires grad reached it)",
                 shape_str(r.shape()));
    if (keep.emplace(e.node.get(), e.node).second) stack.push_back(e.node.get());
  }
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (const Edge& e : n->next_edges()) {
      if (!e.node) continue;
      ++deps[e.node.get()];
      if (keep.emplace(e.node.get(), e.node).second) stack.push_back(e.node.get());
    }
  }
  // 2. Seed the roots' gradient buffers, then run nodes whose dependencies are done.
  std::unordered_map<Node*, std::vector<Tensor>> buffers;
  for (size_t i = 0; i < roots.size(); ++i) {
    Edge e = edge_of(roots[i]);
    DTRAIN_CHECK(grads[i].shape() == roots[i].shape(), ShapeError,
                 "backward: gradient {} does not match output {}", shape_str(grads[i].shape()),
                 shape_str(roots[i].shape()));
    auto& buf = buffers[e.node.get()];
    buf.resize(e.node->num_outputs());
    accumulate(buf[e.input_nr], grads[i]);
  }
  std::vector<Node*> ready;
  for (auto& [ptr, node] : keep) {
    if (deps[ptr] == 0) ready.push_back(ptr);
  }
  NoGradGuard no_grad;  // backward computations are not themselves recorded
  while (!ready.empty()) {
    Node* n = ready.back();
    ready.pop_back();
    std::vector<Tensor> in = std::move(buffers[n]);
    buffers.erase(n);
    in.resize(n->num_outputs());
    std::vector<Tensor> out = n->apply(std::move(in));
    const auto& edges = n->next_edges();
    DTRAIN_CHECK(out.size() == edges.size() || edges.empty(), InternalError,
                 "{} returned {} gradients for {} inputs", n->name(), out.size(), edges.size());
    for (size_t i = 0; i < edges.size(); ++i) {
      const Edge& e = edges[i];
      if (!e.node) continue;
      if (out[i].defined()) {
        const auto& meta = n->input_meta()[i];
        DTRAIN_CHECK(out[i].shape() == meta.shape, ShapeError,
                     "{} backward: gradient {} for input {} has shape {}, expected {}", n->name(),
                     i, i, shape_str(out[i].shape()), shape_str(meta.shape));
        auto& buf = buffers[e.node.get()];
        buf.resize(e.node->num_outputs());
        accumulate(buf[e.input_nr], out[i]);
      }
      if (--deps[e.node.get()] == 0) ready.push_back(e.node.get());
    }
    keep.erase(n);  // release saved tensors as soon as the node has run
  }
}

std::vector<Tensor> grad(const std::vector<Tensor>& outputs, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& grad_outputs) {
  std::vector<std::shared_ptr<TensorImpl>> saved;
  for (const Tensor& t : inputs) {
    DTRAIN_CHECK(t.is_leaf() && t.requires_grad(), InvalidArgument,
                 "grad(): inputs must be leaves that require grad");
    saved.push_back(t.impl()->grad);
    t.impl()->grad.reset();
  }
  run_backward(outputs, grad_outputs);
  std::vector<Tensor> result;
  for (size_t i = 0; i < inputs.size(); ++i) {
    Tensor g(inputs[i].impl()->grad);
    result.push_back(g.defined() ? g : zeros_like(inputs[i]));
    inputs[i].impl()->grad = saved[i];
  }
  return result;
}

}  // namespace dtrain
