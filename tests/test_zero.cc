// ZeRO stages 1-3 and global-norm clipping over the real tcp backend: ranks are
// threads of this process, each with its own model and communicator.
//
// The oracle is one process with the full batch and plain optim::AdamW (two of them:
// weight decay on the matrices, none on the biases) after clip_grad_norm: dp = 2, 3, 4
// ranks, each on its slice, must end with the same parameters (1e-5 relative) after
// 10 steps in which clipping is hit every time. The model (Linear 5->7, tanh, Linear
// 7->4: 74 parameters) pads unevenly at dp 3 and 4. Plus: per-rank memory equals the
// ceil(P/N) formula, the full optimizer state gathers into exactly the oracle's
// AdamW state and reloads at another dp (and stage), and the layout pads as stated.
#include <gtest/gtest.h>

#include "rank_threads.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/random.h"
#include "dtrain/engine/threading.h"
#include "dtrain/parallel/clip.h"
#include "dtrain/parallel/zero.h"

namespace {

using dtrain::Generator;
using dtrain::Shape;
using dtrain::Tensor;
using dtrain::comm::Communicator;
using dtrain::optim::StateDict;
namespace nn = dtrain::nn;
namespace par = dtrain::parallel;

constexpr int64_t kBatch = 12;  // divides 2, 3 and 4
constexpr int64_t kRows = 120;
constexpr int kSteps = 10;
constexpr double kMaxNorm = 0.05;  // below every step's norm: clipping always acts
constexpr double kDecay = 0.1;

template <typename Fn>
void run_ranks(int world, const std::string& tag, Fn fn) {
  dtrain::testing::run_tcp_ranks(world, tag, fn, std::chrono::seconds(20));
}

struct Model {
  std::shared_ptr<nn::Linear> l1, l2;
  std::shared_ptr<nn::Sequential> seq;             // the whole model
  std::vector<std::shared_ptr<nn::Module>> units;  // the same layers as ZeRO-3 units
  std::vector<Tensor> params() const { return seq->parameters(); }
};

Model make_model() {
  Generator gen(42);
  Model m;
  m.l1 = std::make_shared<nn::Linear>(5, 7, gen);
  m.l2 = std::make_shared<nn::Linear>(7, 4, gen);
  auto tanh = std::make_shared<nn::Tanh>();
  m.seq = std::make_shared<nn::Sequential>(
      std::initializer_list<std::shared_ptr<nn::Module>>{m.l1, tanh, m.l2});
  m.units = {std::make_shared<nn::Sequential>(
                 std::initializer_list<std::shared_ptr<nn::Module>>{m.l1, tanh}),
             m.l2};
  return m;
}

struct Data {
  Tensor x, y;
};

const Data& data() {
  static const Data d = [] {
    Generator gen(7);
    std::vector<float> x(kRows * 5);
    std::vector<int64_t> y(kRows);
    for (float& v : x) v = static_cast<float>(gen.uniform(-2.0, 2.0));
    for (int64_t& v : y) v = static_cast<int64_t>(gen.next_u32() % 4);
    return Data{dtrain::from_vector<float>(x, {kRows, 5}),
                dtrain::from_vector<int64_t>(y, {kRows})};
  }();
  return d;
}

// Forward + backward of step s's rows for `rank` of `world` (the mean over its slice).
void forward_backward(const std::function<Tensor(const Tensor&)>& fwd, int s, int rank, int world) {
  const int64_t local = kBatch / world;
  const int64_t start = (s * kBatch) % kRows + rank * local;
  Tensor x = data().x.narrow(0, start, local).clone();
  Tensor y = data().y.narrow(0, start, local).clone();
  dtrain::cross_entropy(fwd(x), y).backward();
}

std::vector<Tensor> snapshot(const std::vector<Tensor>& ps) {
  std::vector<Tensor> out;
  for (const Tensor& p : ps) out.push_back(p.clone());
  return out;
}

struct Oracle {
  std::vector<std::vector<Tensor>> params;  // after each step (1-based: params[s-1])
  std::vector<double> norms;
  StateDict state_after_5;  // in the unsharded AdamW's format
};

// Merges two AdamW dicts (decayed and not) into the single-optimizer index space.
StateDict merge_state(const StateDict& decay, const StateDict& plain, const std::vector<int>& which,
                      const std::vector<int>& local) {
  StateDict out;
  out.emplace("lr", decay.at("lr"));
  out.emplace("num_params", dtrain::from_vector<int64_t>({int64_t(which.size())}, {}));
  for (size_t i = 0; i < which.size(); ++i) {
    const StateDict& src = which[i] == 1 ? decay : plain;
    for (const char* slot : {"step", "exp_avg", "exp_avg_sq"}) {
      out.emplace("state." + std::to_string(i) + "." + slot,
                  src.at("state." + std::to_string(local[i]) + "." + slot));
    }
  }
  return out;
}

const Oracle& oracle() {
  static const Oracle o = [] {
    dtrain::set_num_threads(1);
    Oracle out;
    Model m = make_model();
    std::vector<Tensor> decayed, plain;
    std::vector<int> which, local;
    for (const Tensor& p : m.params()) {
      which.push_back(p.dim() >= 2 ? 1 : 0);
      auto& group = p.dim() >= 2 ? decayed : plain;
      local.push_back(static_cast<int>(group.size()));
      group.push_back(p);
    }
    dtrain::optim::AdamW opt_d(decayed, dtrain::optim::AdamWOptions(0.02).weight_decay(kDecay));
    dtrain::optim::AdamW opt_p(plain, dtrain::optim::AdamWOptions(0.02).weight_decay(0.0));
    for (int s = 0; s < kSteps; ++s) {
      for (Tensor& p : m.params()) p.set_grad(Tensor());
      forward_backward([&](const Tensor& x) { return m.seq->forward(x); }, s, 0, 1);
      out.norms.push_back(par::clip_grad_norm(m.params(), kMaxNorm));
      opt_d.step();
      opt_p.step();
      out.params.push_back(snapshot(m.params()));
      if (s == 4)
        out.state_after_5 = merge_state(opt_d.state_dict(), opt_p.state_dict(), which, local);
    }
    return out;
  }();
  return o;
}

void expect_close(const std::vector<Tensor>& got, const std::vector<Tensor>& want,
                  const std::string& what, double rel = 1e-5) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t k = 0; k < got.size(); ++k) {
    ASSERT_EQ(got[k].shape(), want[k].shape()) << what << ", tensor " << k;
    std::vector<float> a = got[k].to_vector<float>(), b = want[k].to_vector<float>();
    double mag = 0, diff = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      mag = std::max(mag, std::fabs(double(b[i])));
      diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
    }
    EXPECT_LE(diff, rel * mag) << what << ", tensor " << k << ": max diff " << diff;
  }
}

