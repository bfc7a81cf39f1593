// bf16 mixed precision on the CPU: training throughput in f32 and under bf16 autocast,
// dtrain (oneDNN bf16 primitives, amp_cpu.h) side by side with PyTorch CPU's
// torch.autocast("cpu", dtype=torch.bfloat16) in the same run.
//
// The models and the timing protocol are those of bench/train_throughput.cc (the
// reference models of ../shared/bench/peers/README.md; 5 warm-up steps, median of
// reps x steps; one step = zero_grad, forward, loss, backward, SGD step); the peer is
// bench/peers/pytorch_amp_cpu.py. Prints one row per model: samples/s for each
// framework and precision, and the bf16/f32 speed ratio of each.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/bf16_onednn.h"
#include "cpu/blas.h"
#include "dtrain/engine/amp.h"
#include "dtrain/engine/amp_cpu.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/threading.h"
#include "peer_process.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace {

using namespace dtrain;

// One model's training step, under bf16 autocast or not.
struct Runner {
  std::shared_ptr<nn::Sequential> model;
  nn::Batch data;
  std::unique_ptr<optim::SGD> opt;
  bool bf16;
  Runner(const std::string& name, int64_t batch, bool bf16_) : bf16(bf16_) {
    Generator gen(0);
    model = nn::make_model(name, gen);
    data = nn::make_random_batch(name, batch, gen);
    opt = std::make_unique<optim::SGD>(model->parameters(), optim::SGDOptions(0.01).momentum(0.9));
  }
  void step() {
    amp::AutocastGuard autocast(DType::bf16, bf16);
    opt->zero_grad();
    Tensor loss = cross_entropy(model->forward(data.input), data.target);
    loss.backward();
    opt->step();
  }
  double seconds_per_step(int steps) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) step();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  }
};

// Median samples/s in f32 and in bf16 ({f32, bf16}). The repetitions alternate between
// the two, so that both see the same load on a shared machine.
std::pair<double, double> bench_model(const std::string& name, int64_t batch, int steps, int reps) {
  Runner f32(name, batch, false), bf16(name, batch, true);
  for (int i = 0; i < 5; ++i) f32.step(), bf16.step();
  std::vector<double> tf, tb;
  for (int r = 0; r < reps; ++r) {
    tf.push_back(f32.seconds_per_step(steps));
    tb.push_back(bf16.seconds_per_step(steps));
  }
  std::sort(tf.begin(), tf.end());
  std::sort(tb.begin(), tb.end());
  const auto b = static_cast<double>(batch);
  return {b / tf[tf.size() / 2], b / tb[tb.size() / 2]};
}

// The raw kernels: GFLOP/s of an n^3 GEMM, f32 (cpu::gemm, what linear() runs) and
// oneDNN bf16 with f32 output (what it runs under bf16 autocast), {f32, bf16}.
std::pair<double, double> gemm_gflops(int64_t n, int reps) {
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
  std::vector<BFloat16> ab(n * n, BFloat16(0.5f)), bb(n * n, BFloat16(0.25f));
  auto time = [&](auto&& f) {
    f();
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      f();
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    return 2.0 * n * n * n / t[t.size() / 2] / 1e9;
  };
  double f32 = time(
      [&] { cpu::gemm(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n); });
  double bf16 = time([&] {
    cpu::matmul_bf16_onednn({n, n, n, false, false}, ab.data(), bb.data(), nullptr, c.data());
  });
  return {f32, bf16};
}

// "model/amp" -> samples/s of the PyTorch peer; empty (with *note) when it cannot run.
std::map<std::string, double> run_peer(const std::string& models, int threads, int64_t batch,
                                       int steps, int reps, std::string* note) {
  std::map<std::string, double> out;
  const std::string py = bench::find_torch_python();
  if (py.empty()) {
    *note = "peer: PyTorch not installed (apt-get install python3-torch libopenblas0-pthread)";
    return out;
  }
  int st = 0;
  std::string text = bench::run_capture(
      fmt::format("{} {}/bench/peers/pytorch_amp_cpu.py --model {} --threads {} --batch {} "
                  "--steps {} --reps {} 2>/dev/null",
                  py, DTRAIN_SOURCE_DIR, models, threads, batch, steps, reps),
      &st);
  std::istringstream lines(text);
  std::string line, version = "?";
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("model")) continue;
    out[j["model"].get<std::string>() + "/" + j["amp"].get<std::string>()] =
        j["samples_per_s"].get<double>();
    version = j.value("version", "?");
  }
  *note = st == 0 ? fmt::format("peer: PyTorch {} torch.autocast(\"cpu\", torch.bfloat16)", version)
                  : fmt::format("peer: pytorch_amp_cpu.py failed (status {})", st);
  return out;
}

