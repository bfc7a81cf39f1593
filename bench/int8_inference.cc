// int8 vs f32 inference on the CPU, side by side: latency and throughput of the
// MNIST models (freshly initialised, calibrated on random batches; speed does not
// depend on the weights) for f32 (the engine's forward) and int8 (QuantizedModel,
// oneDNN s8s8s32 GEMM), and the per-layer time of the int8 model.
//
//   build/bench/int8_inference [--batch 64] [--iters 30] [--threads 1]
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/quant.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/threading.h"

namespace {

using namespace dtrain;

template <typename F>
double median_ms(F&& f, int iters) {
  f();
  f();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(t.size() / 2), t.end());
  return t[t.size() / 2];
}

void bench_model(const std::string& name, int64_t batch, int iters, int64_t min_k) {
  Generator gen(1);
  auto model = nn::make_model(name, gen);
  model->eval();
  std::vector<Tensor> calib;
  for (int i = 0; i < 4; ++i) calib.push_back(nn::make_random_batch(name, batch, gen).input);
  compress::CalibrationOptions co;
  co.min_k = min_k;
  auto q = compress::QuantizedModel::build(*model, calib, co);
  Tensor x = nn::make_random_batch(name, batch, gen).input;
  NoGradGuard ng;
  double f32 = median_ms([&] { model->forward(x); }, iters);
  double i8 = median_ms([&] { q.forward(x, compress::Int8Kernel::kOneDnn); }, iters);
  auto line = [&](const char* kind, double ms) {
    fmt::print("{:<9} {:<5} {:>6} {:>12.3f} {:>14.0f}\n", name, kind, batch, ms,
               1e3 * static_cast<double>(batch) / ms);
  };
  line("f32", f32);
  line("int8", i8);
  fmt::print("{:<9} int8/f32 speed-up x{:.2f}\n", name, f32 / i8);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"int8 vs f32 inference of the MNIST models"};
  int64_t batch = 64;
  int iters = 30, threads = 1;
  int64_t min_k = 0;
  app.add_option("--batch", batch, "Batch size")->capture_default_str();
  app.add_option("--iters", iters, "Timed calls (median)")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads")->capture_default_str();
  app.add_option("--min-k", min_k, "Layers with a GEMM depth below this stay f32")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  set_num_threads(threads);
  fmt::print("int8_inference: {} thread(s), median of {} calls\n", threads, iters);
  fmt::print("{:<9} {:<5} {:>6} {:>12} {:>14}\n", "model", "kind", "batch", "latency ms",
             "samples/s");
  for (const char* m : {"mlp", "seed-cnn"}) bench_model(m, batch, iters, min_k);
  return 0;
}
