// Attention, layer norm and GELU kernels at GPT-2-small shapes (Dh 64, C 768).
//
// Times, per call, scaled_dot_product_attention forward and forward+backward (causal)
// against the naive composition softmax(q k^T / sqrt(Dh) + mask) v built from matmul
// and softmax, measured in the same run on the same inputs (the peer: what a model
// would run without the fused op; it keeps the [B*H, T, T] probabilities alive between
// forward and backward), and layer_norm / gelu forward+backward on [B*T, 768].
// Protocol: 2 warm-up calls, then the median of 5 repetitions of `--calls` calls.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/threading.h"

namespace {

using namespace dtrain;

double median_ms(const std::function<void()>& f, int calls) {
  for (int i = 0; i < 2; ++i) f();
  std::vector<double> t;
  for (int r = 0; r < 5; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) f();
    t.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
        calls);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

Tensor random_tensor(const Shape& s, Generator& gen) {
  Tensor t = empty(s);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(gen.uniform(-1, 1));
  return t;
}

Tensor naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask) {
  const Shape& s = q.shape();
  const int64_t bh = s[0] * s[1], t = s[2], dh = s[3];
  Tensor q3 = q.reshape({bh, t, dh}), k3 = k.reshape({bh, t, dh}), v3 = v.reshape({bh, t, dh});
  Tensor scores = matmul(q3, k3.transpose(1, 2)) * (1.0 / std::sqrt(static_cast<double>(dh)));
  return matmul(softmax(scores + mask, -1), v3).reshape(s);
}

Tensor causal_mask(int64_t t) {
  std::vector<float> m(static_cast<size_t>(t * t), 0.f);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = i + 1; j < t; ++j) m[static_cast<size_t>(i * t + j)] = -INFINITY;
  }
  return from_vector(m, {t, t});
}

void row(const char* name, double fused, double naive) {
  fmt::print("{:<34} {:>10.3f} {:>10.3f} {:>8.2f}x\n", name, fused, naive, naive / fused);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"attention / layer_norm / gelu kernels at GPT-2-small shapes"};
  int64_t B = 4, T = 256, H = 12, Dh = 64;
  int threads = 1, calls = 5;
  app.add_option("--batch", B, "B");
  app.add_option("--seq", T, "T");
  app.add_option("--heads", H, "H");
  app.add_option("--head-dim", Dh, "Dh");
  app.add_option("--threads", threads, "intra-op threads (set_num_threads)");
  app.add_option("--calls", calls, "calls per repetition");
  CLI11_PARSE(app, argc, argv);
  set_num_threads(threads);
  Generator gen(1);
  const Shape s{B, H, T, Dh};
  Tensor q = random_tensor(s, gen), k = random_tensor(s, gen), v = random_tensor(s, gen);
  Tensor gy = random_tensor(s, gen), mask = causal_mask(T);
  for (Tensor* t : {&q, &k, &v}) t->set_requires_grad(true);
  auto fused_fwd = [&] {
    NoGradGuard ng;
    scaled_dot_product_attention(q, k, v, true);
  };
  auto naive_fwd = [&] {
    NoGradGuard ng;
    naive_attention(q, k, v, mask);
  };
  auto fused_fb = [&] { grad({scaled_dot_product_attention(q, k, v, true)}, {q, k, v}, {gy}); };
  auto naive_fb = [&] { grad({naive_attention(q, k, v, mask)}, {q, k, v}, {gy}); };

  const int64_t C = 768, rows = B * T;
  Tensor x = random_tensor({rows, C}, gen), w = random_tensor({C}, gen),
         b = random_tensor({C}, gen), gx = random_tensor({rows, C}, gen);
  for (Tensor* t : {&x, &w, &b}) t->set_requires_grad(true);
  auto ln_fb = [&] { grad({layer_norm(x, w, b)}, {x, w, b}, {gx}); };
  auto ln_naive = [&] {  // the composition from mean/sub/mul
    Tensor m = mean(x, {1}, true);
    Tensor c = x - m;
    Tensor var = mean(c * c, {1}, true);
    Tensor y = c / exp(log(var + 1e-5) * 0.5) * w + b;
    grad({y}, {x, w, b}, {gx});
  };
  auto gelu_fb = [&] { grad({gelu(x)}, {x}, {gx}); };
  auto gelu_naive = [&] {
    Tensor u = (x + x * x * x * 0.044715) * std::sqrt(2.0 / M_PI);
    grad({x * 0.5 * (tanh(u) + 1.0)}, {x}, {gx});
  };

  fmt::print("# q,k,v [{},{},{},{}] causal; layer_norm/gelu [{},{}]; {} thread(s); ms per call\n",
             B, H, T, Dh, rows, C, threads);
  fmt::print("{:<34} {:>10} {:>10} {:>9}\n", "kernel", "fused ms", "naive ms", "ratio");
  row("sdpa forward", median_ms(fused_fwd, calls), median_ms(naive_fwd, calls));
  row("sdpa forward+backward", median_ms(fused_fb, calls), median_ms(naive_fb, calls));
  row("layer_norm forward+backward", median_ms(ln_fb, calls), median_ms(ln_naive, calls));
  row("gelu forward+backward", median_ms(gelu_fb, calls), median_ms(gelu_naive, calls));
  fmt::print("ratio = naive composition time / fused op time (> 1: the fused op is faster)\n");
  return 0;
}
