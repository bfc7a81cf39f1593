// int8 vs f32 inference on the CPU, side by side: latency and throughput of the
// MNIST models (freshly initialised, calibrated on random batches; speed does not
// depend on the weights) for f32 (the engine's forward) and int8 (QuantizedModel,
// oneDNN s8s8s32 GEMM), beside the same models on PyTorch (f32, and int8 by eager
// static quantization on its onednn engine: bench/peers_int8_inference.py) run in the
// same process tree, with the speed-up of each.
//
//   build/bench/int8_inference [--batch 64] [--iters 30] [--threads 1] [--no-peer]
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
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

// PyTorch's ms by "model/kind", from the peer script's JSON lines; empty when it fails.
std::map<std::string, double> run_peer(int64_t batch, int iters, int threads) {
  std::string cmd = fmt::format(
      "/usr/bin/python3 {}/bench/peers_int8_inference.py --batch {} --iters {} --threads {} "
      "2>/dev/null",
      DTRAIN_SOURCE_DIR, batch, iters, threads);
  std::map<std::string, double> out;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  std::string text;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) text.append(buf.data(), n);
  pclose(p);
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("ms")) {
      out[j["model"].get<std::string>() + "/" + j["kind"].get<std::string>()] = j["ms"];
    }
  }
  return out;
}

void bench_model(const std::string& name, int64_t batch, int iters, int64_t min_k,
                 const std::map<std::string, double>& peer) {
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
  auto peer_ms = [&](const char* kind) {
    auto it = peer.find(name + "/" + kind);
    return it == peer.end() ? 0.0 : it->second;
  };
  auto line = [&](const char* kind, double ms) {
    double pm = peer_ms(kind);
    fmt::print("{:<9} {:<5} {:>6} {:>12.3f} {:>14.0f} {:>12} {:>14}\n", name, kind, batch, ms,
               1e3 * static_cast<double>(batch) / ms, pm > 0 ? fmt::format("{:.3f}", pm) : "-",
               pm > 0 ? fmt::format("{:.0f}", 1e3 * static_cast<double>(batch) / pm) : "-");
  };
  line("f32", f32);
  line("int8", i8);
  double pf = peer_ms("f32"), pi = peer_ms("int8");
  fmt::print(
      "{:<9} int8/f32 speed-up: dtrain x{:.2f}, pytorch {}; dtrain int8 vs pytorch int8 "
      "x{}\n",
      name, f32 / i8, pi > 0 ? fmt::format("x{:.2f}", pf / pi) : "-",
      pi > 0 ? fmt::format("{:.2f}", pi / i8) : "-");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"int8 vs f32 inference of the MNIST models"};
  int64_t batch = 64;
  int iters = 30, threads = 1;
  int64_t min_k = 0;
  bool no_peer = false;
  app.add_option("--batch", batch, "Batch size")->capture_default_str();
  app.add_option("--iters", iters, "Timed calls (median)")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads")->capture_default_str();
  app.add_option("--min-k", min_k, "Layers with a GEMM depth below this stay f32")
      ->capture_default_str();
  app.add_flag("--no-peer", no_peer, "Skip the PyTorch peer");
  CLI11_PARSE(app, argc, argv);
  set_num_threads(threads);
  fmt::print("int8_inference: {} thread(s), median of {} calls\n", threads, iters);
  std::map<std::string, double> peer;
  if (!no_peer) peer = run_peer(batch, iters, threads);
  if (!no_peer && peer.empty()) fmt::print("peer: PyTorch (/usr/bin/python3 torch) did not run\n");
  fmt::print("{:<9} {:<5} {:>6} {:>12} {:>14} {:>12} {:>14}\n", "model", "kind", "batch",
             "dtrain ms", "samples/s", "pytorch ms", "samples/s");
  for (const char* m : {"mlp", "seed-cnn"}) bench_model(m, batch, iters, min_k, peer);
  return 0;
}