std::string cell(const std::map<std::string, double>& m, const std::string& key) {
  auto it = m.find(key);
  return it == m.end() ? "-" : fmt::format("{:.1f}", it->second);
}

std::string ratio(const std::map<std::string, double>& m, const std::string& a,
                  const std::string& b) {
  auto ia = m.find(a), ib = m.find(b);
  return ia == m.end() || ib == m.end() ? "-" : fmt::format("{:.2f}", ia->second / ib->second);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bf16 autocast on the CPU: dtrain vs PyTorch, f32 vs bf16 training throughput"};
  int threads = 1, steps = 20, reps = 5;
  int64_t batch = 64;
  std::string models = "seed-cnn,mlp";
  bool no_peer = false;
  app.add_option("--threads", threads, "Kernel threads")->capture_default_str();
  app.add_option("--batch", batch, "Batch size")->capture_default_str();
  app.add_option("--steps", steps, "Steps per repetition")->capture_default_str();
  app.add_option("--reps", reps, "Repetitions (the median is reported)")->capture_default_str();
  app.add_option("--model", models, "Comma-separated reference models")->capture_default_str();
  app.add_flag("--no-peer", no_peer, "Do not run the PyTorch peer");
  CLI11_PARSE(app, argc, argv);
  try {
    amp::require_cpu_bf16(amp::cpu_bf16_path());
    set_num_threads(threads);
    std::vector<std::string> names;
    std::istringstream list(models);
    for (std::string n; std::getline(list, n, ',');) names.push_back(n);
    std::map<std::string, double> ours, peer;
    for (const auto& n : names) {
      std::tie(ours[n + "/f32"], ours[n + "/bf16"]) = bench_model(n, batch, steps, reps);
    }
    std::string note = "peer: skipped (--no-peer)";
    if (!no_peer) peer = run_peer(models, threads, batch, steps, reps, &note);
    fmt::print("bf16 autocast on the CPU ({}), batch {}, {} thread(s), median of {} x {} steps\n",
               amp::cpu_isa_name(), batch, threads, reps, steps);
    fmt::print("{:<9} {:>12} {:>12} {:>10} {:>12} {:>12} {:>10} {:>14}\n", "model", "dtrain f32",
               "dtrain bf16", "bf16/f32", "torch f32", "torch bf16", "bf16/f32", "bf16 vs torch");
    for (const auto& n : names) {
      std::map<std::string, double> both = peer;
      both["ours/" + n] = ours[n + "/bf16"];
      fmt::print("{:<9} {:>12} {:>12} {:>10} {:>12} {:>12} {:>10} {:>14}\n", n,
                 cell(ours, n + "/f32"), cell(ours, n + "/bf16"),
                 ratio(ours, n + "/bf16", n + "/f32"), cell(peer, n + "/f32"),
                 cell(peer, n + "/bf16"), ratio(peer, n + "/bf16", n + "/f32"),
                 ratio(both, "ours/" + n, n + "/bf16"));
    }
    fmt::print("(samples/s; bf16 vs torch = dtrain bf16 / PyTorch bf16)\n{}\n", note);
    auto [gf, gb] = gemm_gflops(1024, reps);
    fmt::print(
        "kernels: 1024^3 GEMM f32 {:.1f} GFLOP/s, oneDNN bf16 (f32 out) {:.1f} GFLOP/s: "
        "bf16/f32 {:.2f}\n",
        gf, gb, gb / gf);
  } catch (const std::exception& e) {
    fmt::print(stderr, "amp_cpu: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
