// Pipeline parallelism: layer partitioning, the schedules as data, and pipelined
// training steps over the real tcp backend (stages are threads meeting through a
// MemoryStore).
//
// Oracles: a brute-force search for the partition; a simulator with rendezvous
// (blocking) send/recv semantics that must run every schedule to the end; and the
// 1-process full-batch run of the same MLP, whose loss, gradients and SGD trajectory
// every pipelined run must reproduce within 1e-5 relative (f32).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/parallel/pipeline.h"
#include "dtrain/parallel/schedule.h"

namespace {

using dtrain::Generator;
using dtrain::Tensor;
using dtrain::comm::Communicator;
namespace nn = dtrain::nn;
namespace par = dtrain::parallel;
using par::Action;
using par::ActionKind;
using par::ScheduleKind;
using Clock = std::chrono::steady_clock;

constexpr auto kTimeout = std::chrono::seconds(30);

using OwnedComm = std::unique_ptr<Communicator>;

// Runs fn(world_comm) on `world` threads (fn may destroy its communicator, as a lost
// rank); any rank's failure fails the test.
void run_ranks_owning(int world, const std::function<void(OwnedComm&)>& fn,
                      dtrain::comm::TcpOptions topts, std::chrono::milliseconds timeout) {
  dtrain::comm::MemoryStore store;
  std::vector<std::string> errors(static_cast<size_t>(world));
  std::latch done(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        topts.tag = "pp-test";
        auto comm = dtrain::comm::make_tcp_communicator(store, r, world,
                                                        dtrain::comm::CommOptions{timeout}, topts);
        try {
          fn(comm);
        } catch (const std::exception& e) {
          errors[static_cast<size_t>(r)] = e.what();
        }
        done.arrive_and_wait();
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
        done.count_down();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
}

void run_ranks(int world, const std::function<void(Communicator&)>& fn,
               dtrain::comm::TcpOptions topts = {}, std::chrono::milliseconds timeout = kTimeout) {
  run_ranks_owning(
      world, [&](OwnedComm& comm) { fn(*comm); }, topts, timeout);
}

Tensor randn(const dtrain::Shape& shape, uint64_t seed, double scale = 1.0, double shift = 0.0) {
  Generator gen(seed);
  Tensor t = dtrain::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) {
    t.data<float>()[i] = static_cast<float>(shift + scale * gen.normal());
  }
  return t;
}

// max |a - b| / max |b|: relative to the tensor's scale.
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

std::vector<Tensor> split_rows(const Tensor& full, int parts) {
  std::vector<Tensor> out;
  const int64_t n = full.size(0) / parts;
  for (int i = 0; i < parts; ++i) out.push_back(full.narrow(0, i * n, n).contiguous());
  return out;
}

// ---------------------------------------------------------------- partition

// The smallest largest stage over every placement of the cuts (the oracle).
int64_t brute_force_best(const std::vector<int64_t>& w, int stages, size_t from = 0) {
  if (stages == 1) {
    int64_t s = 0;
    for (size_t i = from; i < w.size(); ++i) s += w[i];
    return s;
  }
  int64_t best = INT64_MAX, head = 0;
  for (size_t end = from + 1; end + static_cast<size_t>(stages - 1) <= w.size(); ++end) {
    head += w[end - 1];
    best = std::min(best, std::max(head, brute_force_best(w, stages - 1, end)));
  }
  return best;
}

TEST(PartitionLayers, MinimisesTheLargestStage) {
  Generator gen(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(gen.below(9));
    std::vector<int64_t> w(static_cast<size_t>(n));
    for (auto& x : w) x = static_cast<int64_t>(gen.below(100));
    const int stages = 1 + static_cast<int>(gen.below(static_cast<uint64_t>(n)));
    const std::vector<int64_t> starts = par::partition_layers(w, stages);
    ASSERT_EQ(starts.size(), static_cast<size_t>(stages));
    ASSERT_EQ(starts[0], 0);
    int64_t largest = 0;
    for (int s = 0; s < stages; ++s) {
      const int64_t end = s + 1 < stages ? starts[s + 1] : n;
      ASSERT_LT(starts[s], end) << "stage " << s << " is empty";
      int64_t sum = 0;
      for (int64_t i = starts[s]; i < end; ++i) sum += w[static_cast<size_t>(i)];
      largest = std::max(largest, sum);
    }
    EXPECT_EQ(largest, brute_force_best(w, stages)) << "trial " << trial;
  }
  EXPECT_EQ(par::partition_layers({10, 10, 10, 10}, 2), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(par::partition_layers({1, 1, 1, 9}, 2), (std::vector<int64_t>{0, 3}));
}

TEST(PartitionLayers, RefusesMoreStagesThanLayers) {
  try {
    par::partition_layers({1, 2, 3}, 4);
    FAIL() << "4 stages accepted for 3 layers";
  } catch (const dtrain::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("pipeline: 4 stages for a model of 3 layers"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(par::partition_layers({1, 2, 3}, 0), dtrain::InvalidArgument);
  EXPECT_THROW(par::partition_layers({1, -2, 3}, 2), dtrain::InvalidArgument);
}

// ---------------------------------------------------------------- schedules

// Runs every stage's actions with rendezvous semantics: a send completes only together
// with the matching receive on the peer (same micro-batch, the next action there).
// Checks local data dependencies too. Returns "" or what went wrong.
std::string simulate(ScheduleKind kind, int p, int m) {
  std::vector<std::vector<Action>> acts;
  for (int s = 0; s < p; ++s) acts.push_back(par::make_schedule(kind, p, s, m));
  std::vector<size_t> pc(static_cast<size_t>(p), 0);
  // done[s][kind][mb]
  std::vector<std::vector<std::vector<bool>>> done(
      static_cast<size_t>(p), std::vector<std::vector<bool>>(6, std::vector<bool>(m, false)));
  auto is_done = [&](int s, ActionKind k, int mb) { return bool(done[s][int(k)][mb]); };
  auto ready = [&](int s, const Action& a) {  // local dependencies
    const bool first = s == 0, last = s == p - 1;
    switch (a.kind) {
      case ActionKind::kForward:
        return first || is_done(s, ActionKind::kRecvForward, a.microbatch);
      case ActionKind::kSendForward:
        return is_done(s, ActionKind::kForward, a.microbatch);
      case ActionKind::kBackward:
        return is_done(s, ActionKind::kForward, a.microbatch) &&
               (last || is_done(s, ActionKind::kRecvBackward, a.microbatch));
      case ActionKind::kSendBackward:
        return is_done(s, ActionKind::kBackward, a.microbatch);
      default:
        return true;
    }
  };
  auto finish = [&](int s) {
    const Action& a = acts[s][pc[s]];
    done[s][int(a.kind)][a.microbatch] = true;
    ++pc[s];
  };
  for (bool progress = true; progress;) {
    progress = false;
    for (int s = 0; s < p; ++s) {
      if (pc[s] == acts[s].size()) continue;
      const Action a = acts[s][pc[s]];
      if (!ready(s, a))
        return "stage " + std::to_string(s) + " runs " + par::action_str(a) + " before its input";
      const bool send = a.kind == ActionKind::kSendForward || a.kind == ActionKind::kSendBackward;
      const bool recv = a.kind == ActionKind::kRecvForward || a.kind == ActionKind::kRecvBackward;
      if (recv) continue;  // completes with the peer's send
      if (!send) {
        finish(s), progress = true;
        continue;
      }
      const bool fwd = a.kind == ActionKind::kSendForward;
      const int peer = fwd ? s + 1 : s - 1;
      if (peer < 0 || peer >= p) return "stage " + std::to_string(s) + " sends off the pipeline";
      if (pc[peer] == acts[peer].size()) return "stage " + std::to_string(peer) + " is done";
      const Action b = acts[peer][pc[peer]];
      if (b.kind != (fwd ? ActionKind::kRecvForward : ActionKind::kRecvBackward)) continue;
      if (b.microbatch != a.microbatch) {
        return "stage " + std::to_string(peer) + " receives " + par::action_str(b) + " while " +
               std::to_string(s) + " sends " + par::action_str(a);
      }
      finish(s), finish(peer), progress = true;
    }
  }
  for (int s = 0; s < p; ++s) {
    if (pc[s] != acts[s].size()) {
      return "deadlock: stage " + std::to_string(s) + " stuck at " +
             par::action_str(acts[s][pc[s]]);
    }
    for (int mb = 0; mb < m; ++mb) {
      if (!is_done(s, ActionKind::kForward, mb) || !is_done(s, ActionKind::kBackward, mb)) {
        return "stage " + std::to_string(s) + " misses micro-batch " + std::to_string(mb);
      }
    }
  }
  return "";
}

TEST(Schedule, CompletesUnderRendezvousSemantics) {
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    for (int p = 1; p <= 8; ++p) {
      for (int m = 1; m <= 12; ++m) {
        EXPECT_EQ(simulate(kind, p, m), "")
            << par::schedule_name(kind) << " p=" << p << " m=" << m << "\n"
            << par::format_schedule(kind, p, m);
      }
    }
  }
}

// Each action exactly once; 1F1B keeps at most p - stage micro-batches in flight.
TEST(Schedule, EveryActionOnceAndOneFOneBBoundsTheActivations) {
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    for (int p = 1; p <= 8; ++p) {
      for (int m = 1; m <= 12; ++m) {
        for (int s = 0; s < p; ++s) {
          const auto acts = par::make_schedule(kind, p, s, m);
          const int per_mb = 2 + (s > 0 ? 2 : 0) + (s < p - 1 ? 2 : 0);
          EXPECT_EQ(acts.size(), static_cast<size_t>(per_mb * m));
          int in_flight = 0, peak = 0;
          for (const Action& a : acts) {
            in_flight += a.kind == ActionKind::kForward    ? 1
                         : a.kind == ActionKind::kBackward ? -1
                                                           : 0;
            peak = std::max(peak, in_flight);
          }
          EXPECT_EQ(peak, kind == ScheduleKind::kGPipe ? m : std::min(p - s, m))
              << par::schedule_name(kind) << " p=" << p << " m=" << m << " stage " << s;
        }
      }
    }
  }
  EXPECT_THROW(par::make_schedule(ScheduleKind::k1F1B, 2, 2, 4), dtrain::InvalidArgument);
  EXPECT_THROW(par::make_schedule(ScheduleKind::k1F1B, 2, 0, 0), dtrain::InvalidArgument);
}

TEST(Schedule, FormatsATimeline) {
  EXPECT_EQ(par::format_schedule(ScheduleKind::kGPipe, 2, 2),
            "stage 0: F0 F1 .  .  B0 B1\n"
            "stage 1: .  F0 F1 B0 B1 .\n");
  EXPECT_EQ(par::format_schedule(ScheduleKind::k1F1B, 2, 3),
            "stage 0: F0 F1 .  B0 F2 B1 .  B2\n"
            "stage 1: .  F0 B0 F1 B1 F2 B2 .\n");
  EXPECT_EQ(par::parse_schedule("1f1b"), ScheduleKind::k1F1B);
  EXPECT_THROW(par::parse_schedule("afab"), dtrain::InvalidArgument);
}

// ---------------------------------------------------------------- pipelined MLP

constexpr int kLayers = 6, kWidth = 16, kBatch = 24;
constexpr uint64_t kModelSeed = 42;

// kLayers Linear + tanh, built identically from one seed on every stage.
struct Mlp {
  std::vector<std::shared_ptr<nn::Linear>> layers;
  Mlp() {
    Generator gen(kModelSeed);
    for (int i = 0; i < kLayers; ++i)
      layers.push_back(std::make_shared<nn::Linear>(kWidth, kWidth, gen));
  }
  Tensor forward(Tensor x, int64_t begin, int64_t end) const {
    for (int64_t i = begin; i < end; ++i)
      x = dtrain::tanh(layers[static_cast<size_t>(i)]->forward(x));
    return x;
  }
  std::vector<Tensor> parameters(int64_t begin, int64_t end) const {
    std::vector<Tensor> out;
    for (int64_t i = begin; i < end; ++i) {
      for (const Tensor& t : layers[static_cast<size_t>(i)]->parameters()) out.push_back(t);
    }
    return out;
  }
};

Tensor mse(const Tensor& y, const Tensor& target) {
  Tensor d = dtrain::sub(y, target);
  return dtrain::mean(dtrain::mul(d, d));
}

struct Batch {
  Tensor x = randn({kBatch, kWidth}, 1), target = randn({kBatch, kWidth}, 2, 0.5);
};

// Layer range [begin, end) of `stage` when kLayers are split over `stages` by size.
std::pair<int64_t, int64_t> stage_layers(const Mlp& mlp, int stages, int stage) {
  std::vector<int64_t> counts;
  for (const auto& l : mlp.layers) {
    int64_t n = 0;
    for (const Tensor& t : l->parameters()) n += t.numel();
    counts.push_back(n);
  }
  const auto starts = par::partition_layers(counts, stages);
  return {starts[static_cast<size_t>(stage)],
          stage + 1 < stages ? starts[static_cast<size_t>(stage) + 1] : kLayers};
}

// `steps` pipelined SGD steps on stage pp.rank(); the same steps in one process;
// losses, this stage's gradients (of the last step) and parameters must agree.
void expect_pipeline_matches(Communicator& pp, ScheduleKind kind, int m, int steps) {
  const Batch batch;
  Mlp piped, ref;
  const auto [begin, end] = stage_layers(piped, pp.size(), pp.rank());
  dtrain::optim::SGD opt(piped.parameters(begin, end), dtrain::optim::SGDOptions(0.1));
  dtrain::optim::SGD ref_opt(ref.parameters(0, kLayers), dtrain::optim::SGDOptions(0.1));
  par::PipelineOptions options;
  options.schedule = kind;
  options.microbatches = m;
  options.activation_shape = {kBatch / m, kWidth};
  const auto inputs = split_rows(batch.x, m);
  const auto targets = split_rows(batch.target, m);
  for (int step = 0; step < steps; ++step) {
    opt.zero_grad();
    const par::PipelineStats stats = par::run_pipeline_step(
        pp, options, [&](const Tensor& x) { return piped.forward(x, begin, end); },
        [&](const Tensor& y, int mb) { return mse(y, targets[static_cast<size_t>(mb)]); }, inputs);
    ref_opt.zero_grad();
    Tensor loss = mse(ref.forward(batch.x, 0, kLayers), batch.target);
    loss.backward();
    EXPECT_NEAR(stats.loss, loss.item(), 1e-5 * std::abs(loss.item())) << "step " << step;
    EXPECT_NEAR(stats.ideal_bubble, double(pp.size() - 1) / (m + pp.size() - 1), 1e-12);
    EXPECT_GE(stats.bubble_fraction, 0.0);
    EXPECT_LE(stats.busy_seconds, stats.step_seconds);
    const auto got = piped.parameters(begin, end), want = ref.parameters(begin, end);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].grad().defined()) << "stage " << pp.rank() << " param " << i;
      EXPECT_LT(rel_diff(got[i].grad(), want[i].grad()), 1e-5)
          << "stage " << pp.rank() << " param " << i << " step " << step;
    }
    opt.step();
    ref_opt.step();
  }
  const auto got = piped.parameters(begin, end), want = ref.parameters(begin, end);
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_LT(rel_diff(got[i], want[i]), 1e-5) << "stage " << pp.rank() << " param " << i;
  }
}

