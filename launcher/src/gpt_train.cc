// `dtrain train --model gpt` (see gpt_train.h): TextSource, MeshPlan, the run.
#include "gpt_train.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/data/text.h"
#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/parallel/gpt_checkpoint.h"
#include "dtrain/parallel/gpt_mesh.h"
#include "dtrain/parallel/mesh.h"
#include "dtrain/parallel/schedule.h"
#include "dtrain/parallel/tensor_parallel.h"
#include "gpt_checkpoints.h"
#include "tensorboard.h"
#include "train_callbacks.h"
#include "trainer.h"

namespace dtrain::cli {

namespace {

namespace fs = std::filesystem;

// A Sampler-shaped position for the Trainer (the GPT's position is its step: each
// step's batch is drawn from a generator seeded by (seed, step), see TextSource).
data::DistributedSampler no_position() { return data::DistributedSampler(1, 0, 1, 0, false); }

class TextSource final : public BatchSource {
 public:
  TextSource(const data::PreparedText& p, const TrainConfig& c, parallel::ProcessMesh& mesh)
      : train_(data::TokenDataset::from_file(p.train_path, c.context)),
        val_(data::TokenDataset::from_file(p.val_path, c.context)),
        batch_(c.batch),
        steps_(c.max_steps),
        seed_(c.seed),
        mesh_(mesh) {
    baseline_ = data::unigram_baseline(train_.tokens(), val_.tokens(), p.vocab_size);
  }
  int64_t steps_per_epoch() const override { return steps_; }
  void begin_epoch(int64_t /*epoch*/) override {
    done_ = resume_;
    resume_ = 0;
  }
  // Step `step`'s batch comes next (a resumed run draws what the uninterrupted one would).
  void resume_at(int64_t step) { resume_ = step; }
  bool next(TrainBatch& b) override {
    if (done_ >= steps_) return false;
    Generator gen(seed_ ^ (0x9E3779B97F4A7C15ull * static_cast<uint64_t>(done_ + 1)));
    ++done_;
    data::TokenBatch t = train_.sample_batch(batch_, gen, slice());
    b.tensors = {t.x, t.y};
    b.samples = batch_ * train_.block_size();  // tokens: samples/s reads as tokens/s
    return true;
  }
  bool epoch_done() const override { return done_ >= steps_; }
  data::DistributedSampler position() const override { return no_position(); }
  void load_position(const data::SamplerState& /*state*/) override {}
  Metrics evaluate(nn::Module& model) override;
  const data::UnigramBaseline& baseline() const { return baseline_; }
  void set_runner(parallel::GptOnMesh* run) { run_ = run; }

 private:
  data::DpSlice slice() const { return {mesh_.coord().dp, mesh_.shape().dp}; }

