// Tensor parallelism and the process mesh, over the real tcp backend (ranks are
// threads of this process meeting through a MemoryStore).
//
// Oracles: the plain engine ops and a 1-process GPT. Each tensor-parallel piece
// (f/g, the column/row linears, the vocab-parallel embedding and cross-entropy) must
// give the values and gradients of its unsplit counterpart; a GPT trained on a
// dp x tp mesh is in test_gpt_mesh.cc.
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

// The GPT on whole meshes: test_gpt_mesh.cc.

}  // namespace