TEST(PipelineStep, GradientsMatchTheFullBatch) {
  for (int p : {2, 4}) {
    for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
      for (int m : {1, 3, 4, 8}) {
        SCOPED_TRACE(fmt::format("{} p={} m={}", par::schedule_name(kind), p, m));
        run_ranks(p, [&](Communicator& pp) { expect_pipeline_matches(pp, kind, m, 1); });
      }
    }
  }
}

TEST(PipelineStep, FiveSgdStepsFollowTheOneProcessRun) {
  run_ranks(4, [&](Communicator& pp) { expect_pipeline_matches(pp, ScheduleKind::k1F1B, 4, 5); });
  run_ranks(2, [&](Communicator& pp) { expect_pipeline_matches(pp, ScheduleKind::kGPipe, 3, 5); });
}

TEST(PipelineStep, OneStageIsThePlainStep) {
  run_ranks(1, [&](Communicator& pp) { expect_pipeline_matches(pp, ScheduleKind::k1F1B, 4, 2); });
}

// Activations of 2 MiB per micro-batch (64 x 8192 f32) through 64 KiB shared-memory
// rings and socket buffers: sends block until the peer receives, so neighbours that
// both send first would deadlock (a TimeoutError here). Each stage scales elementwise
// by its own weight row, then tanh.
TEST(PipelineStep, MegabyteActivationsDoNotDeadlock) {
  constexpr int64_t kRows = 64, kCols = 8192;
  constexpr int kStages = 4, kMicro = 4;
  const Tensor x = randn({kRows * kMicro, kCols}, 3);
  auto weight = [](int stage) {
    return randn({kCols}, 10 + static_cast<uint64_t>(stage), 0.1, 1.0).set_requires_grad(true);
  };
  auto stage_fn = [](const Tensor& w) {
    return [w](const Tensor& in) { return dtrain::tanh(dtrain::mul(in, w)); };
  };
  auto loss_fn = [](const Tensor& y) { return dtrain::mean(dtrain::mul(y, y)); };
  // The oracle: all four stages in one process.
  std::vector<Tensor> ref_w;
  Tensor y = x;
  for (int s = 0; s < kStages; ++s) ref_w.push_back(weight(s)), y = stage_fn(ref_w.back())(y);
  Tensor ref_loss = loss_fn(y);
  ref_loss.backward();
  dtrain::comm::TcpOptions small_buffers;
  small_buffers.shm_ring_bytes = 64 << 10;
  small_buffers.socket_buffer_bytes = 64 << 10;
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    SCOPED_TRACE(par::schedule_name(kind));
    run_ranks(
        kStages,
        [&](Communicator& pp) {
          Tensor w = weight(pp.rank());
          par::PipelineOptions options;
          options.schedule = kind;
          options.microbatches = kMicro;
          options.activation_shape = {kRows, kCols};
          const auto stats = par::run_pipeline_step(
              pp, options, stage_fn(w), [&](const Tensor& out, int) { return loss_fn(out); },
              split_rows(x, kMicro));
          EXPECT_NEAR(stats.loss, ref_loss.item(), 1e-5 * std::abs(ref_loss.item()));
          EXPECT_LT(rel_diff(w.grad(), ref_w[static_cast<size_t>(pp.rank())].grad()), 1e-5)
              << "stage " << pp.rank();
        },
        small_buffers, std::chrono::seconds(10));
  }
}