void expect_state_close(const StateDict& got, const StateDict& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (const auto& [key, t] : want) {
    ASSERT_TRUE(got.count(key)) << what << ": missing " << key;
    if (t.dtype() == dtrain::DType::f32) {
      expect_close({got.at(key)}, {t}, what + " " + key, 1e-4);
    } else {
      EXPECT_EQ(got.at(key).item(), t.item()) << what << " " << key;
    }
  }
}

dtrain::optim::AdamWOptions adamw() { return dtrain::optim::AdamWOptions(0.02); }

// One rank's run: steps [first, last) with stage 1/2 (ZeroOptimizer) or 3 (FSDP).
struct RankResult {
  std::vector<Tensor> params;
  std::vector<double> norms;
  par::ShardMemory memory;
  std::vector<par::FlatLayout> layouts;
  StateDict full_state;
};

RankResult train(int stage, int rank, Communicator& comm, int first, int last,
                 size_t bucket_bytes = size_t{25} << 20, const StateDict* resume = nullptr,
                 const std::vector<Tensor>* resume_params = nullptr) {
  Model m = make_model();
  if (resume_params) {
    dtrain::NoGradGuard no_grad;
    for (size_t i = 0; i < m.params().size(); ++i) m.params()[i].copy_((*resume_params)[i]);
  }
  const std::vector<double> wd = par::decay_matrices_only(m.params(), kDecay);
  std::unique_ptr<par::ShardedAdamW> opt;
  std::function<Tensor(const Tensor&)> fwd;
  par::FullyShardedDataParallel* fsdp = nullptr;
  if (stage == 3) {
    auto f = std::make_unique<par::FullyShardedDataParallel>(m.units, wd, comm, adamw());
    fsdp = f.get();
    fwd = [fsdp](const Tensor& x) { return fsdp->forward(x); };
    opt = std::move(f);
  } else {
    opt = std::make_unique<par::ZeroOptimizer>(m.params(), wd, comm, adamw(),
                                               par::ZeroOptions{stage, bucket_bytes});
    fwd = [&m](const Tensor& x) { return m.seq->forward(x); };
  }
  if (resume) opt->load_full_state(*resume);
  RankResult out;
  for (int s = first; s < last; ++s) {
    opt->zero_grad();
    forward_backward(fwd, s, rank, comm.size());
    if (stage == 2) {  // the hooks already dropped every full gradient
      for (const Tensor& p : m.params()) EXPECT_FALSE(p.grad().defined());
    }
    out.norms.push_back(opt->clip_grad_norm(kMaxNorm));
    opt->step();
  }
  out.params = fsdp ? fsdp->gather_full_parameters() : snapshot(m.params());
  if (fsdp) {  // between steps a unit's own tensors hold nothing
    for (const Tensor& p : m.params()) EXPECT_EQ(p.numel(), 0);
  }
  out.memory = opt->memory();
  out.layouts = opt->layouts();
  out.full_state = opt->gather_full_state();
  return out;
}

