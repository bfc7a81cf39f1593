// `dtrain train --model gpt` (see gpt_train.h): TextSource, MeshPlan, the run.
#include "gpt_train.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/data/text.h"
#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/parallel/clip.h"
#include "dtrain/parallel/ddp.h"
#include "dtrain/parallel/mesh.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "dtrain/parallel/zero.h"
#include "train_callbacks.h"
#include "trainer.h"

namespace dtrain::cli {

namespace {

namespace fs = std::filesystem;

// The corpus, prepared under the data cache (deterministic, so every rank may do it).
data::PreparedText prepare_corpus(const TrainConfig& c) {
  const fs::path dir = fs::path(c.data_cache) / "fortunes";
  fs::create_directories(dir);
  const std::string text = c.data.empty() ? data::write_fortunes_corpus((dir / "corpus.txt").string())
                                          : c.data;
  return data::prepare_text_corpus(text, dir.string());
}

// A Sampler-shaped position for checkpoints (GPT checkpoints are not written yet).
data::DistributedSampler no_position() { return data::DistributedSampler(1, 0, 1, 0, false); }

class TextSource final : public BatchSource {
 public:
  TextSource(const data::PreparedText& p, const TrainConfig& c, parallel::ProcessMesh& mesh)
      : train_(data::TokenDataset::from_file(p.train_path, c.context)),
        val_(data::TokenDataset::from_file(p.val_path, c.context)),
        batch_(c.batch),
        steps_(c.max_steps),
        gen_(c.seed),
        mesh_(mesh) {
    baseline_ = data::unigram_baseline(train_.tokens(), val_.tokens(), p.vocab_size);
  }
  int64_t steps_per_epoch() const override { return steps_; }
  void begin_epoch(int64_t /*epoch*/) override { done_ = 0; }
  bool next(TrainBatch& b) override {
    if (done_ == steps_) return false;
    ++done_;
    data::TokenBatch t = train_.sample_batch(batch_, gen_, slice());
    b.tensors = {t.x, t.y};
    b.samples = batch_ * train_.block_size();  // tokens: samples/s reads as tokens/s
    return true;
  }
  bool epoch_done() const override { return done_ == steps_; }
  data::DistributedSampler position() const override { return no_position(); }
  void load_position(const data::SamplerState& /*state*/) override {}
  Metrics evaluate(nn::Module& model) override;
  const data::UnigramBaseline& baseline() const { return baseline_; }

 private:
  data::DpSlice slice() const { return {mesh_.coord().dp, mesh_.shape().dp}; }

  data::TokenDataset train_, val_;
  int64_t batch_, steps_, done_ = 0;
  Generator gen_;
  parallel::ProcessMesh& mesh_;
  data::UnigramBaseline baseline_{};
};

Metrics TextSource::evaluate(nn::Module& model) {
  auto& gpt = dynamic_cast<nn::Gpt&>(model);
  NoGradGuard no_grad;
  const int64_t batches = val_.num_eval_batches(batch_, 20);
  double total = 0;
  for (int64_t i = 0; i < batches; ++i) {
    data::TokenBatch t = val_.eval_batch(i, batch_, slice());
    total += gpt.loss(t.x, t.y).item();
  }
  double mean = batches > 0 ? total / static_cast<double>(batches) : 0.0;
  mesh_.dp().allreduce(&mean, 1, DType::f64, comm::ReduceOp::kAvg);
  return {{"val_loss", mean},
          {"val_ppl", std::exp(mean)},
          {"unigram_loss", baseline_.nats_per_token},
          {"unigram_ppl", baseline_.perplexity}};
}

// The schedule's clock: the Trainer's LR scheduler sets its rate; it updates nothing.
class LrClock final : public optim::Optimizer {
 public:
  explicit LrClock(double lr) : Optimizer("AdamW", {zeros({1}).set_requires_grad(true)}, lr) {}
  void step() override {}
};

std::vector<double> decay_of(const std::vector<Tensor>& params, double wd) {
  return parallel::decay_matrices_only(params, wd);
}

class MeshPlan final : public ParallelPlan {
 public:
  MeshPlan(parallel::ProcessMesh& mesh, const TrainConfig& c) : mesh_(mesh), config_(c) {}

  void prepare(std::shared_ptr<nn::Module> model) override {
    gpt_ = std::dynamic_pointer_cast<nn::Gpt>(model);
    std::vector<Tensor> params = gpt_->parameters();
    optim::AdamWOptions o = optim::AdamWOptions(config_.lr).betas(0.9, 0.95);
    if (config_.zero > 0) {
      zero_ = std::make_unique<parallel::ZeroOptimizer>(
          params, decay_of(params, config_.weight_decay), mesh_.dp(), o,
          parallel::ZeroOptions{.stage = config_.zero});
      return;
    }
    ddp_ = std::make_unique<parallel::DistributedDataParallel>(gpt_, mesh_.dp());
    decay_ = std::make_unique<optim::AdamW>(gpt_->decay_parameters(),
                                            o.weight_decay(config_.weight_decay));
    no_decay_ = std::make_unique<optim::AdamW>(gpt_->no_decay_parameters(), o.weight_decay(0));
  }

