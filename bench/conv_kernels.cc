// conv_kernels: milliseconds per call of every convolution and max-pooling kernel
// on the layers of the demo CNN (MNIST: Conv(1,32,3) Pool Conv(32,64,3) Pool
// Conv(64,64,3)), one thread, to choose the default kernels in ops_conv.cc.
//
// Each cell is the best of --trials timings of --reps back-to-back calls (the
// minimum filters out noise from other processes on a shared machine). The last
// table adds the passes one training step runs (no input gradient for the first
// conv) per variant. These tables call the cpu:: kernels directly on raw buffers:
// no autograd, no tensor allocation inside the timed region except the kernels'
// own scratch. The final line runs the model's conv/ReLU/pool stack through the
// public ops with autograd (forward + backward, default kernels), to show what the
// op layer adds on top of the kernels.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "../engine/src/cpu/conv.h"
#include "../engine/src/ops_conv.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/random.h"
#include "dtrain/engine/threading.h"

namespace {

using dtrain::cpu::ConvGeom;
using dtrain::cpu::OneDnnLayout;
using dtrain::cpu::PoolGeom;

struct Timing {
  int reps = 10;
  int trials = 5;
};

double ms_per_call(const Timing& t, const std::function<void()>& f) {
  f();  // warm-up: primitive creation, scratch allocation, caches
  double best = 1e30;
  for (int trial = 0; trial < t.trials; ++trial) {
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < t.reps; ++i) f();
    std::chrono::duration<double, std::milli> d = std::chrono::steady_clock::now() - start;
    best = std::min(best, d.count() / t.reps);
  }
  return best;
}

std::vector<float> random_buffer(int64_t n, dtrain::Generator& gen) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(gen.normal());
  return v;
}

// The buffers of one conv layer: x, weight, bias, y / dy, dx, dweight, dbias.
struct ConvBuffers {
  std::vector<float> x, w, b, y, dy, dx, dw, db;
  ConvBuffers(const ConvGeom& g, dtrain::Generator& gen)
      : x(random_buffer(g.n * g.c * g.h * g.w, gen)),
        w(random_buffer(g.o * g.patch(), gen)),
        b(random_buffer(g.o, gen)),
        y(static_cast<size_t>(g.n * g.o * g.pixels())),
        dy(random_buffer(g.n * g.o * g.pixels(), gen)),
        dx(x.size()),
        dw(w.size()),
        db(b.size()) {}
};

struct ConvVariant {
  std::string name;
  std::function<void(const ConvGeom&, ConvBuffers&)> fwd, bwd_data, bwd_weights;
};

ConvVariant im2col_variant(int64_t min_cols) {
  std::string name = min_cols == 1                    ? "im2col per image"
                     : min_cols >= (int64_t{1} << 40) ? "im2col whole batch"
                                                      : fmt::format("im2col >={} cols", min_cols);
  return {name,
          [=](const ConvGeom& g, ConvBuffers& m) {
            dtrain::cpu::conv2d_forward_im2col(g, m.x.data(), m.w.data(), m.b.data(), m.y.data(),
                                               min_cols);
          },
          [=](const ConvGeom& g, ConvBuffers& m) {
            dtrain::cpu::conv2d_backward_data_im2col(g, m.dy.data(), m.w.data(), m.dx.data(),
                                                     min_cols);
          },
          [=](const ConvGeom& g, ConvBuffers& m) {
            dtrain::cpu::conv2d_backward_weights_im2col(g, m.x.data(), m.dy.data(), m.dw.data(),
                                                        m.db.data(), min_cols);
          }};
}

