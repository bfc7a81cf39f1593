// `dtrain bench gpt`: GPT training throughput (tokens/s) and model FLOPs utilisation
// for 1 rank and for each mesh of --nproc ranks (default 8: dp, dp x tp, tp, ZeRO).
//
// Each configuration is a real `dtrain launch --nproc N -- dtrain train --model gpt`
// run of --steps steps on the fortunes corpus (the gpt-small shape of
// ../shared/bench/peers: context 128, 4 blocks of d 256 with 4 heads, global batch 16);
// its summary line gives tokens/s and model GFLOP/s (PaLM's 6N + 12 L T C per token,
// nn::GptConfig::flops_per_token). MFU = model FLOP/s / this machine's peak, the peak
// being one thread's measured f32 GEMM rate (engine matmul, 512^3) times the cores.
// With more ranks than cores the ranks are oversubscribed (said in the table), so MFU
// there measures the cost of the split, not of a GPU cluster. Where PyTorch is installed
// the peer pytorch_gpt.py runs the same model side by side (1 thread).
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "cmd_bench_collectives.h"
#include "commands.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/threading.h"
#include "progress.h"

namespace dtrain::cli {

namespace {

struct GptBenchOptions {
  int nproc = 8;
  int64_t steps = 20;
  std::vector<std::string> meshes = {
      "dp=8",           "dp=4,tp=2",           "dp=2,tp=4",  "dp=4,pp=2",
      "dp=2,tp=2,pp=2", "dp=4,tp=2+zero1",     "dp=8+zero1", "dp=8+zero2",
      "dp=8+zero3",     "dp=2,tp=2,pp=2+zero1"};
  std::string peers_dir = std::string(DTRAIN_SOURCE_DIR) + "/../shared/bench/peers";
};

// One thread's f32 GEMM rate in GFLOP/s (median of 5).
double gemm_gflops() {
  set_num_threads(1);
  const int64_t n = 512;
  Tensor a = ones({n, n}), b = ones({n, n});
  std::vector<double> rates;
  for (int rep = 0; rep < 6; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    Tensor c = matmul(a, b);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep > 0) rates.push_back(2.0 * n * n * n / s / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

struct Row {
  std::string mesh;
  int ranks = 1;
  double tokens_per_s = 0, gflops = 0;
  std::string note;
};

Row run_config(const GptBenchOptions& o, const std::string& spec, int ranks) {
  Row row;
  row.mesh = spec;
  row.ranks = ranks;
  const size_t plus = spec.find("+zero");
  const std::string mesh = spec.substr(0, plus);
  const std::string zero = plus == std::string::npos ? "0" : spec.substr(plus + 5);
  const std::string self = bench_detail::self_exe();
  const std::string train = fmt::format(
      "{} train --model gpt --parallel {} --zero {} --max-steps {} --batch 16 --context 128 "
      "--n-embd 256 --n-layer 4 --n-head 4 --no-progress --log-every 100000 --metrics /dev/null",
      self, mesh, zero, o.steps);
  const std::string cmd = ranks == 1
                              ? train + " 2>&1"
                              : fmt::format("{} launch --nproc {} -- {} 2>&1", self, ranks, train);
  int st = 0;
  const std::string out = bench_detail::run_capture(cmd, &st);
  std::smatch m;
  const std::regex line("\\(([0-9.]+) tokens/s, ([0-9.]+) GFLOP/s model\\)");
  if (st != 0 || !std::regex_search(out, m, line)) {
    const size_t err = out.rfind("error: ");
    row.note = fmt::format(
        "failed (status {}): {}", st,
        err == std::string::npos ? "no summary line" : out.substr(err, out.find('\n', err) - err));
    return row;
  }
  row.tokens_per_s = std::stod(m[1]);
  row.gflops = std::stod(m[2]);
  return row;
}

std::optional<double> peer_tokens_per_s(const GptBenchOptions& o, std::string* note) {
  int st = 0;
  bench_detail::run_capture("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1", &st);
  if (st != 0) {
    *note = "pytorch peer: not installed (apt-get install python3-torch), skipped";
    return std::nullopt;
  }
  std::string text = bench_detail::run_capture(
      fmt::format("/usr/bin/python3 {}/pytorch_gpt.py --threads 1 2>/dev/null", o.peers_dir), &st);
  for (const auto& j : bench_detail::json_lines(text)) {
    if (j.contains("tokens_per_s")) return j["tokens_per_s"].get<double>();
  }
  *note = fmt::format("pytorch peer: no tokens_per_s in its output (status {})", st);
  return std::nullopt;
}

int run_gpt_bench(const GptBenchOptions& o) {
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const double peak = gemm_gflops() * cores;
  fmt::print("# dtrain bench gpt: gpt-small (context 128, 4 x d256, batch 16), {} steps per run\n",
             o.steps);
  fmt::print("# peak {:.1f} GFLOP/s = measured 1-thread f32 GEMM x {} cores\n", peak, cores);
  const ProgressFn bar = progress_reporter({.label = "bench gpt", .unit = "runs"});
  const auto runs = static_cast<int64_t>(o.meshes.size()) + 1;
  if (bar) bar(0, runs);
  std::vector<Row> rows{run_config(o, "dp=1", 1)};
  if (bar) bar(1, runs);
  for (const auto& m : o.meshes) {
    rows.push_back(run_config(o, m, o.nproc));
    if (bar) bar(static_cast<int64_t>(rows.size()), runs);
  }
  fmt::print("{:>20} {:>6} {:>12} {:>14} {:>7} {:>9}  {}\n", "mesh", "ranks", "tokens/s",
             "model GFLOP/s", "MFU", "vs 1 rank", "note");
  for (const Row& r : rows) {
    std::string note = r.note;
    if (note.empty() && r.ranks > static_cast<int>(cores)) {
      note = fmt::format("oversubscribed: {} ranks on {} cores", r.ranks, cores);
    }
    fmt::print("{:>20} {:>6} {:>12.0f} {:>14.2f} {:>6.1f}% {:>8.2f}x  {}\n", r.mesh, r.ranks,
               r.tokens_per_s, r.gflops, 100.0 * r.gflops / peak,
               rows[0].tokens_per_s > 0 ? r.tokens_per_s / rows[0].tokens_per_s : 0.0, note);
  }
  std::string note;
  if (std::optional<double> peer = peer_tokens_per_s(o, &note)) {
    fmt::print("pytorch (1 thread): {:.0f} tokens/s; dtrain 1 rank / pytorch = {:.2f}x\n", *peer,
               rows[0].tokens_per_s / *peer);
  } else {
    fmt::print("{}\n", note);
  }
  return 0;
}

}  // namespace

std::function<std::optional<int>()> add_gpt_bench(CLI::App& bench) {
  auto o = std::make_shared<GptBenchOptions>();
  CLI::App* g = bench.add_subcommand(
      "gpt", "GPT tokens/s and model FLOPs utilisation for 1 rank and each mesh of --nproc");
  g->add_option("--nproc", o->nproc, "Ranks of the meshes")
      ->capture_default_str()
      ->check(kPositive);
  g->add_option("--steps", o->steps, "Steps per run")->capture_default_str()->check(kPositive);
  g->add_option("--meshes", o->meshes, "Meshes (dp=..,tp=..[+zeroK])")->capture_default_str();
  return [o, g]() -> std::optional<int> {
    if (!g->parsed()) return std::nullopt;
    return run_gpt_bench(*o);
  };
}

}  // namespace dtrain::cli
