// nn::Gpt (see gpt.h): the blocks, split-independent initialisation, stage pieces.
#include "dtrain/engine/nn/gpt.h"

#include <fmt/format.h>

#include <cmath>

#include "dtrain/engine/ops.h"
#include "dtrain/engine/random.h"

namespace dtrain::nn {

// ---- config ----

std::string GptConfig::str() const {
  return fmt::format("GPT {} layers, {} heads, {} dims, vocab {}, context {}", n_layer, n_head,
                     n_embd, vocab_size, block_size);
}

void GptConfig::check(int tp) const {
  DTRAIN_CHECK(vocab_size > 0 && block_size > 0 && n_layer > 0 && n_head > 0 && n_embd > 0,
               InvalidArgument, "gpt: every size must be positive ({})", str());
  DTRAIN_CHECK(n_embd % n_head == 0, InvalidArgument,
               "gpt: {} heads do not divide the hidden size {}", n_head, n_embd);
  DTRAIN_CHECK(tp >= 1, InvalidArgument, "gpt: tensor-parallel size {} must be positive", tp);
  DTRAIN_CHECK(n_head % tp == 0, InvalidArgument, "gpt: tp={} does not divide the {} heads", tp,
               n_head);
  DTRAIN_CHECK(vocab_size % tp == 0, InvalidArgument,
               "gpt: tp={} does not divide the vocabulary of {} (pad it to a multiple of tp)", tp,
               vocab_size);
}

int64_t GptConfig::num_parameters() const {
  const int64_t c = n_embd;
  const int64_t block = 2 * 2 * c + (4 * c * c + 3 * c) + (8 * c * c + 5 * c);  // no key bias
  return vocab_size * c + block_size * c + n_layer * block + 2 * c;
}

double GptConfig::flops_per_token() const {
  return 6.0 * static_cast<double>(num_parameters()) +
         12.0 * static_cast<double>(n_layer * block_size * n_embd);
}

// ---- single-device seams ----

namespace {

class SingleDevice final : public GptParallel {
 public:
  int size() const override { return 1; }
  int rank() const override { return 0; }
  Tensor copy_to_region(const Tensor& x) override { return x; }
  Tensor reduce_from_region(const Tensor& x) override { return x; }
  Tensor embedding(const Tensor& w, const Tensor& idx) override {
    return dtrain::embedding(w, idx);
  }
  Tensor cross_entropy(const Tensor& logits, const Tensor& target) override {
    return dtrain::cross_entropy(logits, target);
  }
};

// FNV-1a of the name, so each parameter's stream is fixed by its global name alone.
uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ULL;
  return h;
}

// A module that only holds parameters (the embeddings).
class ParamHolder final : public Module {
 public:
  ParamHolder() : Module("Embedding") {}
  Tensor forward(const Tensor&) override {
    throw UnsupportedError("gpt: an embedding holder has no forward");
  }
};

}  // namespace

std::shared_ptr<GptParallel> single_device_parallel() { return std::make_shared<SingleDevice>(); }

// ---- blocks ----

