// GptOnMesh's state (see gpt_mesh.h): parameters and AdamW moments by global name,
// gathered from and scattered into whichever optimizers the mesh uses.
#include "dtrain/parallel/gpt_mesh.h"

#include <fmt/format.h>

#include <algorithm>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/parallel/zero.h"

namespace dtrain::parallel {

nn::StateDict GptOnMesh::parameter_state() const {
  nn::StateDict out;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!fsdp_ || names_[i].rfind("h.", 0) != 0) out[names_[i]] = params_[i].clone();
  }
  if (fsdp_) {
    const std::vector<Tensor> full = fsdp_->gather_full_parameters();
    const std::vector<std::string>& names = parts_.back().names;  // fsdp_ is the last part
    for (size_t i = 0; i < full.size(); ++i) out[names[i]] = full[i];
  }
  return out;
}

std::vector<GptOnMesh::NamedOptimizer> GptOnMesh::named_optimizers() const {
  std::vector<NamedOptimizer> out;
  for (const ShardedPart& p : parts_) {
    ShardedAdamW* opt = p.opt.get();
    out.push_back({p.names, [opt] { return opt->gather_full_state(); },
                   [opt](const optim::StateDict& d) { opt->load_full_state(d); }});
  }
  for (optim::AdamW* opt : {decay_.get(), no_decay_.get()}) {
    if (opt == nullptr) continue;
    std::vector<std::string> names;
    for (const Tensor& p : opt->params()) {
      for (size_t i = 0; i < params_.size(); ++i) {
        if (params_[i].impl() == p.impl()) names.push_back(names_[i]);
      }
    }
    out.push_back({names, [opt] { return opt->state_dict(); },
                   [opt](const optim::StateDict& d) { opt->load_state_dict(d); }});
  }
  return out;
}

nn::StateDict GptOnMesh::train_state() const {
  nn::StateDict out = parameter_state();
  int64_t step = 0;
  for (const NamedOptimizer& o : named_optimizers()) {
    const optim::StateDict d = o.save();
    for (size_t i = 0; i < o.names.size(); ++i) {
      for (const char* slot : {"exp_avg", "exp_avg_sq"}) {
        auto it = d.find(fmt::format("state.{}.{}", i, slot));
        out[o.names[i] + "/" + slot] =
            it != d.end() ? it->second : zeros(out.at(o.names[i]).shape());
      }
      auto st = d.find(fmt::format("state.{}.step", i));
      if (st != d.end()) step = std::max(step, static_cast<int64_t>(st->second.item()));
    }
  }
  out["step"] = from_vector<int64_t>({step}, {});
  return out;
}

void GptOnMesh::check_train_state(const nn::StateDict& state) const {
  const nn::StateDict like = parameter_state();
  for (const auto& [name, t] : like) {
    for (const std::string& key : {name, name + "/exp_avg", name + "/exp_avg_sq"}) {
      auto it = state.find(key);
      DTRAIN_CHECK(it != state.end(), DataFormatError, "gpt state: '{}' is missing", key);
      DTRAIN_CHECK(it->second.shape() == t.shape() && it->second.dtype() == DType::f32, ShapeError,
                   "gpt state: '{}' is {} {}, this rank's slice is f32 {}", key,
                   dtype_name(it->second.dtype()), shape_str(it->second.shape()),
                   shape_str(t.shape()));
    }
  }
  DTRAIN_CHECK(state.count("step") == 1 && state.at("step").numel() == 1, DataFormatError,
               "gpt state: 'step' is missing");
}

void GptOnMesh::load_train_state(const nn::StateDict& state) {
  check_train_state(state);
  NoGradGuard no_grad;
  std::vector<Tensor> blocks;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (fsdp_ && names_[i].rfind("h.", 0) == 0) continue;
    params_[i].copy_(state.at(names_[i]));
  }
  if (fsdp_) {
    for (const std::string& name : parts_.back().names) blocks.push_back(state.at(name));
    fsdp_->load_full_parameters(blocks);
  }
  const int64_t step = static_cast<int64_t>(state.at("step").item());
  for (const NamedOptimizer& o : named_optimizers()) {
    optim::StateDict d;
    d["lr"] = from_vector<double>({options_.lr}, {});
    d["num_params"] = from_vector<int64_t>({static_cast<int64_t>(o.names.size())}, {});
    for (size_t i = 0; step > 0 && i < o.names.size(); ++i) {
      d[fmt::format("state.{}.step", i)] = from_vector<int64_t>({step}, {});
      for (const char* slot : {"exp_avg", "exp_avg_sq"}) {
        d[fmt::format("state.{}.{}", i, slot)] = state.at(o.names[i] + "/" + slot).clone();
      }
    }
    o.load(d);
  }
}

}  // namespace dtrain::parallel
