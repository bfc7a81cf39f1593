// Test helper: a small GPT trained for kSteps AdamW steps in one process (the oracle)
// and the same run on a ProcessMesh through parallel::GptOnMesh, compared step by step
// (loss within 1e-5 relative) and at the end (every parameter slice within 1e-5).
// Used by the tcp suite (test_gpt_mesh.cc) and the mpi one (test_gpt_mpi.cc).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/parallel/clip.h"
#include "dtrain/parallel/gpt_mesh.h"

namespace dtrain::testing {

inline nn::GptConfig small_gpt() {
  nn::GptConfig c;
  c.vocab_size = 24;
  c.block_size = 8;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_embd = 16;
  c.seed = 42;
  return c;
}

constexpr int kSteps = 20;
constexpr int64_t kBatch = 8;
constexpr double kLr = 3e-3;
constexpr double kTol = 1e-5;  // relative, f32

inline Tensor random_ids(const Shape& shape, int64_t vocab, uint64_t seed) {
  Generator gen(seed);
  Tensor t = empty(shape, TensorOptions().with_dtype(DType::i64));
  for (int64_t i = 0; i < t.numel(); ++i) {
    t.data<int64_t>()[i] = static_cast<int64_t>(gen.below(static_cast<uint64_t>(vocab)));
  }
  return t;
}

inline std::pair<Tensor, Tensor> batch_of(int step, const nn::GptConfig& c) {
  return {random_ids({kBatch, c.block_size}, c.vocab_size, 1000 + step),
          random_ids({kBatch, c.block_size}, c.vocab_size, 2000 + step)};
}

// ||a - b|| / ||b|| (L2 over the tensor): relative to the tensor as a whole.
inline double rel_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  Tensor x = a.contiguous(), y = b.contiguous();
  double diff = 0, scale = 1e-30;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double d = double(x.data<float>()[i]) - y.data<float>()[i];
    diff += d * d;
    scale += double(y.data<float>()[i]) * y.data<float>()[i];
  }
  return std::sqrt(diff / scale);
}

// This rank's slice of a full tensor: part `rank` of `parts` along dim (-1: all).
inline Tensor slice_of(const Tensor& full, int dim, int rank, int parts) {
  if (dim < 0 || parts == 1) return full;
  const int64_t n = full.size(dim) / parts;
  return full.narrow(dim, rank * n, n).contiguous();
}

struct OracleRun {
  std::vector<double> losses;
  std::vector<double> grad_norms;  // before clipping (0 when not clipped)
  nn::StateDict params;
  double eval_loss = 0;  // the trained model's loss on eval_batch(), without grad
};

// A batch no step trained on, evaluated after the run.
inline std::pair<Tensor, Tensor> eval_batch() { return batch_of(99, small_gpt()); }

// One process, plain AdamW (nanoGPT's decay groups), optional clipping.
inline OracleRun oracle_run(double clip) {
  nn::Gpt model(small_gpt());
  optim::AdamWOptions o = optim::AdamWOptions(kLr).betas(0.9, 0.95);
  optim::AdamW decay(model.decay_parameters(), o.weight_decay(0.1));
  optim::AdamW no_decay(model.no_decay_parameters(), o.weight_decay(0.0));
  OracleRun run;
  for (int s = 0; s < kSteps; ++s) {
    auto [x, y] = batch_of(s, model.config());
    model.zero_grad();
    Tensor loss = model.loss(x, y);
    loss.backward();
    if (clip > 0) run.grad_norms.push_back(parallel::clip_grad_norm(model.parameters(), clip));
    decay.step();
    no_decay.step();
    run.losses.push_back(loss.item());
  }
  run.params = model.state_dict();
  auto [ex, ey] = eval_batch();
  NoGradGuard no_grad;
  run.eval_loss = model.loss(ex, ey).item();
  return run;
}

// Steps [from, to) of the oracle's run on this rank's dp rows, each loss checked.
inline void follow_steps(const OracleRun& ref, parallel::GptOnMesh& run, int from, int to) {
  parallel::ProcessMesh& mesh = run.mesh();
  const int64_t rows = kBatch / mesh.shape().dp, r0 = mesh.coord().dp * rows;
  for (int s = from; s < to; ++s) {
    auto [x, y] = batch_of(s, small_gpt());
    const double loss =
        run.train_step(x.narrow(0, r0, rows).contiguous(), y.narrow(0, r0, rows).contiguous(), kLr);
    const double want = ref.losses[static_cast<size_t>(s)];
    ASSERT_NEAR(loss, want, 1e-5 * want) << "step " << s << " on rank " << mesh.rank();
  }
}

// Every parameter slice of `run` against the oracle's final parameters.
inline void expect_final_params(const OracleRun& ref, parallel::GptOnMesh& run,
                                const parallel::GptMeshOptions& options) {
  parallel::ProcessMesh& mesh = run.mesh();
  const nn::Gpt& model = *run.model();
  for (const auto& [name, t] : run.parameter_state()) {
    const nn::ShardSpec& spec = model.shard_specs().at(name);
    Tensor want = slice_of(ref.params.at(name), spec.dim, spec.rank, spec.parts);
    EXPECT_LT(rel_diff(t, want), kTol)
        << name << " on rank " << mesh.rank() << " of " << mesh.shape().str() << " zero "
        << options.zero << " clip " << options.clip;
  }
}

// On this rank of `mesh`: kSteps through GptOnMesh, compared with `ref`.
inline void expect_mesh_follows(const OracleRun& ref, parallel::ProcessMesh& mesh,
                                const parallel::GptMeshOptions& options) {
  parallel::GptOnMesh run(mesh, small_gpt(), options);
  follow_steps(ref, run, 0, kSteps);
  expect_final_params(ref, run, options);
  auto [ex, ey] = eval_batch();  // evaluation through the same splits (ZeRO-3 gathers)
  EXPECT_NEAR(run.eval_loss(ex, ey), ref.eval_loss, kTol * ref.eval_loss)
      << "eval on rank " << mesh.rank() << " of " << mesh.shape().str() << " zero " << options.zero;
}

}  // namespace dtrain::testing