class GptBlock final : public Module {
 public:
  GptBlock(Gpt& gpt, int64_t index) : Module("GptBlock"), gpt_(gpt) {
    const GptConfig& c = gpt.config();
    const std::string p = fmt::format("h.{}.", index);
    const int64_t C = c.n_embd;
    const double std = 0.02, resid = 0.02 / std::sqrt(2.0 * static_cast<double>(c.n_layer));
    ln_1_ = register_module("ln_1", std::make_shared<LayerNorm>(C));
    ln_2_ = register_module("ln_2", std::make_shared<LayerNorm>(C));
    auto attn = register_module("attn", std::make_shared<ParamHolder>());
    auto mlp = register_module("mlp", std::make_shared<ParamHolder>());
    for (const char* n : {"q", "k", "v"}) {
      qkv_w_.push_back(gpt.add_param(*attn, fmt::format("{}_weight", n),
                                     p + fmt::format("attn.{}_weight", n), {C, C}, 0, std));
      // No key bias: softmax is invariant to it (q.b_k shifts a whole row), so its
      // gradient is rounding noise, which Adam would turn into full-size steps.
      qkv_b_.push_back(std::string(n) == "k" ? Tensor()
                                             : gpt.add_param(*attn, fmt::format("{}_bias", n),
                                                             p + fmt::format("attn.{}_bias", n),
                                                             {C}, 0, 0.0));
    }
    proj_w_ = gpt.add_param(*attn, "proj_weight", p + "attn.proj_weight", {C, C}, 1, resid);
    proj_b_ = gpt.add_param(*attn, "proj_bias", p + "attn.proj_bias", {C}, -1, 0.0);
    fc_w_ = gpt.add_param(*mlp, "fc_weight", p + "mlp.fc_weight", {4 * C, C}, 0, std);
    fc_b_ = gpt.add_param(*mlp, "fc_bias", p + "mlp.fc_bias", {4 * C}, 0, 0.0);
    mlp_w_ = gpt.add_param(*mlp, "proj_weight", p + "mlp.proj_weight", {C, 4 * C}, 1, resid);
    mlp_b_ = gpt.add_param(*mlp, "proj_bias", p + "mlp.proj_bias", {C}, -1, 0.0);
  }

  Tensor forward(const Tensor& x) override {
    Tensor h = x + attention(ln_1_->forward(x));
    return h + mlp(ln_2_->forward(h));
  }

 private:
  // x [B,T,C] -> [B,T,C]; this rank computes n_head/tp heads.
  Tensor attention(const Tensor& x) {
    GptParallel& par = gpt_.parallel();
    const int64_t B = x.size(0), T = x.size(1);
    const int64_t heads = gpt_.config().n_head / par.size();
    const int64_t hd = gpt_.config().n_embd / gpt_.config().n_head;
    Tensor in = par.copy_to_region(x);
    std::vector<Tensor> qkv;
    for (size_t i = 0; i < 3; ++i) {
      qkv.push_back(linear(in, qkv_w_[i], qkv_b_[i]).reshape({B, T, heads, hd}).transpose(1, 2));
    }
    Tensor y = scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], /*causal=*/true);
    y = y.transpose(1, 2).contiguous().reshape({B, T, heads * hd});
    return par.reduce_from_region(linear(y, proj_w_, Tensor())) + proj_b_;
  }

  Tensor mlp(const Tensor& x) {
    GptParallel& par = gpt_.parallel();
    Tensor h = gelu(linear(par.copy_to_region(x), fc_w_, fc_b_));
    return par.reduce_from_region(linear(h, mlp_w_, Tensor())) + mlp_b_;
  }

  Gpt& gpt_;
  std::shared_ptr<LayerNorm> ln_1_, ln_2_;
  std::vector<Tensor> qkv_w_, qkv_b_;
  Tensor proj_w_, proj_b_, fc_w_, fc_b_, mlp_w_, mlp_b_;
};

// ---- the model ----

Gpt::Gpt(const GptConfig& config, std::shared_ptr<GptParallel> parallel, GptStage stage)
    : Module("GPT"),
      config_(config),
      parallel_(parallel ? std::move(parallel) : single_device_parallel()),
      stage_(stage) {
  config_.check(parallel_->size());
  if (stage_.end_block < 0) stage_.end_block = config_.n_layer;
  DTRAIN_CHECK(stage_.first_block >= 0 && stage_.first_block <= stage_.end_block &&
                   stage_.end_block <= config_.n_layer,
               InvalidArgument, "gpt: stage blocks [{}, {}) outside the model's {} blocks",
               stage_.first_block, stage_.end_block, config_.n_layer);
  const int64_t C = config_.n_embd;
  if (stage_.embedding || stage_.head) {
    auto wte = register_module("wte", std::make_shared<ParamHolder>());
    wte_ = add_param(*wte, "weight", "wte.weight", {config_.vocab_size, C}, 0, 0.02);
  }
  if (stage_.embedding) {
    auto wpe = register_module("wpe", std::make_shared<ParamHolder>());
    wpe_ = add_param(*wpe, "weight", "wpe.weight", {config_.block_size, C}, -1, 0.02);
  }
  auto h = register_module("h", std::make_shared<ParamHolder>());
  for (int64_t i = stage_.first_block; i < stage_.end_block; ++i) {
    blocks_.push_back(h->register_module(std::to_string(i), std::make_shared<GptBlock>(*this, i)));
  }
  if (stage_.head) ln_f_ = register_module("ln_f", std::make_shared<LayerNorm>(C));
  // LayerNorm parameters are replicated over tp; record them for checkpoints.
  for (const auto& [name, t] : named_parameters()) {
    if (specs_.count(name) == 0) specs_[name] = ShardSpec{t.shape(), -1, 0, 1};
  }
}

