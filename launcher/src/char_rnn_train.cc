// `dtrain train --model char-lstm` (see char_rnn_train.h).
#include "char_rnn_train.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>

#include "checkpointing.h"
#include "commands.h"
#include "ddp_plan.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/data/text.h"
#include "dtrain/engine/nn/recurrent.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/serialize.h"
#include "tensorboard.h"
#include "train_callbacks.h"
#include "trainer.h"

namespace dtrain::cli {

namespace {

namespace fs = std::filesystem;

// Step k's global batch comes from a generator seeded by (seed, k); this rank keeps
// its rows. The data position a checkpoint stores is the step.
class CharTextSource final : public BatchSource {
 public:
  CharTextSource(const data::PreparedText& p, const TrainConfig& c, comm::Communicator& comm)
      : train_(data::TokenDataset::from_file(p.train_path, c.rnn_seq_len)),
        val_(data::TokenDataset::from_file(p.val_path, c.rnn_seq_len)),
        vocab_(p.vocab_size),
        batch_(c.batch),
        steps_(c.max_steps),
        eval_windows_(c.rnn_eval_windows),
        seed_(c.seed),
        comm_(comm) {}
  int64_t steps_per_epoch() const override { return steps_; }
  void begin_epoch(int64_t /*epoch*/) override {
    done_ = resume_;
    resume_ = 0;
  }
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
  data::DistributedSampler position() const override {
    data::DistributedSampler s(steps_, 0, 1, 0, false);
    s.set_epoch(0);
    s.advance(done_);
    return s;
  }
  void load_position(const data::SamplerState& state) override { resume_ = state.position; }
  Metrics evaluate(nn::Module& model) override;
  int64_t vocab() const { return vocab_; }

 private:
  data::DpSlice slice() const { return {comm_.rank(), comm_.size()}; }

