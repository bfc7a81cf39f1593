// `dtrain prune`, `dtrain quantize`, `dtrain distill`: model compression on the MNIST
// models (seed-cnn, mlp), one process, through the Trainer (compress_local.h).
//
//   dtrain prune --ckpt IN --sparsity 0.5 [--global] --out OUT [--finetune-steps N]
//     Magnitude-prunes the Linear/Conv2d weights (engine/compress/prune.h), fine-tunes
//     N steps with the mask kept, writes OUT with the masks in the checkpoint's extra
//     ("prune"), and prints the test accuracy dense, right after pruning and after
//     fine-tuning. Masks already in IN are kept (their weights stay pruned), so running
//     prune on its own OUT again continues fine-tuning the same mask.
//   dtrain quantize --ckpt IN [--model NAME] --calib-batches 10
//     Post-training int8 (engine/compress/quant.h): f32 vs int8 test accuracy, latency
//     and throughput of one batch, and the ratio (--min-k 16 keeps layers of depth < 16, e.g.
//     seed-cnn's first conv, in f32; --percentile 99.99 clips activation outliers).
//   dtrain distill --teacher CKPT --teacher-model seed-cnn --student-model mlp
//                  --temperature 4 --alpha 0.5 --max-steps N
//     Trains the student with kd_loss (engine/compress/distill.h), then the same student
//     (same seed, steps and data order) on the labels alone, and prints both.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "compress_local.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/distill.h"
#include "dtrain/engine/compress/quant.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/engine/threading.h"
#include "mnist_source.h"