  double forward_backward(const TrainBatch& b, const StepFn& step) override {
    if (zero_) zero_->zero_grad();
    else gpt_->zero_grad();
    StepLoss loss = step(*gpt_, b);
    loss.loss.backward();
    return loss.value;
  }

  void sync_gradients() override {
    if (ddp_) ddp_->finish_gradient_sync();
  }

  void optimizer_step(optim::Optimizer& clock) override;

  double reduce_loss(double local) override {
    mesh_.dp().allreduce(&local, 1, DType::f64, comm::ReduceOp::kAvg);
    return local;
  }
  void checkpoint_state(CheckpointState& s) const override {
    s.shard = mesh_.rank();
    s.num_shards = mesh_.world().size();
  }
  bool is_logging_rank() const override { return mesh_.rank() == 0; }
  int rank() const override { return mesh_.rank(); }

 private:
  // Global gradient norm: sharded tensors count on every tp rank, replicated ones on
  // tp rank 0 only; summed over tp (the dp replicas hold equal, averaged gradients).
  void clip_replicated_dp(double max_norm);

  parallel::ProcessMesh& mesh_;
  const TrainConfig& config_;
  std::shared_ptr<nn::Gpt> gpt_;
  std::unique_ptr<parallel::DistributedDataParallel> ddp_;
  std::unique_ptr<optim::AdamW> decay_, no_decay_;
  std::unique_ptr<parallel::ZeroOptimizer> zero_;
};

void MeshPlan::clip_replicated_dp(double max_norm) {
  std::vector<Tensor> grads;
  std::vector<bool> counted;
  for (const auto& [name, p] : gpt_->named_parameters()) {
    if (!p.grad().defined()) continue;
    grads.push_back(p.grad());
    counted.push_back(gpt_->shard_specs().at(name).parts > 1 || mesh_.coord().tp == 0);
  }
  parallel::clip_grad_norm_sharded(grads, max_norm, {&mesh_.tp()}, counted);
}

void MeshPlan::optimizer_step(optim::Optimizer& clock) {
  if (zero_) {
    DTRAIN_CHECK(config_.clip <= 0 || mesh_.shape().tp == 1, UnsupportedError,
                 "--clip with --zero needs tp=1 for now (the ZeRO norm reduces over dp only)");
    if (config_.clip > 0) zero_->clip_grad_norm(config_.clip);
    zero_->set_lr(clock.lr());
    zero_->step();
    return;
  }
  if (config_.clip > 0) clip_replicated_dp(config_.clip);
  decay_->set_lr(clock.lr());
  no_decay_->set_lr(clock.lr());
  decay_->step();
  no_decay_->step();
}

Tensor gpt_loss(nn::Module& model, const TrainBatch& b) {
  return dynamic_cast<nn::Gpt&>(model).loss(b.tensors[0], b.tensors[1]);
}

nn::GptConfig model_config(const TrainConfig& c, int64_t vocab, int tp) {
  nn::GptConfig g;
  const int64_t multiple = 64;  // one model for every mesh: tp = 1, 2, 4 ... 64 divide it
  (void)tp;
  g.vocab_size = (vocab + multiple - 1) / multiple * multiple;
  g.block_size = c.context;
  g.n_layer = c.gpt_layers;
  g.n_head = c.gpt_heads;
  g.n_embd = c.gpt_dim;
  g.seed = c.seed;
  return g;
}

parallel::MeshShape mesh_shape(const TrainConfig& c, int world) {
  parallel::MeshShape s = c.parallel.empty() ? parallel::MeshShape{world, 1, 1}
                                             : parallel::MeshShape::parse(c.parallel);
  s.check_world(world);
  DTRAIN_CHECK(s.pp == 1, UnsupportedError,
               "--parallel {}: pipeline stages for the GPT are not wired into dtrain train yet "
               "(use pp=1)", s.str());
  DTRAIN_CHECK(c.batch % s.dp == 0, InvalidArgument,
               "--batch {} cannot be split evenly over dp={}", c.batch, s.dp);
  return s;
}

// Gathers the tensor-parallel shards into the full model on every rank (for --save).
nn::StateDict full_state(nn::Gpt& gpt, comm::Communicator& tp) {
  nn::StateDict out;
  for (const auto& [name, t] : gpt.state_dict()) {
    const nn::ShardSpec& spec = gpt.shard_specs().at(name);
    if (spec.parts == 1) {
      out[name] = t.clone();
      continue;
    }
    Tensor stacked = parallel::gather_stacked(t, tp);  // [tp, ...shard]
    std::vector<Tensor> parts;
    for (int r = 0; r < spec.parts; ++r) parts.push_back(stacked.select(0, r));
    out[name] = cat(parts, spec.dim).contiguous();
  }
  return out;
}

// The tokenizer travels inside the checkpoint, so `dtrain generate` needs nothing else.
std::vector<int> tokenizer_bytes(const TrainConfig& c) {
  const auto tok = data::CharTokenizer::load((fs::path(c.data_cache) / "fortunes" / "vocab.json").string());
  return {tok.bytes().begin(), tok.bytes().end()};
}

void save_gpt(const TrainConfig& c, nn::Gpt& gpt, parallel::ProcessMesh& mesh, int64_t vocab) {
  nn::StateDict full = full_state(gpt, mesh.tp());
  if (mesh.rank() != 0) return;
  nn::Gpt single(gpt.config());
  single.load_state_dict(full);
  const nn::GptConfig& g = gpt.config();
  save_checkpoint(c.save, single, nullptr,
                  {{"model", "gpt"}, {"vocab_size", g.vocab_size}, {"tokens", vocab},
                   {"block_size", g.block_size}, {"n_layer", g.n_layer}, {"n_head", g.n_head},
                   {"n_embd", g.n_embd}, {"seed", g.seed},
                   {"tokenizer_bytes", tokenizer_bytes(c)}});
  fmt::print(stderr, "checkpoint: {}\n", c.save);
}

}  // namespace

TrainResult train_gpt_worker(const TrainConfig& config, WorkerSession& session) {
  const int world = session.size();
  parallel::ProcessMesh mesh(session.comm(), mesh_shape(config, world));
  const data::PreparedText corpus = prepare_corpus(config);
  TextSource data(corpus, config, mesh);
  auto tp = std::make_shared<parallel::TensorParallel>(mesh.tp());
  auto gpt = std::make_shared<nn::Gpt>(model_config(config, corpus.vocab_size, mesh.shape().tp), tp);
  LrClock clock(config.lr);
  TrainerOptions options{.epochs = 1, .max_steps = config.max_steps, .log_every = config.log_every};
  optim::CosineAnnealingLR schedule(
      clock, optim::CosineAnnealingOptions(config.max_steps).warmup_steps(config.warmup_steps)
                 .eta_min(config.lr / 10));
  MeshPlan plan(mesh, config);
  std::optional<ProgressCallback> progress;
  std::optional<MetricsCallback> metrics;
  std::vector<Callback*> callbacks;
  if (plan.is_logging_rank()) {
    fmt::print(stderr, "dtrain train: {} ({} parameters, {} on this rank) on fortunes ({} tokens), "
               "mesh {}, zero {}, batch {} x {} tokens, {} steps\n", gpt->config().str(),
               gpt->config().num_parameters(), gpt->num_parameters(), corpus.train_tokens,
               mesh.shape().str(), config.zero, config.batch, config.context, config.max_steps);
    if (config.progress) callbacks.push_back(&progress.emplace("gpt"));
    callbacks.push_back(&metrics.emplace(config.metrics, nlohmann::json{{"workers", world}}));
  }
  Trainer trainer({.model = gpt, .loss = gpt_loss, .optimizer = &clock, .scheduler = &schedule,
                   .data = &data, .plan = &plan, .callbacks = callbacks},
                  options);
  TrainStats stats = trainer.fit();
  if (!config.save.empty()) save_gpt(config, *gpt, mesh, corpus.vocab_size);
  TrainResult r{.steps = stats.steps, .final_loss = stats.final_loss,
                .samples_per_s = stats.samples_per_s, .seconds = stats.seconds,
                .world_size = world};
  if (plan.is_logging_rank()) {
    fmt::print("dtrain train: gpt on fortunes, mesh {}: {} steps in {:.1f} s ({:.0f} tokens/s, "
               "{:.2f} GFLOP/s model), final train loss {:.4f}, validation loss {:.4f} "
               "(perplexity {:.2f}) vs unigram baseline {:.4f} (perplexity {:.2f})\n",
               mesh.shape().str(), stats.steps, stats.seconds, stats.samples_per_s,
               stats.samples_per_s * gpt->config().flops_per_token() / 1e9, stats.final_loss,
               stats.eval.at("val_loss"), stats.eval.at("val_ppl"), stats.eval.at("unigram_loss"),
               stats.eval.at("unigram_ppl"));
  }
  return r;
}

}  // namespace dtrain::cli
