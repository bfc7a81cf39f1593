// GptOnMesh (see gpt_mesh.h): stage layout, the pipelined or plain step, gradient
// sync over the embedding and dp groups, clipping and the optimizers.
#include "dtrain/parallel/gpt_mesh.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <sstream>
#include <stdexcept>

#include "dtrain/common/error.h"
#include "dtrain/engine/amp.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/parallel/clip.h"
#include "dtrain/parallel/ddp.h"
#include "dtrain/parallel/schedule.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/parallel/zero.h"

namespace dtrain::parallel {

std::vector<int64_t> gpt_layer_params(const nn::GptConfig& c) {
  const int64_t C = c.n_embd, V = c.vocab_size;
  std::vector<int64_t> layers{V * C + c.block_size * C};
  for (int64_t i = 0; i < c.n_layer; ++i) layers.push_back(12 * C * C + 12 * C);
  layers.push_back(V * C + 2 * C);
  return layers;
}

nn::GptStage gpt_stage(const nn::GptConfig& c, const std::vector<int64_t>& starts, int stage) {
  const int64_t layers = c.n_layer + 2;
  const size_t s = static_cast<size_t>(stage);
  const int64_t begin = starts[s], end = s + 1 < starts.size() ? starts[s + 1] : layers;
  nn::GptStage st;
  st.embedding = begin == 0;
  st.head = end == layers;
  st.first_block = std::max<int64_t>(begin, 1) - 1;
  st.end_block = std::min<int64_t>(end, c.n_layer + 1) - 1;
  return st;
}

std::vector<int64_t> parse_stage_starts(const std::string& spec, const nn::GptConfig& c,
                                        int stages) {
  std::vector<int64_t> starts;
  std::stringstream in(spec);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      starts.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw InvalidArgument(
          fmt::format("--stage-split '{}': '{}' is not a layer index", spec, item));
    }
  }
  const int64_t layers = c.n_layer + 2;
  bool ok = static_cast<int>(starts.size()) == stages && !starts.empty() && starts[0] == 0;
  for (size_t i = 1; ok && i < starts.size(); ++i) ok = starts[i] > starts[i - 1];
  ok = ok && starts.back() < layers;
  DTRAIN_CHECK(ok, InvalidArgument,
               "--stage-split '{}': need {} increasing first-layer indices from 0, each stage "
               "non-empty, of the {} layers (embedding, {} blocks, head)",
               spec, stages, layers, c.n_layer);
  return starts;
}

namespace {

// One all-reduce (kAvg) of every gradient, packed into one buffer.
void allreduce_mean(const std::vector<Tensor>& params, comm::Communicator& c) {
  if (c.size() == 1) return;
  NoGradGuard no_grad;
  std::vector<Tensor> flat;
  for (const Tensor& p : params) {
    flat.push_back(p.grad().defined() ? p.grad().reshape({-1}) : zeros({p.numel()}));
  }
  Tensor buf = cat(flat, 0).contiguous();
  c.allreduce(buf.raw_data(), static_cast<size_t>(buf.numel()), DType::f32, comm::ReduceOp::kAvg);
  int64_t off = 0;
  for (const Tensor& p : params) {
    Tensor piece = buf.narrow(0, off, p.numel()).reshape(p.shape());
    if (p.grad().defined())
      p.grad().copy_(piece);
    else
      Tensor(p).set_grad(piece.clone());
    off += p.numel();
  }
}

std::vector<int64_t> choose_starts(const nn::GptConfig& c, const GptMeshOptions& o, int pp) {
  if (!o.stage_starts.empty()) {
    return parse_stage_starts(fmt::format("{}", fmt::join(o.stage_starts, ",")), c, pp);
  }
  return partition_layers(gpt_layer_params(c), pp);
}

}  // namespace

GptOnMesh::GptOnMesh(ProcessMesh& mesh, const nn::GptConfig& config, GptMeshOptions options)
    : mesh_(mesh), options_(std::move(options)) {
  const int pp = mesh.shape().pp;
  DTRAIN_CHECK(options_.zero >= 0 && options_.zero <= 3, InvalidArgument,
               "gpt mesh: --zero {} (0, 1, 2 or 3)", options_.zero);
  config.check(mesh.shape().tp);
  starts_ = choose_starts(config, options_, pp);
  gpt_ = std::make_shared<nn::Gpt>(config, std::make_shared<TensorParallel>(mesh.tp()),
                                   gpt_stage(config, starts_, mesh.coord().pp));
  for (const auto& [name, p] : gpt_->named_parameters()) {
    names_.push_back(name);
    params_.push_back(p);
  }
  if (options_.zero > 0) {
    make_sharded();
    return;
  }
  optim::AdamWOptions o = adam_options();
  if (pp == 1) ddp_ = std::make_unique<DistributedDataParallel>(gpt_, mesh.dp());
  // A stage may hold no bias or norm (the embedding alone): AdamW wants parameters.
  if (!gpt_->decay_parameters().empty()) {
    decay_ = std::make_unique<optim::AdamW>(gpt_->decay_parameters(),
                                            o.weight_decay(options_.weight_decay));
  }
  if (!gpt_->no_decay_parameters().empty()) {
    no_decay_ = std::make_unique<optim::AdamW>(gpt_->no_decay_parameters(), o.weight_decay(0));
  }
}

