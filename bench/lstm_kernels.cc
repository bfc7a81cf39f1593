// LSTM, embedding, softmax and cross-entropy kernels at the seed-lstm shapes.
//
// Times, per call, dtrain's lstm forward and forward+backward at B=64, T=20, I=H=128
// (the seed-lstm layer), the GEMMs that lower-bound that work (the same calls through
// cpu::gemm, without the cell arithmetic), and the small ops of the model: embedding
// (1000x128, tokens [64,20]) and cross-entropy / softmax on [64,1000]. Protocol as the
// peers' README: 5 warm-up calls, then the median of 5 repetitions of 20 calls.
// When /usr/bin/python3 can import torch, the same LSTM work runs on torch.nn.LSTM in
// the same run and the table gets a dtrain/PyTorch ratio.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "cpu/blas.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/threading.h"

namespace {

using namespace dtrain;

double median_ms(const std::function<void()>& f, int warmup = 5, int reps = 5, int calls = 20) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) f();
    t.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
        calls);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

Tensor random_tensor(const Shape& s, Generator& gen, double scale = 1.0) {
  Tensor t = empty(s);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(gen.uniform(-scale, scale));
  return t;
}

// The PyTorch peer: prints "name ms" lines for the same LSTM work.
const char* kPeerScript = R"PY(
import sys, time
try:
    import torch
except Exception:
    sys.exit(3)
torch.set_num_threads(int(sys.argv[1]))
B, T, I, H = 64, 20, 128, 128
lstm = torch.nn.LSTM(I, H, batch_first=True)
x = torch.randn(B, T, I, requires_grad=True)
dy = torch.randn(B, T, H)
def med(f):
    for _ in range(5): f()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20): f()
        ts.append((time.perf_counter() - t0) / 20 * 1e3)
    return sorted(ts)[2]
def fwd():
    with torch.no_grad(): lstm(x)
def fwd_bwd():
    out, _ = lstm(x)
    out.backward(dy)
print("lstm_fwd", med(fwd))
print("lstm_fwd_bwd", med(fwd_bwd))
)PY";

