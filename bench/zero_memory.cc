// Per-rank memory of DDP (ZeRO-0) and ZeRO-1/2/3 with AdamW, measured next to the
// formula, for an MLP of P parameters at dp = 1, 2, 4.
//
// Each rank is its own process (fork, tcp over a FileStore in a temporary folder), so
// each has its own host allocator. After one warm-up step (construction copies the
// parameters into the flat buffer, a transient not counted here), a thread polls the
// allocator's bytes_in_use every 20 us during the remaining steps; "peak" is the
// largest sample minus the bytes in use before the model was built, the worst rank of
// the run. Sampling can miss a peak shorter than the interval: a lower bound. "held"
// is what the optimizer reports it keeps between steps (ShardMemory; for DDP the
// parameters, gradients, moments and its bucket buffers). The layers have no bias, so
// P is a power of two and the flat buffers fall on the allocator's size classes.
// The formula counts what ZeRO shards (params 4P, grads 4P, Adam moments 8P, each
// divided by N where sharded); the measured peak adds what it leaves out: activations,
// DDP's bucket copy of the gradients (4P), stage 1's reduced shard beside its full
// gradient, stage 3's one gathered unit (its parameters and gradients), and the
// allocator's size-class rounding (up to 1.5x per block).
//
// Not here: GPU memory (this build's sharded AdamW runs on the CPU), time per step.
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/engine/allocator.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/random.h"
#include "dtrain/engine/threading.h"
#include "dtrain/parallel/ddp.h"
#include "dtrain/parallel/zero.h"

namespace {

using namespace dtrain;

struct Config {
  int64_t dim = 512;
  int layers = 4;
  int64_t batch = 16;  // per rank
  int steps = 3;
  size_t bucket_bytes = size_t{1} << 20;  // ZeRO-2: a layer's weight a bucket
};

size_t in_use() {
  auto* a = dynamic_cast<CachingAllocator*>(default_allocator(Device::cpu()));
  return a ? a->stats().bytes_in_use : 0;
}

// The polling thread: the largest bytes_in_use seen while alive.
class PeakSampler {
 public:
  PeakSampler()
      : thread_([this] {
          while (!stop_) {
            size_t now = in_use();
            if (now > peak_) peak_ = now;
            std::this_thread::sleep_for(std::chrono::microseconds(20));
          }
        }) {}
  ~PeakSampler() { stop(); }
  size_t stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    return std::max(peak_.load(), in_use());
  }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<size_t> peak_{0};
  std::thread thread_;
};

struct Result {
  size_t peak = 0;
  size_t held = 0;
};

// One rank: builds the MLP, trains cfg.steps AdamW steps in `mode` (0 = DDP), returns
// its peak bytes above the baseline and the bytes it holds between steps.
Result run_rank(const Config& cfg, int mode, comm::Communicator& comm) {
  const size_t base = in_use();
  Generator gen(1);
  std::vector<std::shared_ptr<nn::Module>> units;
  auto seq = std::make_shared<nn::Sequential>();
  for (int l = 0; l < cfg.layers; ++l) {
    auto unit = std::make_shared<nn::Sequential>();
    unit->push_back(
        std::make_shared<nn::Linear>(nn::LinearOptions(cfg.dim, cfg.dim).bias(false), gen));
    unit->push_back(std::make_shared<nn::Tanh>());
    units.push_back(unit);
    seq->push_back(unit);
  }
  const std::vector<Tensor> params = seq->parameters();
  const std::vector<double> wd = parallel::decay_matrices_only(params, 0.1);
  optim::AdamWOptions adamw(1e-3);
  std::unique_ptr<parallel::ShardedAdamW> zero;
  std::unique_ptr<parallel::DistributedDataParallel> ddp;
  std::unique_ptr<optim::AdamW> plain;
  parallel::FullyShardedDataParallel* fsdp = nullptr;
  if (mode == 0) {
    ddp = std::make_unique<parallel::DistributedDataParallel>(seq, comm);
    plain = std::make_unique<optim::AdamW>(params, adamw.weight_decay(0.1));
  } else if (mode == 3) {
    auto f = std::make_unique<parallel::FullyShardedDataParallel>(units, wd, comm, adamw);
    fsdp = f.get();
    zero = std::move(f);
  } else {
    zero = std::make_unique<parallel::ZeroOptimizer>(params, wd, comm, adamw,
                                                     parallel::ZeroOptions{mode, cfg.bucket_bytes});
  }
  std::vector<float> xs(static_cast<size_t>(cfg.batch * cfg.dim));
  for (float& v : xs) v = static_cast<float>(gen.uniform(-1.0, 1.0));
  Tensor x = from_vector<float>(xs, {cfg.batch, cfg.dim});
  std::unique_ptr<PeakSampler> sampler;
  for (int s = 0; s < cfg.steps; ++s) {
    if (s == 1) sampler = std::make_unique<PeakSampler>();
    if (plain) plain->zero_grad();
    if (zero) zero->zero_grad();
    Tensor y = fsdp ? fsdp->forward(x) : ddp ? ddp->forward(x) : seq->forward(x);
    mean(mul(y, y)).backward();
    if (ddp) {
      ddp->finish_gradient_sync();
      plain->step();
    } else {
      zero->step();
    }
  }
  Result out;
  out.peak = (sampler ? sampler->stop() : in_use()) - base;
  if (zero) {
    const parallel::ShardMemory m = zero->memory();
    out.held = m.param_bytes + m.grad_bytes + m.optimizer_state_bytes;
  } else {
    out.held = 5 * 4 * static_cast<size_t>(seq->num_parameters());  // + buckets
  }
  return out;
}

