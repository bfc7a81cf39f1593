// Tensor parallelism and the process mesh, over the real tcp backend (ranks are
// threads of this process meeting through a MemoryStore).
//
// Oracles: the plain engine ops and a 1-process GPT. Each tensor-parallel piece
// (f/g, the column/row linears, the vocab-parallel embedding and cross-entropy) must
// give the values and gradients of its unsplit counterpart; a GPT trained on a
// dp x tp mesh must follow the 1-process run step by step (losses and final
// parameters within 1e-5 relative, f32), and each rank must hold exactly its share.
#include <gtest/gtest.h>

#include "rank_threads.h"

#include <cmath>
#include <functional>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/parallel/ddp.h"
#include "dtrain/parallel/mesh.h"
#include "dtrain/parallel/tensor_parallel.h"

namespace {

using dtrain::Generator;
using dtrain::Tensor;
using dtrain::comm::Communicator;
namespace nn = dtrain::nn;
namespace par = dtrain::parallel;

constexpr auto kTimeout = std::chrono::seconds(30);

// Runs fn(world_comm) on `world` threads over tcp (rank_threads.h).
void run_ranks(int world, const std::function<void(Communicator&)>& fn) {
  dtrain::testing::run_tcp_ranks(world, "tp-test", [&](int, Communicator& c) { fn(c); });
}

Tensor randn(const dtrain::Shape& shape, uint64_t seed) {
  Generator gen(seed);
  Tensor t = dtrain::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(gen.normal());
  return t;
}

Tensor random_ids(const dtrain::Shape& shape, int64_t vocab, uint64_t seed) {
  Generator gen(seed);
  Tensor t = dtrain::empty(shape, dtrain::TensorOptions().with_dtype(dtrain::DType::i64));
  for (int64_t i = 0; i < t.numel(); ++i) {
    t.data<int64_t>()[i] = static_cast<int64_t>(gen.below(static_cast<uint64_t>(vocab)));
  }
  return t;
}

// max |a - b| / max(1, max |b|): relative to the tensor's scale.
double rel_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  Tensor x = a.contiguous(), y = b.contiguous();
  double diff = 0, scale = 1e-12;
  for (int64_t i = 0; i < x.numel(); ++i) {
    diff = std::max(diff, std::abs(double(x.data<float>()[i]) - y.data<float>()[i]));
    scale = std::max(scale, std::abs(double(y.data<float>()[i])));
  }
  return diff / scale;
}

Tensor slice(const Tensor& full, int dim, int rank, int parts) {
  if (dim < 0 || parts == 1) return full;
  const int64_t n = full.size(dim) / parts;
  return full.narrow(dim, rank * n, n).contiguous();
}

// ---------------------------------------------------------------- mesh

TEST(Mesh, ParsesAndRefuses) {
  par::MeshShape s = par::MeshShape::parse("tp=2,dp=3");
  EXPECT_EQ(s.dp, 3);
  EXPECT_EQ(s.tp, 2);
  EXPECT_EQ(s.pp, 1);
  EXPECT_EQ(s.str(), "dp=3,tp=2,pp=1");
  EXPECT_THROW(par::MeshShape::parse("dp=0"), dtrain::InvalidArgument);
  EXPECT_THROW(par::MeshShape::parse("xp=2"), dtrain::InvalidArgument);
  EXPECT_THROW(par::MeshShape::parse("dp=2,dp=2"), dtrain::InvalidArgument);
  try {
    par::MeshShape::parse("dp=2,tp=2,pp=2").check_world(6);
    FAIL() << "a mesh of 8 accepted for 6 ranks";
  } catch (const dtrain::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("2 x 2 x 2 = 8 ranks, the world has 6"),
              std::string::npos)
        << e.what();
  }
}

TEST(Mesh, TpIsFastestThenPpThenDp) {
  par::MeshShape s{2, 2, 2};
  for (int r = 0; r < 8; ++r) {
    par::MeshCoord c = par::mesh_coord(s, r);
    EXPECT_EQ(c.tp, r % 2);
    EXPECT_EQ(c.pp, (r / 2) % 2);
    EXPECT_EQ(c.dp, r / 4);
    EXPECT_EQ(par::mesh_rank(s, c), r);
  }
}