optim::AdamWOptions GptOnMesh::adam_options() const {
  return optim::AdamWOptions(options_.lr).betas(options_.beta1, options_.beta2);
}

// ZeRO-1/2: one ZeroOptimizer over the parameters. ZeRO-3: the blocks are
// FullyShardedDataParallel units (gathered per block in forward and backward); the
// embedding, its tied head copy and ln_f stay whole with ZeRO-1 state (the tie needs
// the tensor at both ends of the model, as torch FSDP keeps it in the root unit).
// ZeRO-2 with pp > 1: the tied embedding gets its own ZeRO-1 optimizer, because its
// gradient must be summed over the embedding group before it is reduce-scattered,
// and stage 2 reduce-scatters inside backward.
void GptOnMesh::make_sharded() {
  const int zero = options_.zero;
  std::vector<size_t> main, tied;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (zero == 3 && names_[i].rfind("h.", 0) == 0) continue;
    const bool tie = zero == 2 && mesh_.shape().pp > 1 && names_[i] == "wte.weight";
    (tie ? tied : main).push_back(i);
  }
  add_zero_part(main, zero == 3 ? 1 : zero);
  add_zero_part(tied, 1);
  const std::vector<std::shared_ptr<nn::Module>> blocks = gpt_->block_modules();
  if (zero < 3 || blocks.empty()) return;
  ShardedPart part;
  std::vector<Tensor> block_params;
  for (size_t k = 0; k < blocks.size(); ++k) {
    for (const auto& [local, p] : blocks[k]->named_parameters()) {
      block_params.push_back(p);
      part.names.push_back(
          fmt::format("h.{}.{}", gpt_->stage().first_block + static_cast<int64_t>(k), local));
    }
  }
  auto fsdp = std::make_shared<FullyShardedDataParallel>(
      blocks, decay_matrices_only(block_params, options_.weight_decay), mesh_.dp(), adam_options());
  fsdp_ = fsdp.get();
  part.opt = std::move(fsdp);
  parts_.push_back(std::move(part));
}

void GptOnMesh::add_zero_part(const std::vector<size_t>& which, int stage) {
  if (which.empty()) return;
  ShardedPart part;
  std::vector<Tensor> params;
  for (size_t i : which) {
    params.push_back(params_[i]);
    part.names.push_back(names_[i]);
  }
  part.opt =
      std::make_shared<ZeroOptimizer>(params, decay_matrices_only(params, options_.weight_decay),
                                      mesh_.dp(), adam_options(), ZeroOptions{.stage = stage});
  parts_.push_back(std::move(part));
}

GptOnMesh::~GptOnMesh() = default;

void GptOnMesh::zero_grad() {
  if (parts_.empty()) gpt_->zero_grad();
  for (ShardedPart& p : parts_) p.opt->zero_grad();
}

Tensor GptOnMesh::run_stage(const Tensor& in) {
  Tensor h = gpt_->stage().embedding ? gpt_->embed(in) : in;
  if (!fsdp_) return gpt_->run_blocks(h);
  for (size_t u = 0; u < fsdp_->num_units(); ++u) h = fsdp_->forward_unit(u, h);
  return h;
}

double GptOnMesh::forward_backward(const Tensor& x, const Tensor& y) {
  amp::AutocastGuard autocast(DType::bf16, options_.bf16);
  zero_grad();
  if (mesh_.shape().pp == 1) {
    Tensor loss = gpt_->head_loss(run_stage(x), y);
    loss.backward();
    return loss.item();
  }
  return pipelined(x, y);
}