Tensor Gpt::add_param(Module& owner, const std::string& local, const std::string& global,
                      const Shape& full, int dim, double std, double fill) {
  Tensor t = empty(full);
  t.fill_(fill);
  if (std != 0.0) {
    Generator gen(config_.seed ^ name_hash(global));
    float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(std * gen.normal());
  }
  const int parts = dim < 0 ? 1 : parallel_->size();
  if (parts > 1) {
    const int64_t n = full[static_cast<size_t>(dim)] / parts;
    t = t.narrow(dim, parallel_->rank() * n, n).contiguous().clone();
  }
  specs_[global] = ShardSpec{full, parts > 1 ? dim : -1, parts > 1 ? parallel_->rank() : 0, parts};
  return owner.register_parameter(local, t);
}

void Gpt::check_input(const Tensor& idx, const char* what) const {
  DTRAIN_CHECK(idx.defined() && idx.dtype() == DType::i64 && idx.dim() == 2, ShapeError,
               "{}: {} expects i64 token ids [B,T], got {}", describe(), what,
               idx.defined() ? shape_str(idx.shape()) : std::string("undefined"));
  DTRAIN_CHECK(idx.size(1) <= config_.block_size, ShapeError,
               "{}: {} got {} tokens per row, the context is {}", describe(), what, idx.size(1),
               config_.block_size);
}

Tensor Gpt::embed(const Tensor& idx) {
  DTRAIN_CHECK(stage_.embedding, InvalidArgument, "{}: this stage has no embedding", describe());
  check_input(idx, "embed");
  Tensor tok = parallel_->embedding(wte_, idx);
  return tok + wpe_.narrow(0, 0, idx.size(1));
}

Tensor Gpt::run_blocks(const Tensor& x) {
  Tensor h = x;
  for (auto& b : blocks_) h = b->forward(h);
  return h;
}

Tensor Gpt::head_logits(const Tensor& x) {
  DTRAIN_CHECK(stage_.head, InvalidArgument, "{}: this stage has no head", describe());
  return linear(parallel_->copy_to_region(ln_f_->forward(x)), wte_, Tensor());
}

Tensor Gpt::head_loss(const Tensor& x, const Tensor& targets) {
  Tensor logits = head_logits(x);
  const int64_t n = logits.size(0) * logits.size(1);
  return parallel_->cross_entropy(logits.reshape({n, logits.size(2)}), targets.reshape({n}));
}

Tensor Gpt::forward(const Tensor& idx) { return head_logits(run_blocks(embed(idx))); }

Tensor Gpt::loss(const Tensor& idx, const Tensor& targets) {
  return head_loss(run_blocks(embed(idx)), targets);
}

std::vector<std::shared_ptr<Module>> Gpt::block_modules() const {
  return {blocks_.begin(), blocks_.end()};
}

std::vector<Tensor> Gpt::decay_parameters() const {
  std::vector<Tensor> out;
  for (const Tensor& p : parameters()) {
    if (p.dim() >= 2) out.push_back(p);
  }
  return out;
}

std::vector<Tensor> Gpt::no_decay_parameters() const {
  std::vector<Tensor> out;
  for (const Tensor& p : parameters()) {
    if (p.dim() < 2) out.push_back(p);
  }
  return out;
}

}  // namespace dtrain::nn