TEST(PipelineStep, RefusesBadArguments) {
  run_ranks(2, [&](Communicator& pp) {
    par::PipelineOptions options;
    options.microbatches = 2;
    options.activation_shape = {2, 2};
    auto id = [](const Tensor& t) { return t; };
    if (pp.rank() == 0) {  // one input for two micro-batches
      EXPECT_THROW(par::run_pipeline_step(pp, options, id, nullptr, {dtrain::zeros({2, 2})}),
                   dtrain::InvalidArgument);
    } else {  // the last stage without a loss
      EXPECT_THROW(par::run_pipeline_step(pp, options, id, nullptr, {}), dtrain::InvalidArgument);
    }
  });
}

// The first stage takes i64 token ids (an embedding), the last a cross-entropy: the
// ids are not differentiable, the received activation is.
TEST(PipelineStep, TokenIdsIntoTheFirstStage) {
  static constexpr int64_t kVocab = 11, kDim = 8, kTokens = 12;
  Generator gen(9);
  Tensor ids = dtrain::empty({kTokens}, dtrain::TensorOptions().with_dtype(dtrain::DType::i64));
  Tensor target = dtrain::empty({kTokens}, dtrain::TensorOptions().with_dtype(dtrain::DType::i64));
  for (int64_t i = 0; i < kTokens; ++i) {
    ids.data<int64_t>()[i] = static_cast<int64_t>(gen.below(kVocab));
    target.data<int64_t>()[i] = static_cast<int64_t>(gen.below(kVocab));
  }
  struct Model {
    Tensor emb = randn({kVocab, kDim}, 20).set_requires_grad(true);
    std::shared_ptr<nn::Linear> head;
    Model() {
      Generator g(21);
      head = std::make_shared<nn::Linear>(kDim, kVocab, g);
    }
  };
  Model ref;
  dtrain::cross_entropy(ref.head->forward(dtrain::tanh(dtrain::embedding(ref.emb, ids))), target)
      .backward();
  for (auto [kind, m] : {std::pair{ScheduleKind::k1F1B, 4}, std::pair{ScheduleKind::kGPipe, 3}}) {
    SCOPED_TRACE(fmt::format("{} m={}", par::schedule_name(kind), m));
    run_ranks(2, [&](Communicator& pp) {
      Model model;
      par::PipelineOptions options;
      options.schedule = kind;
      options.microbatches = m;
      options.activation_shape = {kTokens / m, kDim};
      auto targets = split_rows(target, m);
      par::run_pipeline_step(
          pp, options,
          [&](const Tensor& x) {
            return pp.rank() == 0 ? dtrain::tanh(dtrain::embedding(model.emb, x))
                                  : model.head->forward(x);
          },
          [&](const Tensor& y, int mb) {
            return dtrain::cross_entropy(y, targets[static_cast<size_t>(mb)]);
          },
          split_rows(ids, m));
      if (pp.rank() == 0) {
        EXPECT_LT(rel_diff(model.emb.grad(), ref.emb.grad()), 1e-5);
      } else {
        EXPECT_LT(rel_diff(model.head->weight.grad(), ref.head->weight.grad()), 1e-5);
      }
    });
  }
}