// Forks `world` ranks; returns the largest rank figures (0 when a rank failed).
Result run_world(const Config& cfg, int mode, int world, const std::string& dir) {
  std::vector<pid_t> pids;
  std::vector<int> fds;
  for (int r = 0; r < world; ++r) {
    int fd[2];
    if (pipe(fd) != 0) return Result{};
    pid_t pid = fork();
    if (pid == 0) {
      close(fd[0]);
      Result peak;
      try {
        set_num_threads(1);
        comm::FileStore store(dir);
        comm::TcpOptions tcp;
        tcp.tag = fmt::format("zm-{}-{}", mode, world);
        auto c = comm::make_tcp_communicator(store, r, world,
                                             comm::CommOptions{std::chrono::seconds(60)}, tcp);
        peak = run_rank(cfg, mode, *c);
        c->barrier();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      }
      if (write(fd[1], &peak, sizeof(peak)) != sizeof(peak)) _exit(1);
      _exit(0);
    }
    close(fd[1]);
    pids.push_back(pid);
    fds.push_back(fd[0]);
  }
  Result worst;
  for (int r = 0; r < world; ++r) {
    Result peak;
    if (read(fds[static_cast<size_t>(r)], &peak, sizeof(peak)) != sizeof(peak)) peak = Result{};
    close(fds[static_cast<size_t>(r)]);
    waitpid(pids[static_cast<size_t>(r)], nullptr, 0);
    worst.peak = std::max(worst.peak, peak.peak);
    worst.held = std::max(worst.held, peak.held);
  }
  return worst;
}

double formula_bytes(int mode, int64_t p, int n) {
  const double params = 4.0 * p, grads = 4.0 * p, states = 8.0 * p;
  switch (mode) {
    case 0:
      return params + grads + states;
    case 1:
      return params + grads + states / n;
    case 2:
      return params + (grads + states) / n;
    default:
      return (params + grads + states) / n;
  }
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  CLI::App app{"Per-rank memory of DDP and ZeRO-1/2/3 (AdamW) against the formula"};
  app.add_option("--dim", cfg.dim, "width of each square Linear layer");
  app.add_option("--layers", cfg.layers, "Linear+Tanh units");
  app.add_option("--bucket-bytes", cfg.bucket_bytes, "ZeRO-2 reduce-scatter bucket size");
  app.add_option("--steps", cfg.steps, "training steps (the first is a warm-up)");
  CLI11_PARSE(app, argc, argv);
  const int64_t p = cfg.layers * cfg.dim * cfg.dim;
  const std::string dir =
      (std::filesystem::temp_directory_path() / fmt::format("zero_memory.{}", getpid())).string();
  fmt::print("MLP {0} x Linear({1},{1}) + Tanh: P = {2} parameters ({3:.2f} MiB in f32)\n",
             cfg.layers, cfg.dim, p, 4.0 * p / (1 << 20));
  fmt::print("{:>6} {:>4} {:>10} {:>10} {:>12} {:>12}\n", "mode", "dp", "peak MiB", "held MiB",
             "formula MiB", "peak/formula");
  const char* names[] = {"DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"};
  for (int mode = 0; mode < 4; ++mode) {
    for (int world : {1, 2, 4}) {
      const std::string run_dir = fmt::format("{}/{}-{}", dir, mode, world);
      const Result r = run_world(cfg, mode, world, run_dir);
      const double peak = static_cast<double>(r.peak), formula = formula_bytes(mode, p, world);
      fmt::print("{:>6} {:>4} {:>10.2f} {:>10.2f} {:>12.2f} {:>12.2f}\n", names[mode], world,
                 peak / (1 << 20), static_cast<double>(r.held) / (1 << 20), formula / (1 << 20),
                 peak / formula);
    }
  }
  std::filesystem::remove_all(dir);
  return 0;
}