namespace dtrain::cli {

namespace {

struct PruneArgs {
  std::string ckpt, model, out;
  double sparsity = 0.5;
  bool global = false;
  int64_t finetune_steps = 0;
  double lr = 0.01;
  LocalDataOptions data;
};

int run_prune(const PruneArgs& a) {
  DTRAIN_CHECK(a.sparsity >= 0 && a.sparsity < 1, InvalidArgument,
               "--sparsity must be in [0, 1), got {}", a.sparsity);
  DTRAIN_CHECK(a.finetune_steps >= 0, InvalidArgument, "--finetune-steps must be >= 0, got {}",
               a.finetune_steps);
  nlohmann::json extra;
  auto model = load_model(a.ckpt, a.model, "--ckpt", &extra);
  std::string name = a.model.empty() ? checkpoint_model(a.ckpt) : a.model;
  LocalMnistSource data(a.data);
  auto acc = [&] { return data.evaluate(*model).at("test_accuracy"); };
  const double dense = acc();
  if (extra.contains("prune"))
    compress::PruneMasks::from_json(extra["prune"], *model).apply(*model);
  auto masks = compress::PruneMasks::prune_by_magnitude(*model, {a.sparsity, a.global});
  const double pruned = acc();
  double tuned = pruned;
  if (a.finetune_steps > 0) {
    train_local(model, mnist_loss, data, a.finetune_steps, a.lr, &masks);
    tuned = acc();
  }
  auto sp = compress::weight_sparsity(*model);
  save_checkpoint(a.out, *model, nullptr,
                  {{"model", name}, {"seed", a.data.seed}, {"prune", masks.to_json()}});
  fmt::print(
      "dtrain prune: {} on {}: {} {:.0f}% of {} weights (sparsity {:.4f}): test accuracy "
      "dense {:.4f}, pruned {:.4f}, fine-tuned {} steps {:.4f}; checkpoint {}\n",
      name, data.source(), a.global ? "global" : "per-layer", a.sparsity * 100, sp.total,
      sp.fraction(), dense, pruned, a.finetune_steps, tuned, a.out);
  return 0;
}

Command add_prune(CLI::App& app) {
  auto a = std::make_shared<PruneArgs>();
  CLI::App* c =
      app.add_subcommand("prune", "Magnitude-prune a checkpoint's weights (and fine-tune)");
  c->add_option("--ckpt", a->ckpt, "Checkpoint to prune (dtrain train --save)")->required();
  c->add_option("--model", a->model, "Model name (default: the checkpoint's)");
  c->add_option("--sparsity", a->sparsity, "Fraction of weights to zero, in [0, 1)")
      ->capture_default_str();
  c->add_flag("--global", a->global, "One threshold over all layers (default: per layer)");
  c->add_option("--out", a->out, "Pruned checkpoint to write (masks included)")->required();
  c->add_option("--finetune-steps", a->finetune_steps, "SGD steps with the mask kept")
      ->capture_default_str();
  c->add_option("--lr", a->lr, "Fine-tuning learning rate (momentum 0.9)")->capture_default_str();
  add_local_data_options(c, a->data);
  return {c, [a] { return run_prune(*a); }};
}

struct QuantArgs {
  std::string ckpt, model;
  int64_t calib_batches = 10;
  double percentile = 100;
  int64_t min_k = 0;
  int64_t bench_batch = 64, iters = 30;
  int threads = 1;
  LocalDataOptions data;
};

// Median seconds of one call of f over `iters` calls (after two warm-up calls).
template <typename F>
double median_seconds(F&& f, int64_t iters) {
  f();
  f();
  std::vector<double> t;
  for (int64_t i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(t.size() / 2), t.end());
  return t[t.size() / 2];
}

int run_quantize(const QuantArgs& a) {
  DTRAIN_CHECK(a.calib_batches >= 1, InvalidArgument, "--calib-batches must be >= 1, got {}",
               a.calib_batches);
  DTRAIN_CHECK(a.threads >= 1, InvalidArgument, "--threads must be >= 1, got {}", a.threads);
  set_num_threads(a.threads);
  auto model = load_model(a.ckpt, a.model, "--ckpt");
  model->eval();
  LocalMnistSource data(a.data);
  auto calib = data.first_train_inputs(a.calib_batches, a.data.batch);
  compress::CalibrationOptions co;
  co.percentile = a.percentile;
  co.min_k = a.min_k;
  auto q = compress::QuantizedModel::build(*model, calib, co);
  NoGradGuard ng;
  const double acc32 = data.accuracy([&](const Tensor& x) { return model->forward(x); });
  const double acc8 = data.accuracy([&](const Tensor& x) { return q.forward(x); });
  std::vector<int64_t> idx(static_cast<size_t>(std::min(a.bench_batch, data.test().size())));
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
  Tensor x = data.test().get_batch(idx).input;
  const double t32 = median_seconds([&] { model->forward(x); }, a.iters);
  const double t8 = median_seconds([&] { q.forward(x); }, a.iters);
  const double n = static_cast<double>(idx.size());
  fmt::print(
      "dtrain quantize: {} on {}: calibration {} batches of {} ({}), {} thread(s)\n"
      "  {:<5} {:>9} {:>14} {:>16}\n"
      "  {:<5} {:>9.4f} {:>14.3f} {:>16.0f}\n"
      "  {:<5} {:>9.4f} {:>14.3f} {:>16.0f}\n"
      "  int8 - f32 accuracy {:+.4f}; int8 speed-up x{:.2f} (batch {}, median of {})\n"
      "  int8 path: {}\n",
      checkpoint_model(a.ckpt), data.source(), calib.size(), a.data.batch,
      a.percentile >= 100 ? std::string("min/max") : fmt::format("p{}", a.percentile), a.threads,
      "", "accuracy", "latency ms", "samples/s", "f32", acc32, t32 * 1e3, n / t32, "int8", acc8,
      t8 * 1e3, n / t8, acc8 - acc32, t32 / t8, idx.size(), a.iters,
      q.graph() ? std::string("int8 graph (8-bit activations from layer to layer)")
                : "per layer, f32 between layers: " + q.graph_unavailable());
  return 0;
}

Command add_quantize(CLI::App& app) {
  auto a = std::make_shared<QuantArgs>();
  CLI::App* c =
      app.add_subcommand("quantize", "Post-training int8 quantization: accuracy and speed");
  c->add_option("--ckpt", a->ckpt, "Checkpoint (dtrain train --save)")->required();
  c->add_option("--model", a->model, "Model name (default: the checkpoint's)");
  c->add_option("--calib-batches", a->calib_batches, "Training batches for the activation ranges")
      ->capture_default_str();
  c->add_option("--percentile", a->percentile, "Activation range: percentile of |x| (100: max)")
      ->capture_default_str();
  c->add_option("--min-k", a->min_k, "Layers with a GEMM depth (C*k*k) below this stay f32")
      ->capture_default_str();
  c->add_option("--bench-batch", a->bench_batch, "Batch size of the timing")
      ->capture_default_str()
      ->check(kPositive);
  c->add_option("--iters", a->iters, "Timed calls")->capture_default_str()->check(kPositive);
  c->add_option("--threads", a->threads, "CPU threads for the kernels")->capture_default_str();
  add_local_data_options(c, a->data);
  return {c, [a] { return run_quantize(*a); }};
}

}  // namespace

Command add_prune_command(CLI::App& app) { return add_prune(app); }
Command add_quantize_command(CLI::App& app) { return add_quantize(app); }

}  // namespace dtrain::cli