// ---------------------------------------------------------------- failures

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

par::PipelineOptions big_options(ScheduleKind kind) {
  par::PipelineOptions options;
  options.schedule = kind;
  options.microbatches = 4;
  options.activation_shape = {64, 8192};
  return options;
}

// The last stage takes the first activation, then its process is gone (communicator
// destroyed): the first stage fails with CommError naming rank 1, long before the
// 5 s timeout.
TEST(PipelineStep, LostPeerFailsTheStepQuickly) {
  dtrain::comm::TcpOptions small_buffers;
  small_buffers.shm_ring_bytes = 64 << 10;
  small_buffers.socket_buffer_bytes = 64 << 10;
  for (ScheduleKind kind : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    SCOPED_TRACE(par::schedule_name(kind));
    std::atomic<bool> gone{false};
    Clock::time_point event;
    run_ranks_owning(
        2,
        [&](OwnedComm& comm) {
          const auto options = big_options(kind);
          if (comm->rank() == 1) {
            Tensor first = dtrain::empty(options.activation_shape);
            comm->recv(first.raw_data(), static_cast<size_t>(first.numel()), first.dtype(), 0);
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            event = Clock::now();
            gone.store(true);
            comm.reset();
            return;
          }
          const Tensor x = randn({64 * 4, 8192}, 5);
          try {
            par::run_pipeline_step(
                *comm, options, [](const Tensor& t) { return dtrain::tanh(t); }, nullptr,
                split_rows(x, 4));
            ADD_FAILURE() << "the step succeeded without its last stage";
          } catch (const dtrain::CommError& e) {
            while (!gone.load()) std::this_thread::yield();
            EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
            EXPECT_LT(ms_since(event), 1500.0) << e.what();
          }
        },
        small_buffers, std::chrono::seconds(5));
  }
}