void check_against_oracle(int stage, int world, size_t bucket_bytes = size_t{25} << 20) {
  const Oracle& o = oracle();
  for (double n : o.norms) ASSERT_GT(n, kMaxNorm);  // the clip is really hit
  std::vector<RankResult> res(static_cast<size_t>(world));
  const std::string tag = "zero" + std::to_string(stage) + "-" + std::to_string(world) + "-" +
                          std::to_string(bucket_bytes);
  run_ranks(world, tag, [&](int r, Communicator& comm) {
    res[static_cast<size_t>(r)] = train(stage, r, comm, 0, kSteps, bucket_bytes);
  });
  for (int r = 0; r < world; ++r) {
    const RankResult& rr = res[static_cast<size_t>(r)];
    const std::string what = "stage " + std::to_string(stage) + " dp " + std::to_string(world) +
                             " rank " + std::to_string(r);
    expect_close(rr.params, o.params.back(), what);
    ASSERT_EQ(rr.norms.size(), o.norms.size());
    for (size_t s = 0; s < o.norms.size(); ++s)
      EXPECT_NEAR(rr.norms[s], o.norms[s], 1e-5 * o.norms[s]);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- layout ----

TEST(ZeroLayout, UnevenSizesArePaddedPerBucketInReverseOrder) {
  const std::vector<Shape> shapes = {{7, 5}, {7}, {4, 7}, {4}};  // 74 elements
  par::FlatLayout one = par::make_flat_layout(shapes, 4, 1 << 30);
  EXPECT_EQ(one.total, 76);
  EXPECT_EQ(one.shard_numel(), 19);  // ceil(74 / 4)
  EXPECT_EQ(one.offsets, (std::vector<int64_t>{39, 32, 4, 0}));
  par::FlatLayout two = par::make_flat_layout(shapes, 4, 30);
  EXPECT_EQ(two.bucket_begin, (std::vector<int64_t>{0, 32}));
  EXPECT_EQ(two.bucket_numel, (std::vector<int64_t>{32, 44}));  // 4+28 -> 32, 7+35=42 -> 44
  EXPECT_EQ(two.offsets, (std::vector<int64_t>{39, 32, 4, 0}));
  EXPECT_EQ(two.shard_numel(), 8 + 11);
  EXPECT_THROW(par::make_flat_layout(shapes, 0, 30), dtrain::InvalidArgument);
}

// ---- equivalence with the single-process AdamW ----

TEST(Zero1, MatchesFullBatchAdamWAtDp2) { check_against_oracle(1, 2); }
TEST(Zero1, MatchesFullBatchAdamWAtDp3) { check_against_oracle(1, 3); }
TEST(Zero1, MatchesFullBatchAdamWAtDp4) { check_against_oracle(1, 4); }
TEST(Zero2, MatchesFullBatchAdamWAtDp2) { check_against_oracle(2, 2); }
TEST(Zero2, MatchesFullBatchAdamWAtDp3) { check_against_oracle(2, 3); }
TEST(Zero2, MatchesFullBatchAdamWAtDp4) { check_against_oracle(2, 4); }
TEST(Zero2, SmallBucketsMatchToo) { check_against_oracle(2, 3, 16); }  // one parameter a bucket
TEST(Zero3, MatchesFullBatchAdamWAtDp2) { check_against_oracle(3, 2); }
TEST(Zero3, MatchesFullBatchAdamWAtDp3) { check_against_oracle(3, 3); }
TEST(Zero3, MatchesFullBatchAdamWAtDp4) { check_against_oracle(3, 4); }

// ---- memory per rank ----

TEST(ZeroMemory, ShardBytesFollowTheCeilFormula) {
  const int64_t p = 74, unit0 = 42, unit1 = 32;
  for (int world : {2, 3, 4}) {
    for (int stage : {1, 2, 3}) {
      std::vector<RankResult> res(static_cast<size_t>(world));
      run_ranks(world, "mem" + std::to_string(stage) + std::to_string(world),
                [&](int r, Communicator& comm) {
                  res[static_cast<size_t>(r)] = train(stage, r, comm, 0, 1);
                });
      const int64_t shard =
          stage == 3 ? ceil_div(unit0, world) + ceil_div(unit1, world) : ceil_div(p, world);
      const int64_t full = ceil_div(p, world) * world;
      for (const RankResult& rr : res) {
        const std::string what = "stage " + std::to_string(stage) + " dp " + std::to_string(world);
        EXPECT_EQ(rr.memory.optimizer_state_bytes, size_t(2 * 4 * shard)) << what;
        // stage 1 keeps the full flat gradient beside its reduced shard
        EXPECT_EQ(rr.memory.grad_bytes, size_t(4 * (stage == 1 ? full + shard : shard))) << what;
        EXPECT_EQ(rr.memory.param_bytes, size_t(4 * (stage == 3 ? shard : full))) << what;
      }
    }
  }
}

TEST(ZeroMemory, SmallBucketsShardIsTheSumOfPaddedBucketChunks) {
  std::vector<RankResult> res(3);
  run_ranks(3, "mem-buckets", [&](int r, Communicator& comm) {
    res[static_cast<size_t>(r)] = train(2, r, comm, 0, 1, 16);
  });
  const par::FlatLayout& l = res[0].layouts.at(0);
  ASSERT_EQ(l.bucket_numel.size(), 4u);
  int64_t shard = 0;
  for (int64_t n : l.bucket_numel) {
    EXPECT_EQ(n % 3, 0);
    shard += n / 3;
  }
  EXPECT_EQ(res[0].memory.grad_bytes, size_t(4 * shard));
}

// ---- checkpoints ----

TEST(ZeroCheckpoint, FullStateEqualsAdamWAndReloadsAtAnotherDp) {
  const Oracle& o = oracle();
  std::vector<RankResult> first(2);
  run_ranks(2, "ckpt-a", [&](int r, Communicator& comm) {
    first[static_cast<size_t>(r)] = train(2, r, comm, 0, 5);
  });
  expect_state_close(first[0].full_state, o.state_after_5, "dp 2 stage 2 after 5 steps");
  expect_state_close(first[1].full_state, o.state_after_5, "rank 1");
  expect_close(first[0].params, o.params[4], "params after 5 steps");
  for (int stage : {1, 3}) {  // resume at dp 3, as stage 1 and as stage 3
    std::vector<RankResult> second(3);
    run_ranks(3, "ckpt-b" + std::to_string(stage), [&](int r, Communicator& comm) {
      second[static_cast<size_t>(r)] = train(stage, r, comm, 5, kSteps, size_t{25} << 20,
                                             &first[0].full_state, &first[0].params);
    });
    for (const RankResult& rr : second) {
      expect_close(rr.params, o.params.back(), "resumed at dp 3 stage " + std::to_string(stage));
    }
  }
}

TEST(ZeroCheckpoint, LoadRejectsAStateOfAnotherModel) {
  run_ranks(1, "ckpt-bad", [&](int, Communicator& comm) {
    Model m = make_model();
    par::ZeroOptimizer opt(m.params(), par::decay_matrices_only(m.params(), kDecay), comm, adamw());
    StateDict bad = oracle().state_after_5;
    bad["num_params"] = dtrain::from_vector<int64_t>({3}, {});
    EXPECT_THROW(opt.load_full_state(bad), dtrain::DataFormatError);
    bad = oracle().state_after_5;
    bad["state.9.exp_avg"] = dtrain::zeros({1});
    EXPECT_THROW(opt.load_full_state(bad), dtrain::DataFormatError);
    bad = oracle().state_after_5;
    bad["state.1.exp_avg"] = dtrain::zeros({6});
    EXPECT_THROW(opt.load_full_state(bad), dtrain::DataFormatError);
    EXPECT_EQ(opt.steps(), 0);
  });
}

// ---- clipping ----

TEST(ClipGradNorm, DdpFormScalesByMaxOverNorm) {
  Tensor a = dtrain::zeros({2}).set_requires_grad(true);
  Tensor b = dtrain::zeros({1}).set_requires_grad(true);
  a.set_grad(dtrain::from_vector<float>({3, 0}, {2}));
  b.set_grad(dtrain::from_vector<float>({4}, {1}));
  EXPECT_DOUBLE_EQ(par::clip_grad_norm({a, b}, 10.0), 5.0);  // below max: untouched
  EXPECT_EQ(a.grad().to_vector<float>(), (std::vector<float>{3, 0}));
  EXPECT_DOUBLE_EQ(par::clip_grad_norm({a, b}, 1.0), 5.0);
  const double c = 1.0 / (5.0 + 1e-6);
  EXPECT_FLOAT_EQ(a.grad().to_vector<float>()[0], float(3 * c));
  EXPECT_FLOAT_EQ(b.grad().to_vector<float>()[0], float(4 * c));
  EXPECT_THROW(par::clip_grad_norm({a}, 0.0), dtrain::InvalidArgument);
}

TEST(ClipGradNorm, ShardedSumsOwnedPartsAndCountsReplicasOnce) {
  // rank 0 owns [1, 2], rank 1 owns [2]; both hold the replica [4]: norm sqrt(25) = 5.
  std::vector<std::vector<float>> scaled(2);
  std::vector<double> norms(2);
  run_ranks(2, "clip", [&](int r, Communicator& comm) {
    Tensor own =
        r == 0 ? dtrain::from_vector<float>({1, 2}, {2}) : dtrain::from_vector<float>({2}, {1});
    Tensor rep = dtrain::from_vector<float>({4}, {1});
    norms[size_t(r)] = par::clip_grad_norm_sharded({own, rep}, 2.5, {&comm}, {true, r == 0});
    scaled[size_t(r)] = rep.to_vector<float>();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NEAR(norms[size_t(r)], 5.0, 1e-12);
    EXPECT_NEAR(scaled[size_t(r)][0], 4 * 2.5 / (5 + 1e-6), 1e-6);
  }
}

TEST(ZeroOptimizer, RejectsBadArguments) {
  run_ranks(1, "bad-args", [&](int, Communicator& comm) {
    Model m = make_model();
    auto wd = par::decay_matrices_only(m.params(), kDecay);
    EXPECT_THROW(par::ZeroOptimizer(m.params(), wd, comm, adamw(), par::ZeroOptions{3}),
                 dtrain::InvalidArgument);
    wd.pop_back();
    EXPECT_THROW(par::ZeroOptimizer(m.params(), wd, comm, adamw()), dtrain::InvalidArgument);
  });
}

}  // namespace