ConvVariant onednn_variant(OneDnnLayout layout) {
  return {layout == OneDnnLayout::kPlain ? "onednn plain nchw" : "onednn blocked+reorder",
          [=](const ConvGeom& g, ConvBuffers& m) {
            dtrain::cpu::conv2d_forward_onednn(g, m.x.data(), m.w.data(), m.b.data(), m.y.data(),
                                               layout);
          },
          [=](const ConvGeom& g, ConvBuffers& m) {
            dtrain::cpu::conv2d_backward_data_onednn(g, m.dy.data(), m.w.data(), m.dx.data(),
                                                     layout);
          },
          [=](const ConvGeom& g, ConvBuffers& m) {
            dtrain::cpu::conv2d_backward_weights_onednn(g, m.x.data(), m.dy.data(), m.dw.data(),
                                                        m.db.data(), layout);
          }};
}

struct ConvLayer {
  std::string name;
  ConvGeom g;
  bool needs_dx;  // the first layer's input never requires grad
};

void conv_table(const Timing& t, const std::vector<ConvLayer>& layers,
                const std::vector<ConvVariant>& variants) {
  dtrain::Generator gen(42);
  std::vector<double> step_ms(variants.size(), 0.0);
  fmt::print("{:<8} {:<24} {:>9} {:>9} {:>9} {:>9} {:>8}\n", "layer", "variant", "fwd", "bwd_data",
             "bwd_wgt", "step", "GFLOP/s");
  for (const ConvLayer& layer : layers) {
    ConvBuffers m(layer.g, gen);
    double flops = 2.0 * layer.g.n * layer.g.o * layer.g.pixels() * layer.g.patch();
    for (size_t v = 0; v < variants.size(); ++v) {
      const ConvVariant& var = variants[v];
      double f = ms_per_call(t, [&] { var.fwd(layer.g, m); });
      double bd = ms_per_call(t, [&] { var.bwd_data(layer.g, m); });
      double bw = ms_per_call(t, [&] { var.bwd_weights(layer.g, m); });
      double step = f + bw + (layer.needs_dx ? bd : 0.0);
      double step_flops = flops * (layer.needs_dx ? 3 : 2);
      step_ms[v] += step;
      fmt::print("{:<8} {:<24} {:>9.3f} {:>9.3f} {:>9.3f} {:>9.3f} {:>8.1f}\n", layer.name,
                 var.name, f, bd, bw, step, step_flops / step / 1e6);
    }
  }
  fmt::print("\nall convs, one training step (fwd + bwd_weights + bwd_data where needed):\n");
  for (size_t v = 0; v < variants.size(); ++v) {
    fmt::print("  {:<24} {:>9.3f} ms\n", variants[v].name, step_ms[v]);
  }
}

void pool_table(const Timing& t, const std::vector<std::pair<std::string, PoolGeom>>& layers) {
  dtrain::Generator gen(43);
  fmt::print("\n{:<8} {:<24} {:>9} {:>9} {:>9}\n", "layer", "variant", "fwd", "bwd", "step");
  double direct_total = 0, onednn_total = 0;
  for (const auto& [name, g] : layers) {
    std::vector<float> x = random_buffer(g.planes() * g.h * g.w, gen);
    std::vector<float> dy = random_buffer(g.planes() * g.oh * g.ow, gen);
    std::vector<float> y(dy.size()), dx(x.size());
    std::vector<int32_t> argmax(dy.size());
    std::vector<unsigned char> ws(dtrain::cpu::max_pool2d_workspace_bytes_onednn(g));
    double df = ms_per_call(
        t, [&] { dtrain::cpu::max_pool2d_forward_ref(g, x.data(), y.data(), argmax.data()); });
    double db = ms_per_call(
        t, [&] { dtrain::cpu::max_pool2d_backward_ref(g, dy.data(), argmax.data(), dx.data()); });
    double of = ms_per_call(
        t, [&] { dtrain::cpu::max_pool2d_forward_onednn(g, x.data(), y.data(), ws.data()); });
    double ob = ms_per_call(
        t, [&] { dtrain::cpu::max_pool2d_backward_onednn(g, dy.data(), ws.data(), dx.data()); });
    fmt::print("{:<8} {:<24} {:>9.3f} {:>9.3f} {:>9.3f}\n", name, "direct (reference)", df, db,
               df + db);
    fmt::print("{:<8} {:<24} {:>9.3f} {:>9.3f} {:>9.3f}\n", name, "onednn", of, ob, of + ob);
    direct_total += df + db;
    onednn_total += of + ob;
  }
  fmt::print("\nall pooling, one training step: direct {:.3f} ms, onednn {:.3f} ms\n", direct_total,
             onednn_total);
}