// A stage whose loss throws rethrows it and aborts the pp communicator, so the other
// stage fails at once with CommError carrying the reason, not after the timeout.
TEST(PipelineStep, ThrowingStageAbortsThePipeline) {
  const auto t0 = Clock::now();
  run_ranks(
      2,
      [&](Communicator& pp) {
        const auto options = big_options(ScheduleKind::k1F1B);
        const Tensor x = randn({64 * 4, 8192}, 6);
        auto stage = [](const Tensor& t) { return dtrain::tanh(t); };
        auto loss = [](const Tensor& y, int mb) -> Tensor {
          DTRAIN_CHECK(mb < 1, InvalidArgument, "bad loss for micro-batch {}", mb);
          return dtrain::mean(y);
        };
        if (pp.rank() == 1) {
          EXPECT_THROW(par::run_pipeline_step(pp, options, stage, loss, {}),
                       dtrain::InvalidArgument);
        } else {
          try {
            par::run_pipeline_step(pp, options, stage, nullptr, split_rows(x, 4));
            ADD_FAILURE() << "the step succeeded although stage 1 threw";
          } catch (const dtrain::CommError& e) {
            EXPECT_NE(std::string(e.what()).find("bad loss for micro-batch 1"), std::string::npos)
                << e.what();
          }
        }
      },
      {}, std::chrono::seconds(20));
  EXPECT_LT(ms_since(t0), 5000.0);
}

}  // namespace