  data::TokenDataset train_, val_;
  int64_t vocab_, batch_, steps_, eval_windows_, done_ = 0, resume_ = 0;
  uint64_t seed_;
  comm::Communicator& comm_;
};

// Mean cross-entropy over the evaluated windows (every rank its rows, summed over the
// ranks), and the unigram baseline on the same target characters.
Metrics CharTextSource::evaluate(nn::Module& model) {
  auto& lm = dynamic_cast<nn::CharRnnLM&>(model);
  const int64_t windows = eval_windows_ > 0 ? eval_windows_ : val_.num_eval_windows();
  const int64_t batches = std::max<int64_t>(1, val_.num_eval_batches(batch_, windows / batch_));
  NoGradGuard no_grad;
  lm.eval();
  double sums[2] = {0, 0};  // nats, tokens
  std::vector<int32_t> targets;
  for (int64_t i = 0; i < batches; ++i) {
    const data::TokenBatch mine = val_.eval_batch(i, batch_, slice());
    sums[0] += lm.loss(mine.x, mine.y).item() * static_cast<double>(mine.y.numel());
    sums[1] += static_cast<double>(mine.y.numel());
    for (int64_t y : val_.eval_batch(i, batch_).y.to_vector<int64_t>()) {
      targets.push_back(static_cast<int32_t>(y));
    }
  }
  lm.train();
  comm_.allreduce(sums, 2, DType::f64, comm::ReduceOp::kSum);
  const double mean = sums[0] / sums[1];
  const data::UnigramBaseline uni = data::unigram_baseline(train_.tokens(), targets, vocab_);
  return {{"test_loss", mean},
          {"test_ppl", std::exp(mean)},
          {"unigram_loss", uni.nats_per_token},
          {"unigram_ppl", uni.perplexity},
          {"eval_tokens", sums[1]}};
}

Tensor char_rnn_loss(nn::Module& model, const TrainBatch& b) {
  return dynamic_cast<nn::CharRnnLM&>(model).loss(b.tensors[0], b.tensors[1]);
}

nn::CharRnnConfig model_config(const TrainConfig& c, int64_t vocab) {
  nn::CharRnnConfig m;
  m.vocab_size = vocab;
  m.cell = nn::parse_rnn_cell(c.rnn_cell);
  m.num_layers = c.rnn_layers;
  m.hidden_size = c.rnn_hidden;
  m.dropout = c.rnn_dropout;
  m.seed = c.seed;
  return m;
}

// --save: the model with its shape and tokenizer, what `dtrain generate` reads.
void save_char_rnn(const TrainConfig& c, const nn::CharRnnLM& model, const optim::Optimizer& opt,
                   int64_t steps) {
  const auto tok =
      data::CharTokenizer::load((fs::path(c.data_cache) / "fortunes" / "vocab.json").string());
  const nn::CharRnnConfig& m = model.config();
  save_checkpoint(c.save, model, &opt,
                  {{"model", "char-lstm"},
                   {"cell", nn::rnn_cell_name(m.cell)},
                   {"vocab_size", m.vocab_size},
                   {"num_layers", m.num_layers},
                   {"hidden_size", m.hidden_size},
                   {"dropout", m.dropout},
                   {"seq_len", c.rnn_seq_len},
                   {"seed", m.seed},
                   {"step", steps},
                   {"tokenizer_bytes", std::vector<int>(tok.bytes().begin(), tok.bytes().end())}});
  spdlog::info("checkpoint: {}", c.save);
}

CheckpointOptions checkpoint_options(const TrainConfig& c, int world, const StartFrom& from) {
  CheckpointOptions o;
  o.dir = c.ckpt_dir;
  o.keep = c.keep;
  o.resume = from.resume;
  o.model = "char-lstm";
  o.run_config = {{"model", "char-lstm"},     {"cell", c.rnn_cell},
                  {"layers", c.rnn_layers},   {"hidden", c.rnn_hidden},
                  {"seq_len", c.rnn_seq_len}, {"seed", c.seed},
                  {"batch", c.batch},         {"lr", c.lr},
                  {"max_steps", c.max_steps}, {"world_size", world}};
  o.test_commit_delay_ms = c.test_commit_delay_ms;
  return o;
}

void print_result(const TrainConfig& c, const nn::CharRnnLM& model, const TrainStats& s,
                  int world) {
  fmt::print(
      "dtrain train: {} on fortunes: {} worker(s), {} steps in {:.1f} s ({:.0f} tokens/s), "
      "final train loss {:.4f}, test loss {:.4f} (perplexity {:.2f}) vs unigram baseline "
      "{:.4f} (perplexity {:.2f}) on {:.0f} held-out characters{}\n",
      model.config().str(), world, s.steps, s.seconds, s.samples_per_s, s.final_loss,
      s.eval.at("test_loss"), s.eval.at("test_ppl"), s.eval.at("unigram_loss"),
      s.eval.at("unigram_ppl"), s.eval.at("eval_tokens"),
      c.metrics.empty() ? "" : "; metrics " + c.metrics);
}

}  // namespace

void add_char_rnn_options(CLI::App* t, TrainConfig& c) {
  t->add_option("--cell", c.rnn_cell, "char-lstm: recurrent cell, lstm | gru")
      ->capture_default_str();
  t->add_option("--layers", c.rnn_layers, "char-lstm: recurrent layers")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--hidden", c.rnn_hidden, "char-lstm: hidden (and embedding) size")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--seq-len", c.rnn_seq_len, "char-lstm: characters per training window")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--rnn-dropout", c.rnn_dropout, "char-lstm: dropout between layers")
      ->capture_default_str();
  t->add_option("--eval-windows", c.rnn_eval_windows,
                "char-lstm: held-out windows of --seq-len evaluated (0: all)")
      ->capture_default_str();
}

void validate_char_rnn(const TrainConfig& c) {
  nn::parse_rnn_cell(c.rnn_cell);  // --cell: "unknown recurrent cell 'x': expected ..."
  DTRAIN_CHECK(c.device == "cpu", UnsupportedError,
               "--model char-lstm runs on the CPU (the GRU op has no CUDA path), not --device {}",
               c.device);
  DTRAIN_CHECK(c.rnn_dropout >= 0 && c.rnn_dropout < 1, InvalidArgument,
               "--rnn-dropout must be in [0, 1), got {}", c.rnn_dropout);
  DTRAIN_CHECK(c.rnn_eval_windows >= 0, InvalidArgument, "--eval-windows must be >= 0, got {}",
               c.rnn_eval_windows);
}