double GptOnMesh::pipelined(const Tensor& x, const Tensor& y) {
  const int m = options_.microbatches;
  DTRAIN_CHECK(m >= 1 && x.size(0) % m == 0, InvalidArgument,
               "gpt mesh: {} rows per dp rank cannot be cut into {} micro-batches", x.size(0), m);
  const int64_t rows = x.size(0) / m;
  std::vector<Tensor> inputs, targets;
  for (int i = 0; i < m; ++i) {
    inputs.push_back(x.narrow(0, i * rows, rows).contiguous());
    targets.push_back(y.narrow(0, i * rows, rows).contiguous());
  }
  PipelineOptions po;
  po.schedule = options_.schedule;
  po.microbatches = m;
  po.activation_shape = {rows, x.size(1), gpt_->config().n_embd};
  StageForward forward = [&](const Tensor& in) { return run_stage(in); };
  StageLoss loss = [&](const Tensor& out, int i) {
    return gpt_->head_loss(out, targets[static_cast<size_t>(i)]);
  };
  stats_ = run_pipeline_step(mesh_.pp(), po, forward, loss, inputs);
  return stats_.loss;
}

void GptOnMesh::sync_gradients() {
  if (comm::Communicator* e = mesh_.embedding()) {  // the tied embedding's two copies
    Tensor g = gpt_->wte().grad();
    DTRAIN_CHECK(g.defined() && g.is_contiguous(), InternalError,
                 "gpt mesh: the embedding has no contiguous gradient to sum");
    e->allreduce(g.raw_data(), static_cast<size_t>(g.numel()), DType::f32, comm::ReduceOp::kSum);
  }
  if (!parts_.empty()) return;  // reduce-scattered inside backward, clip or step
  if (ddp_)
    ddp_->finish_gradient_sync();
  else
    allreduce_mean(params_, mesh_.dp());
}

// One flag per name: sliced over tp (every tp rank) or tp rank 0; the last stage's
// copy of the tied embedding never.
std::vector<bool> GptOnMesh::counted_in_norm(const std::vector<std::string>& names) const {
  std::vector<bool> counted;
  for (const std::string& name : names) {
    const bool copy = name == "wte.weight" && !gpt_->stage().embedding;
    counted.push_back(!copy && (gpt_->shard_specs().at(name).parts > 1 || mesh_.coord().tp == 0));
  }
  return counted;
}

double GptOnMesh::clip_gradients() {
  std::vector<Tensor> grads;
  std::vector<bool> flags;
  if (parts_.empty()) {
    for (const Tensor& p : params_) grads.push_back(p.grad());
    return clip_grad_norm_sharded(grads, options_.clip, {&mesh_.tp(), &mesh_.pp()},
                                  counted_in_norm(names_));
  }
  for (ShardedPart& p : parts_) p.opt->owned_gradients(counted_in_norm(p.names), &grads, &flags);
  return clip_grad_norm_sharded(grads, options_.clip, {&mesh_.dp(), &mesh_.tp(), &mesh_.pp()},
                                flags);
}

void GptOnMesh::optimizer_step(double lr) {
  if (options_.clip > 0) clip_gradients();
  for (ShardedPart& p : parts_) {
    p.opt->set_lr(lr);
    p.opt->step();
  }
  for (optim::AdamW* opt : {decay_.get(), no_decay_.get()}) {
    if (opt == nullptr) continue;
    opt->set_lr(lr);
    opt->step();
  }
}

double GptOnMesh::train_step(const Tensor& x, const Tensor& y, double lr) {
  double loss = forward_backward(x, y);
  sync_gradients();
  optimizer_step(lr);
  mesh_.dp().allreduce(&loss, 1, DType::f64, comm::ReduceOp::kAvg);
  return loss;
}

double GptOnMesh::eval_loss(const Tensor& x, const Tensor& y) {
  NoGradGuard no_grad;
  amp::AutocastGuard autocast(DType::bf16, options_.bf16);
  if (mesh_.shape().pp == 1) return gpt_->head_loss(run_stage(x), y).item();  // FSDP-aware
  PipelineOptions po;
  po.activation_shape = {x.size(0), x.size(1), gpt_->config().n_embd};
  return run_pipeline_forward(
      mesh_.pp(), po, [&](const Tensor& in) { return run_stage(in); },
      [&](const Tensor& out) { return gpt_->head_loss(out, y).item(); }, x);
}

int64_t GptOnMesh::optimizer_state_bytes() const {
  if (parts_.empty()) return 8 * gpt_->num_parameters();
  int64_t bytes = 0;
  for (const ShardedPart& p : parts_)
    bytes += static_cast<int64_t>(p.opt->memory().optimizer_state_bytes);
  return bytes;
}

int64_t GptOnMesh::parameter_elements() const {
  int64_t n = gpt_->num_parameters();  // ZeRO-3's released blocks count 0 here
  if (fsdp_) {
    for (const FlatLayout& l : fsdp_->layouts()) n += l.shard_numel();
  }
  return n;
}

}  // namespace dtrain::parallel