// Each group holds the ranks the layout says, in order: an all-gather of world ranks.
TEST(Mesh, GroupsHoldTheRightRanks) {
  const par::MeshShape s{2, 2, 2};
  run_ranks(8, [&](Communicator& world) {
    par::ProcessMesh mesh(world, s);
    const par::MeshCoord c = mesh.coord();
    auto members = [&](Communicator& g) {
      std::vector<int64_t> out(static_cast<size_t>(g.size()));
      int64_t me = world.rank();
      g.allgather(&me, out.data(), 1, dtrain::DType::i64);
      return out;
    };
    auto at = [&](int dp, int pp, int tp) { return int64_t{par::mesh_rank(s, {dp, pp, tp})}; };
    EXPECT_EQ(members(mesh.tp()), (std::vector<int64_t>{at(c.dp, c.pp, 0), at(c.dp, c.pp, 1)}));
    EXPECT_EQ(members(mesh.pp()), (std::vector<int64_t>{at(c.dp, 0, c.tp), at(c.dp, 1, c.tp)}));
    EXPECT_EQ(members(mesh.dp()), (std::vector<int64_t>{at(0, c.pp, c.tp), at(1, c.pp, c.tp)}));
    ASSERT_NE(mesh.embedding(), nullptr);  // pp = 2: both stages are an end
    EXPECT_EQ(members(*mesh.embedding()), members(mesh.pp()));
  });
}

// ---------------------------------------------------------------- tp pieces

// Column then row parallel linear == Linear then Linear, values and gradients.
TEST(TensorParallel, ColumnRowPairMatchesPlainLinears) {
  const int64_t in = 6, hidden = 8, out = 5;
  Tensor x = randn({3, in}, 7);
  Generator g1(11);
  nn::Linear l1(in, hidden, g1), l2(hidden, out, g1);
  Tensor ref = dtrain::tanh(l2.forward(dtrain::tanh(l1.forward(x.clone().set_requires_grad(true)))));
  dtrain::sum(ref * ref).backward();
  run_ranks(2, [&](Communicator& tp) {
    Generator g2(11);
    par::ColumnParallelLinear c(in, hidden, tp, g2);
    par::RowParallelLinear r(hidden, out, tp, g2);
    Tensor y = dtrain::tanh(r.forward(dtrain::tanh(c.forward(x))));
    EXPECT_LT(rel_diff(y, ref), 1e-6);
    dtrain::sum(y * y).backward();
    EXPECT_LT(rel_diff(c.weight.grad(), slice(l1.weight.grad(), 0, tp.rank(), 2)), 1e-5);
    EXPECT_LT(rel_diff(c.bias.grad(), slice(l1.bias.grad(), 0, tp.rank(), 2)), 1e-5);
    EXPECT_LT(rel_diff(r.weight.grad(), slice(l2.weight.grad(), 1, tp.rank(), 2)), 1e-5);
    EXPECT_LT(rel_diff(r.bias.grad(), l2.bias.grad()), 1e-5);
  });
}

TEST(TensorParallel, VocabParallelEmbeddingAndCrossEntropy) {
  const int64_t vocab = 12, dim = 4, n = 10;
  Tensor w = randn({vocab, dim}, 3).set_requires_grad(true);
  Tensor ids = random_ids({n}, vocab, 5), target = random_ids({n}, vocab, 6);
  Tensor head = randn({dim, vocab}, 4).set_requires_grad(true);
  Tensor ref = dtrain::cross_entropy(dtrain::matmul(dtrain::embedding(w, ids), head), target);
  ref.backward();
  for (int tp_size : {2, 3}) {
    run_ranks(tp_size, [&](Communicator& tp) {
      const int r = tp.rank();
      Tensor ws = slice(w.detach(), 0, r, tp_size).clone().set_requires_grad(true);
      Tensor hs = slice(head.detach(), 1, r, tp_size).clone().set_requires_grad(true);
      Tensor e = par::vocab_parallel_embedding(ws, ids, tp);
      Tensor logits = dtrain::matmul(par::copy_to_tp_region(e, tp), hs);
      Tensor loss = par::vocab_parallel_cross_entropy(logits, target, tp);
      EXPECT_NEAR(loss.item(), ref.item(), 1e-5 * std::abs(ref.item()));
      loss.backward();
      EXPECT_LT(rel_diff(ws.grad(), slice(w.grad(), 0, r, tp_size)), 1e-5);
      EXPECT_LT(rel_diff(hs.grad(), slice(head.grad(), 1, r, tp_size)), 1e-5);
    });
  }
}

TEST(TensorParallel, BadIdsAndShapesAreRefused) {
  run_ranks(2, [&](Communicator& tp) {
    Tensor ws = randn({3, 2}, 1);
    Tensor bad = dtrain::from_vector<int64_t>({7}, {1});  // vocab is 6
    EXPECT_THROW(par::vocab_parallel_embedding(ws, bad, tp), dtrain::InvalidArgument);
    EXPECT_THROW(par::vocab_parallel_cross_entropy(randn({2, 3}, 1), bad, tp), dtrain::ShapeError);
  });
  nn::GptConfig cfg;
  cfg.n_head = 4;
  cfg.vocab_size = 10;
  EXPECT_THROW(cfg.check(3), dtrain::InvalidArgument);  // 3 does not divide 4 heads
  EXPECT_THROW(cfg.check(4), dtrain::InvalidArgument);  // 4 does not divide vocab 10
}

