// Training throughput of the reference models, dtrain against PyTorch side by side.
//
// Builds exactly the models of ../shared/bench/peers/README.md (seed-cnn, mlp,
// seed-lstm), times zero_grad + forward + loss + backward + SGD step with the peer's
// protocol (5 warm-up steps, median of 5 repetitions of 20 steps), then runs
// pytorch_train.py in the same run when PyTorch is installed and prints the
// dtrain/PyTorch ratio per model.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "char_lstm_bench.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/threading.h"
#include "peer_process.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace {

using dtrain::bench::find_torch_python;
using dtrain::bench::run_capture;

using namespace dtrain;

struct Timing {
  double ms_per_step;
  double samples_per_s;
};

Timing bench_model(const std::string& name, int64_t batch, int steps, int reps) {
  Generator gen(0);
  auto model = nn::make_model(name, gen);
  nn::Batch data = nn::make_random_batch(name, batch, gen);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.01).momentum(0.9));
  auto step = [&] {
    opt.zero_grad();
    Tensor loss = cross_entropy(model->forward(data.input), data.target);
    loss.backward();
    opt.step();
  };
  for (int i = 0; i < 5; ++i) step();
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) step();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                    steps);
  }
  std::sort(times.begin(), times.end());
  double med = times[times.size() / 2];
  return {med * 1e3, static_cast<double>(batch) / med};
}

// model -> samples/s from the PyTorch peer; empty when it is not installed.
std::map<std::string, nlohmann::json> run_pytorch(const std::string& peers, int threads,
                                                  int64_t batch, std::string* note) {
  std::map<std::string, nlohmann::json> out;
  std::string py = find_torch_python();
  if (py.empty()) {
    *note = "peer: PyTorch not installed (apt-get install python3-torch libopenblas0-pthread)";
    return out;
  }
  int st = 0;
  std::string text = run_capture(
      fmt::format("{} {}/pytorch_train.py --threads {} --batch {} --model all 2>/dev/null", py,
                  peers, threads, batch),
      &st);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty() || line[0] != '{') continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("model")) out[j["model"].get<std::string>()] = j;
  }
  *note = st == 0 ? fmt::format("peer: PyTorch {} via {}",
                                out.empty() ? "?" : out.begin()->second.value("version", "?"), py)
                  : fmt::format("peer: pytorch_train.py failed (status {})", st);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dtrain training-throughput benchmark (reference models vs PyTorch)"};
  int threads = 1;
  int64_t batch = 64;
  int steps = 20, reps = 5;
  std::string models = "all";
  std::string peers = std::string(DTRAIN_SOURCE_DIR) + "/bench/peers";  // + mobilenet
  bool no_peer = false;
  app.add_option("--threads", threads, "Kernel threads")->capture_default_str();
  app.add_option("--batch", batch, "Batch size")->capture_default_str();
  app.add_option("--steps", steps, "Steps per repetition")->capture_default_str();
  app.add_option("--reps", reps, "Repetitions (the median is reported)")->capture_default_str();
  app.add_option("--model", models, "seed-cnn | mlp | seed-lstm | char-lstm | mobilenet | all")
      ->capture_default_str();
  app.add_option("--peers", peers, "Folder with pytorch_train.py")->capture_default_str();
  app.add_flag("--no-peer", no_peer, "Do not run the PyTorch peer");
  CLI11_PARSE(app, argc, argv);

  try {
    set_num_threads(threads);
    std::vector<std::string> names = {"seed-cnn", "mlp", "seed-lstm", "mobilenet"};
    if (models != "all") names = {models};
    const bool lm = models == "all" || models == "char-lstm";  // char_lstm_bench.h
    if (models == "char-lstm") names.clear();
    std::map<std::string, Timing> ours;
    for (const auto& n : names) ours[n] = bench_model(n, batch, steps, reps);
    std::string note = "peer: skipped (--no-peer)";
    std::map<std::string, nlohmann::json> peer;
    if (!no_peer) peer = run_pytorch(peers, threads, batch, &note);

    fmt::print("training throughput, batch {}, {} thread(s), median of {} x {} steps\n", batch,
               threads, reps, steps);
    fmt::print("{:<10} {:>14} {:>16} {:>16} {:>18} {:>8}\n", "model", "dtrain ms/step",
               "dtrain samples/s", "torch ms/step", "torch samples/s", "ratio");
    for (const auto& n : names) {
      const Timing& t = ours[n];
      if (peer.count(n)) {
        double ps = peer[n]["samples_per_s"].get<double>();
        fmt::print("{:<10} {:>14.3f} {:>16.1f} {:>16.3f} {:>18.1f} {:>8.2f}\n", n, t.ms_per_step,
                   t.samples_per_s, peer[n]["ms_per_step"].get<double>(), ps, t.samples_per_s / ps);
      } else {
        fmt::print("{:<10} {:>14.3f} {:>16.1f} {:>16} {:>18} {:>8}\n", n, t.ms_per_step,
                   t.samples_per_s, "-", "-", "-");
      }
    }
    fmt::print("{}\n", note);
    if (lm)
      bench::print_char_lstm_rows(no_peer ? "" : find_torch_python(), threads, steps, reps,
                                  no_peer);
  } catch (const std::exception& e) {
    fmt::print(stderr, "train_throughput: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