TrainResult train_char_rnn_worker(const TrainConfig& given, WorkerSession& session,
                                  const StartFrom& from, parallel::Tracer* tracer) {
  TrainConfig config = given;
  if (!config.lr_given) config.lr = 3e-3;
  if (config.max_steps == 0) config.max_steps = 300;
  const int world = session.size();
  DTRAIN_CHECK(config.batch % world == 0, InvalidArgument,
               "--batch {} cannot be split evenly over {} workers", config.batch, world);
  const data::PreparedText corpus = data::prepare_cached_corpus(config.data, config.data_cache);
  CharTextSource data(corpus, config, session.comm());
  auto model = std::make_shared<nn::CharRnnLM>(model_config(config, data.vocab()));
  optim::Adam opt(model->parameters(), optim::AdamOptions(config.lr));
  optim::CosineAnnealingLR schedule(opt, optim::CosineAnnealingOptions(config.max_steps)
                                             .warmup_steps(config.warmup_steps)
                                             .eta_min(config.lr / 10));
  parallel::DdpOptions ddp;
  ddp.tracer = tracer;
  ddp.compression.kind = parallel::parse_grad_compression(config.grad_compression);
  ddp.compression.powersgd_rank = config.powersgd_rank;
  DataParallelPlan plan(session.comm(), Device::cpu(), ddp);
  std::optional<ShardedCheckpoints> checkpoints;
  if (!config.ckpt_dir.empty()) {
    checkpoints.emplace(checkpoint_options(config, world, from), session, Device::cpu());
  }
  GenerationWatch watch(session);
  TestKillSwitch kill(session.rank(), config.test_kill_rank, config.test_kill_step);
  RecoveryNotice notice(session, from);
  std::optional<ProgressCallback> progress;
  std::optional<MetricsCallback> metrics;
  std::vector<Callback*> callbacks{&watch, &kill, &notice};
  if (plan.is_logging_rank()) {
    spdlog::info(
        "dtrain train: {} ({} parameters) on fortunes ({} train / {} held-out characters), "
        "batch {} x {} ({} worker(s)), {} steps, Adam lr {}",
        model->config().str(), model->num_parameters(), corpus.train_tokens, corpus.val_tokens,
        config.batch, config.rnn_seq_len, world, config.max_steps, config.lr);
    if (config.progress) callbacks.push_back(&progress.emplace("char-lstm"));
    callbacks.push_back(&metrics.emplace(
        config.metrics, nlohmann::json{{"workers", world}, {"model", model->config().str()}}));
  }
  std::optional<TensorBoardCallback> events;  // tensorboard.h
  const std::string events_dir = tensorboard_dir(config.tensorboard, config.metrics);
  if (!events_dir.empty() && (plan.is_logging_rank() || config.tensorboard_all_ranks)) {
    TensorBoardSources sources;
    sources.model = model;
    if (world > 1) sources.sync_seconds = [&plan] { return plan.sync_seconds(); };
    callbacks.push_back(&events.emplace(events_dir, session.rank(), std::move(sources)));
  }
  if (checkpoints) callbacks.push_back(&*checkpoints);
  TrainerOptions options;
  options.epochs = 1;
  options.max_steps = config.max_steps;
  options.log_every = config.log_every;
  if (checkpoints) options.checkpoint_every = config.ckpt_every;
  Trainer trainer({.model = model,
                   .loss = char_rnn_loss,
                   .optimizer = &opt,
                   .scheduler = &schedule,
                   .data = &data,
                   .plan = &plan,
                   .resume = checkpoints ? &*checkpoints : nullptr,
                   .callbacks = callbacks,
                   .tracer = tracer},
                  options);
  const TrainStats stats = trainer.fit();
  TrainResult r;
  r.steps = stats.steps;
  r.final_loss = stats.final_loss;
  r.samples_per_s = stats.samples_per_s;
  r.seconds = stats.seconds;
  r.world_size = world;
  if (!plan.is_logging_rank()) return r;
  r.metrics_path = metrics->path();
  if (!config.save.empty()) save_char_rnn(config, *model, opt, stats.steps);
  config.metrics = r.metrics_path;
  print_result(config, *model, stats, world);
  return r;
}

}  // namespace dtrain::cli