// ---------------------------------------------------------------- GPT on a mesh

nn::GptConfig small_gpt() {
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
constexpr int64_t kBatch = 4;

struct RunResult {
  std::vector<double> losses;
  nn::StateDict params;  // this rank's (sliced) parameters
};

// AdamW with nanoGPT's decay groups, as two optimizers.
struct GptOptim {
  explicit GptOptim(const nn::Gpt& m)
      : decay(m.decay_parameters(), dtrain::optim::AdamWOptions(3e-3).weight_decay(0.1)),
        no_decay(m.no_decay_parameters(), dtrain::optim::AdamWOptions(3e-3).weight_decay(0.0)) {}
  void step() {
    decay.step();
    no_decay.step();
  }
  dtrain::optim::AdamW decay, no_decay;
};

std::pair<Tensor, Tensor> batch_of(int step, const nn::GptConfig& c) {
  Tensor x = random_ids({kBatch, c.block_size}, c.vocab_size, 1000 + step);
  Tensor y = random_ids({kBatch, c.block_size}, c.vocab_size, 2000 + step);
  return {x, y};
}

RunResult reference_run() {
  auto model = std::make_shared<nn::Gpt>(small_gpt());
  GptOptim opt(*model);
  RunResult run;
  for (int s = 0; s < kSteps; ++s) {
    auto [x, y] = batch_of(s, model->config());
    model->zero_grad();
    Tensor loss = model->loss(x, y);
    loss.backward();
    opt.step();
    run.losses.push_back(loss.item());
  }
  run.params = model->state_dict();
  return run;
}

void expect_matches_reference(const RunResult& ref, const par::MeshShape& shape) {
  run_ranks(shape.world(), [&](Communicator& world) {
    par::ProcessMesh mesh(world, shape);
    auto tp = std::make_shared<par::TensorParallel>(mesh.tp());
    auto model = std::make_shared<nn::Gpt>(small_gpt(), tp);
    par::DistributedDataParallel ddp(model, mesh.dp());
    GptOptim opt(*model);
    const int64_t rows = kBatch / shape.dp, r0 = mesh.coord().dp * rows;
    for (int s = 0; s < kSteps; ++s) {
      auto [x, y] = batch_of(s, model->config());
      model->zero_grad();
      Tensor loss = model->loss(x.narrow(0, r0, rows).contiguous(), y.narrow(0, r0, rows).contiguous());
      loss.backward();
      ddp.finish_gradient_sync();
      opt.step();
      double mean = loss.item();
      mesh.dp().allreduce(&mean, 1, dtrain::DType::f64, dtrain::comm::ReduceOp::kAvg);
      EXPECT_NEAR(mean, ref.losses[static_cast<size_t>(s)], 1e-5 * ref.losses[0]) << "step " << s;
    }
    int64_t held = 0, expected = 0;
    for (const auto& [name, t] : model->state_dict()) {
      const nn::ShardSpec& spec = model->shard_specs().at(name);
      Tensor want = slice(ref.params.at(name), spec.dim, spec.rank, spec.parts);
      EXPECT_LT(rel_diff(t, want), 1e-5) << name << " on rank " << world.rank();
      held += t.numel();
      expected += dtrain::shape_numel(spec.global_shape) / spec.parts;
    }
    EXPECT_EQ(held, expected);
    EXPECT_EQ(held, model->num_parameters());
  });
}

TEST(GptMesh, TensorAndDataParallelFollowTheOneProcessRun) {
  const RunResult ref = reference_run();
  ASSERT_LT(ref.losses.back(), ref.losses.front());  // it trains
  for (const char* spec : {"dp=1,tp=1", "dp=2", "tp=2", "dp=2,tp=2", "tp=4"}) {
    SCOPED_TRACE(spec);
    expect_matches_reference(ref, par::MeshShape::parse(spec));
  }
}

// Per-rank parameter elements under tp follow the formula: sharded tensors / tp.
TEST(GptMesh, TensorParallelReallyShards) {
  const nn::GptConfig c = small_gpt();
  const int64_t C = c.n_embd, per_block_sharded = 4 * C * C + 2 * C + 8 * C * C + 4 * C;
  const int64_t per_block_replicated = 4 * C + 2 * C;
  for (int tp_size : {2, 4}) {
    run_ranks(tp_size, [&](Communicator& tp) {
      nn::Gpt model(c, std::make_shared<par::TensorParallel>(tp));
      const int64_t want = c.vocab_size * C / tp_size + c.block_size * C + 2 * C +
                           c.n_layer * (per_block_sharded / tp_size + per_block_replicated);
      EXPECT_EQ(model.num_parameters(), want);
    });
  }
}

}  // namespace