// Conv(1,32,3) ReLU Pool(2) Conv(32,64,3) ReLU Pool(2) Conv(64,64,3) ReLU, forward and
// backward through autograd with the default kernels.
void op_stack(const Timing& t, int64_t batch) {
  using dtrain::Tensor;
  dtrain::Generator gen(44);
  auto param = [&](dtrain::Shape shape, double scale) {
    Tensor p = dtrain::empty(shape);
    std::vector<float> v = random_buffer(p.numel(), gen);
    for (float& e : v) e *= static_cast<float>(scale);
    p.copy_(dtrain::from_vector<float>(v, shape));
    return p.set_requires_grad(true);
  };
  Tensor x = dtrain::from_vector<float>(random_buffer(batch * 28 * 28, gen), {batch, 1, 28, 28});
  Tensor w1 = param({32, 1, 3, 3}, 0.3), b1 = param({32}, 0.1);
  Tensor w2 = param({64, 32, 3, 3}, 0.06), b2 = param({64}, 0.1);
  Tensor w3 = param({64, 64, 3, 3}, 0.04), b3 = param({64}, 0.1);
  double ms = ms_per_call(t, [&] {
    Tensor h = dtrain::max_pool2d(dtrain::relu(dtrain::conv2d(x, w1, b1)), {.kernel = 2});
    h = dtrain::max_pool2d(dtrain::relu(dtrain::conv2d(h, w2, b2)), {.kernel = 2});
    h = dtrain::relu(dtrain::conv2d(h, w3, b3));
    dtrain::sum(h).backward();
  });
  fmt::print("\nops + autograd, conv/relu/pool stack fwd+bwd (conv {}, pool {}): {:.3f} ms\n",
             dtrain::conv_algo_name(dtrain::default_conv_algo(dtrain::DType::f32)),
             dtrain::pool_algo_name(dtrain::default_pool_algo(dtrain::DType::f32)), ms);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ms per call of the conv2d / max_pool2d kernels on the demo CNN's layers"};
  Timing t;
  int64_t batch = 64;
  int threads = 1;
  app.add_option("--batch", batch, "batch size");
  app.add_option("--threads", threads, "OpenBLAS / oneDNN threads");
  app.add_option("--reps", t.reps, "calls per timing");
  app.add_option("--trials", t.trials, "timings per cell (the best is reported)");
  CLI11_PARSE(app, argc, argv);
  dtrain::set_num_threads(threads);
  using dtrain::cpu::make_conv_geom;
  using dtrain::cpu::make_pool_geom;
  std::vector<ConvLayer> convs = {
      {"conv1", make_conv_geom(batch, 1, 28, 28, 32, 3, 3, 1, 0), false},
      {"conv2", make_conv_geom(batch, 32, 13, 13, 64, 3, 3, 1, 0), true},
      {"conv3", make_conv_geom(batch, 64, 5, 5, 64, 3, 3, 1, 0), true},
  };
  std::vector<ConvVariant> variants = {
      im2col_variant(1),
      im2col_variant(dtrain::cpu::kIm2colMinCols),
      im2col_variant(2048),
      im2col_variant(int64_t{1} << 40),
      onednn_variant(OneDnnLayout::kPlain),
      onednn_variant(OneDnnLayout::kBlocked),
  };
  fmt::print("batch {}, {} thread(s), ms per call (best of {} x {} calls)\n\n", batch, threads,
             t.trials, t.reps);
  conv_table(t, convs, variants);
  pool_table(t, {{"pool1", make_pool_geom(batch, 32, 26, 26, 2, 2, 0)},
                 {"pool2", make_pool_geom(batch, 64, 11, 11, 2, 2, 0)}});
  op_stack(t, batch);
  return 0;
}