std::map<std::string, double> run_peer(int threads) {
  std::map<std::string, double> r;
  std::string path = fmt::format("/tmp/dtrain_lstm_peer_{}.py", getpid());
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return r;
  std::fputs(kPeerScript, f);
  std::fclose(f);
  std::string cmd = fmt::format("/usr/bin/python3 {} {} 2>/dev/null", path, threads);
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char name[64];
  double ms;
  while (std::fscanf(p, "%63s %lf", name, &ms) == 2) r[name] = ms;
  pclose(p);
  std::remove(path.c_str());
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LSTM / embedding / softmax / cross-entropy kernels at the seed-lstm shapes"};
  int threads = 1;
  bool peer = true;
  app.add_option("--threads", threads, "intra-op threads (OpenBLAS, oneDNN)");
  app.add_flag("!--no-peer", peer, "skip the PyTorch peer");
  CLI11_PARSE(app, argc, argv);
  set_num_threads(threads);

  const int64_t B = 64, T = 20, I = 128, H = 128, G = 4 * H, V = 1000;
  Generator gen(0);
  const double k = 1.0 / std::sqrt(static_cast<double>(H));
  Tensor x = random_tensor({B, T, I}, gen).set_requires_grad(true);
  LstmWeights w{random_tensor({G, I}, gen, k).set_requires_grad(true),
                random_tensor({G, H}, gen, k).set_requires_grad(true),
                random_tensor({G}, gen, k).set_requires_grad(true),
                random_tensor({G}, gen, k).set_requires_grad(true)};
  Tensor dy = random_tensor({B, T, H}, gen);

  std::vector<std::pair<std::string, double>> rows;
  rows.emplace_back("lstm_fwd", median_ms([&] {
                      NoGradGuard ng;
                      lstm(x, w);
                    }));
  rows.emplace_back("lstm_fwd_bwd", median_ms([&] {
                      LstmResult r = lstm(x, w);
                      run_backward({r.output}, {dy});
                    }));

  // The GEMM floor: the same BLAS calls the kernel makes, nothing else.
  std::vector<float> a(static_cast<size_t>(B * T * G), 0.01f), c(a.size(), 0.0f);
  std::vector<float> wg(static_cast<size_t>(G * std::max(I, H)), 0.01f);
  std::vector<float> xs(static_cast<size_t>(B * T * std::max(I, H)), 0.01f);
  rows.emplace_back("gemm_floor_fwd", median_ms([&] {
                      cpu::gemm(false, true, B * T, G, I, 1.0f, xs.data(), I, wg.data(), I, 0.0f,
                                c.data(), G);
                      for (int64_t t = 0; t < T; ++t) {
                        cpu::gemm(false, true, B, G, H, 1.0f, xs.data(), T * H, wg.data(), H, 1.0f,
                                  c.data() + t * G, T * G);
                      }
                    }));
  rows.emplace_back(
      "gemm_floor_fwd_bwd", median_ms([&] {
        cpu::gemm(false, true, B * T, G, I, 1.0f, xs.data(), I, wg.data(), I, 0.0f, c.data(), G);
        for (int64_t t = 0; t < T; ++t) {
          cpu::gemm(false, true, B, G, H, 1.0f, xs.data(), T * H, wg.data(), H, 1.0f,
                    c.data() + t * G, T * G);
        }
        for (int64_t t = 0; t < T; ++t) {
          cpu::gemm(false, false, B, H, G, 1.0f, a.data() + t * G, T * G, wg.data(), H, 0.0f,
                    xs.data(), H);
        }
        cpu::gemm(true, false, G, I, B * T, 1.0f, a.data(), G, xs.data(), I, 0.0f, wg.data(), I);
        cpu::gemm(true, false, G, H, B * T, 1.0f, a.data(), G, xs.data(), H, 0.0f, wg.data(), H);
        cpu::gemm(false, false, B * T, I, G, 1.0f, a.data(), G, wg.data(), I, 0.0f, c.data(), I);
      }));

  Tensor table = random_tensor({V, I}, gen).set_requires_grad(true);
  Tensor tokens = empty({B, T}, TensorOptions{}.with_dtype(DType::i64));
  for (int64_t i = 0; i < B * T; ++i)
    tokens.data<int64_t>()[i] = static_cast<int64_t>(gen.below(V));
  Tensor demb = random_tensor({B, T, I}, gen);
  rows.emplace_back("embedding_fwd_bwd", median_ms([&] {
                      Tensor e = embedding(table, tokens);
                      run_backward({e}, {demb});
                    }));
  Tensor logits = random_tensor({B, V}, gen, 5.0).set_requires_grad(true);
  Tensor target = empty({B}, TensorOptions{}.with_dtype(DType::i64));
  for (int64_t i = 0; i < B; ++i) target.data<int64_t>()[i] = static_cast<int64_t>(gen.below(V));
  rows.emplace_back("cross_entropy_fwd_bwd",
                    median_ms([&] { cross_entropy(logits, target).backward(); }));
  Tensor dl = random_tensor({B, V}, gen);
  rows.emplace_back("softmax_fwd_bwd",
                    median_ms([&] { run_backward({softmax(logits, 1)}, {dl}); }));

  std::map<std::string, double> pt = peer ? run_peer(threads) : std::map<std::string, double>{};
  fmt::print("# B={} T={} I={} H={} V={}, {} thread(s); ms per call, median of 5x20\n", B, T, I, H,
             V, threads);
  fmt::print("{:<24} {:>10} {:>12} {:>10}\n", "kernel", "dtrain ms", "pytorch ms", "ratio");
  for (const auto& [name, ms] : rows) {
    auto it = pt.find(name);
    if (it != pt.end()) {
      fmt::print("{:<24} {:>10.3f} {:>12.3f} {:>9.2f}x\n", name, ms, it->second, it->second / ms);
    } else {
      fmt::print("{:<24} {:>10.3f} {:>12} {:>10}\n", name, ms, "-", "-");
    }
  }
  if (peer && pt.empty())
    fmt::print("peer: not installed (/usr/bin/python3 cannot import torch)\n");
  fmt::print("ratio = PyTorch time / dtrain time (> 1: dtrain is faster)\n");
  return 0;
}