  data::TokenDataset train_, val_;
  int64_t batch_, steps_, done_ = 0, resume_ = 0;
  uint64_t seed_;
  parallel::ProcessMesh& mesh_;
  parallel::GptOnMesh* run_ = nullptr;
  data::UnigramBaseline baseline_{};
};

Metrics TextSource::evaluate(nn::Module& /*model*/) {
  DTRAIN_CHECK(run_ != nullptr, InternalError, "gpt: evaluate before set_runner");
  const int64_t batches = val_.num_eval_batches(batch_, 20);
  double total = 0;
  for (int64_t i = 0; i < batches; ++i) {
    data::TokenBatch t = val_.eval_batch(i, batch_, slice());
    total += run_->eval_loss(t.x, t.y);
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

// The Trainer's view of a GptOnMesh (which owns the model, the optimizers and the
// splits). Also averages the pipeline's measured bubble over the steps.
class MeshPlan final : public ParallelPlan {
 public:
  MeshPlan(parallel::GptOnMesh& run) : run_(run), mesh_(run.mesh()) {}

  void prepare(std::shared_ptr<nn::Module> /*model*/) override {}
  double forward_backward(const TrainBatch& b, const StepFn& /*step*/) override {
    const double loss = run_.forward_backward(b.tensors[0], b.tensors[1]);
    if (mesh_.shape().pp > 1 && ++steps_ > 1) {  // the first step warms up
      bubble_ += run_.pipeline_stats().bubble_fraction;
      ideal_ = run_.pipeline_stats().ideal_bubble;
    }
    return loss;
  }
  void sync_gradients() override { run_.sync_gradients(); }
  void optimizer_step(optim::Optimizer& clock) override { run_.optimizer_step(clock.lr()); }
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
  // Collective over pp: the measured bubble averaged over the steps and the stages.
  double mean_bubble() {
    double b = steps_ > 1 ? bubble_ / static_cast<double>(steps_ - 1) : 0.0;
    mesh_.pp().allreduce(&b, 1, DType::f64, comm::ReduceOp::kAvg);
    return b;
  }
  double ideal_bubble() const { return ideal_; }

 private:
  parallel::GptOnMesh& run_;
  parallel::ProcessMesh& mesh_;
  int64_t steps_ = 0;
  double bubble_ = 0, ideal_ = 0;
};

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
  DTRAIN_CHECK(c.batch % s.dp == 0, InvalidArgument, "--batch {} cannot be split evenly over dp={}",
               c.batch, s.dp);
  return s;
}

// The tokenizer travels inside the checkpoint, so `dtrain generate` needs nothing else.
std::vector<int> tokenizer_bytes(const TrainConfig& c) {
  const auto tok =
      data::CharTokenizer::load((fs::path(c.data_cache) / "fortunes" / "vocab.json").string());
  return {tok.bytes().begin(), tok.bytes().end()};
}

// --save: the whole model in one file for `dtrain generate`, from any mesh: the
// ranks write their slices as a sharded checkpoint, rank 0 reads it back whole.
void save_gpt(const TrainConfig& c, parallel::GptOnMesh& run, int64_t vocab) {
  parallel::ProcessMesh& mesh = run.mesh();
  const std::string shards = c.save + ".shards";
  parallel::save_gpt_sharded(shards, *run.model(), mesh, run.parameter_state(),
                             {{"format", "dtrain-gpt-parameters"}});
  if (mesh.rank() == 0) {
    const nn::GptConfig& g = run.model()->config();
    nn::Gpt single(g);
    single.load_state_dict(parallel::load_gpt_sharded(shards, single, single.state_dict()));
    save_checkpoint(c.save, single, nullptr,
                    {{"model", "gpt"},
                     {"vocab_size", g.vocab_size},
                     {"tokens", vocab},
                     {"block_size", g.block_size},
                     {"n_layer", g.n_layer},
                     {"n_head", g.n_head},
                     {"n_embd", g.n_embd},
                     {"seed", g.seed},
                     {"tokenizer_bytes", tokenizer_bytes(c)}});
    fs::remove_all(shards);
    spdlog::info("checkpoint: {}", c.save);
  }
  mesh.world().barrier();
}

parallel::GptMeshOptions mesh_options(const TrainConfig& c, const nn::GptConfig& g, int pp) {
  parallel::GptMeshOptions o;
  o.lr = c.lr;
  o.weight_decay = c.weight_decay;
  o.zero = c.zero;
  o.clip = c.clip;
  o.microbatches = pp > 1 ? c.microbatches : 1;
  o.schedule = parallel::parse_schedule(c.pp_schedule);
  o.bf16 = c.bf16;
  if (!c.stage_split.empty()) o.stage_starts = parallel::parse_stage_starts(c.stage_split, g, pp);
  return o;
}

// --print-schedule: the stages' layers and the schedule's timeline (rank 0).
void print_plan(const TrainConfig& c, parallel::GptOnMesh& run) {
  const parallel::MeshShape& m = run.mesh().shape();
  const nn::GptConfig& g = run.model()->config();
  const std::vector<int64_t> layers = parallel::gpt_layer_params(g), starts = run.stage_starts();
  fmt::print("mesh {}: {} stages over {} layers (embedding, {} blocks, head)\n", m.str(), m.pp,
             layers.size(), g.n_layer);
  for (size_t s = 0; s < starts.size(); ++s) {
    const int64_t end = s + 1 < starts.size() ? starts[s + 1] : static_cast<int64_t>(layers.size());
    int64_t params = 0;
    for (int64_t l = starts[s]; l < end; ++l) params += layers[static_cast<size_t>(l)];
    fmt::print("  stage {}: layers {}..{} ({} parameters)\n", s, starts[s], end - 1, params);
  }
  const parallel::ScheduleKind kind = parallel::parse_schedule(c.pp_schedule);
  const int mb = m.pp > 1 ? c.microbatches : 1;
  fmt::print("{} schedule, {} micro-batches, ideal bubble (p-1)/(m+p-1) = {:.1f}%\n{}",
             parallel::schedule_name(kind), mb, 100.0 * (m.pp - 1) / (mb + m.pp - 1),
             parallel::format_schedule(kind, m.pp, mb));
}

void print_banner(const TrainConfig& c, parallel::GptOnMesh& run,
                  const data::PreparedText& corpus) {
  const nn::Gpt& gpt = *run.model();
  std::string line = fmt::format(
      "dtrain train: {} ({} parameters, {} on this rank) on fortunes ({} tokens), "
      "mesh {}, zero {}{}, batch {} x {} tokens, {} steps",
      gpt.config().str(), gpt.config().num_parameters(), run.parameter_elements(),
      corpus.train_tokens, run.mesh().shape().str(), c.zero, c.bf16 ? ", bf16 autocast" : "",
      c.batch, c.context, c.max_steps);
  if (run.mesh().shape().pp > 1) {
    line += fmt::format(", {} schedule over {} micro-batches", c.pp_schedule, c.microbatches);
  }
  spdlog::info("{}", line);
}

void print_result(const TrainStats& stats, parallel::GptOnMesh& run, MeshPlan& plan) {
  const double bubble = run.mesh().shape().pp > 1 ? plan.mean_bubble() : 0.0;  // collective
  if (!plan.is_logging_rank()) return;
  fmt::print(
      "dtrain train: gpt on fortunes, mesh {}: {} steps in {:.1f} s ({:.0f} tokens/s, "
      "{:.2f} GFLOP/s model), final train loss {:.4f}, validation loss {:.4f} "
      "(perplexity {:.2f}) vs unigram baseline {:.4f} (perplexity {:.2f})\n",
      run.mesh().shape().str(), stats.steps, stats.seconds, stats.samples_per_s,
      stats.samples_per_s * run.model()->config().flops_per_token() / 1e9, stats.final_loss,
      stats.eval.at("val_loss"), stats.eval.at("val_ppl"), stats.eval.at("unigram_loss"),
      stats.eval.at("unigram_ppl"));
  if (run.mesh().shape().pp > 1) {
    fmt::print(
        "pipeline: measured bubble {:.1f}% (mean over stages and steps) vs ideal "
        "(p-1)/(m+p-1) = {:.1f}%\n",
        100 * bubble, 100 * plan.ideal_bubble());
  }
}

}  // namespace

TrainResult train_gpt_worker(const TrainConfig& config, WorkerSession& session,
                             parallel::Tracer* tracer) {
  const int world = session.size();
  parallel::ProcessMesh mesh(session.comm(), mesh_shape(config, world));
  const data::PreparedText corpus = data::prepare_cached_corpus(config.data, config.data_cache);
  const nn::GptConfig g = model_config(config, corpus.vocab_size, mesh.shape().tp);
  parallel::GptOnMesh run(mesh, g, mesh_options(config, g, mesh.shape().pp));
  if (config.print_schedule) {
    if (mesh.rank() == 0) print_plan(config, run);
    TrainResult none;
    none.world_size = world;
    return none;
  }
  TextSource data(corpus, config, mesh);
  data.set_runner(&run);
  LrClock clock(config.lr);
  TrainerOptions options;
  options.epochs = 1;
  options.max_steps = config.max_steps;
  options.log_every = config.log_every;
  optim::CosineAnnealingLR schedule(clock, optim::CosineAnnealingOptions(config.max_steps)
                                               .warmup_steps(config.warmup_steps)
                                               .eta_min(config.lr / 10));
  MeshPlan plan(run);
  GptCheckpoints checkpoints(config, run, schedule, [&](int64_t step) { data.resume_at(step); });
  const bool ckpt = !config.ckpt_dir.empty();
  if (ckpt) options.checkpoint_every = config.ckpt_every;
  std::optional<ProgressCallback> progress;
  std::optional<MetricsCallback> metrics;
  std::optional<TensorBoardCallback> events;  // scalars of StepEnd and the evaluation
  HeartbeatProgress beat(session);
  std::vector<Callback*> callbacks = {&beat};
  if (ckpt) callbacks.push_back(&checkpoints);
  if (plan.is_logging_rank()) {
    print_banner(config, run, corpus);
    if (config.progress) callbacks.push_back(&progress.emplace("gpt"));
    callbacks.push_back(&metrics.emplace(config.metrics, nlohmann::json{{"workers", world}}));
  }
  const std::string events_dir = tensorboard_dir(config.tensorboard, config.metrics);
  if (!events_dir.empty() && (plan.is_logging_rank() || config.tensorboard_all_ranks)) {
    callbacks.push_back(&events.emplace(events_dir, mesh.rank()));
  }
  Trainer trainer({.model = run.model(),
                   .loss = gpt_loss,
                   .optimizer = &clock,
                   .scheduler = &schedule,
                   .data = &data,
                   .plan = &plan,
                   .resume = ckpt ? &checkpoints : nullptr,
                   .callbacks = callbacks,
                   .tracer = tracer},
                  options);
  TrainStats stats = trainer.fit();
  if (!config.save.empty()) save_gpt(config, run, corpus.vocab_size);
  print_result(stats, run, plan);
  TrainResult r;
  r.steps = stats.steps;
  r.final_loss = stats.final_loss;
  r.samples_per_s = stats.samples_per_s;
  r.seconds = stats.seconds;
  r.world_size = world;
  return r;
}

}  // namespace dtrain::cli
