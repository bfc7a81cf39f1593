// A GPT on every dp x tp x pp mesh of up to 8 ranks (threads over the real tcp
// backend), through parallel::GptOnMesh, against the 1-process run: 20 AdamW steps,
// losses and final parameter slices within 1e-5 relative (gpt_mesh_oracle.h), with
// and without ZeRO-1/2/3 and gradient clipping, under 1F1B and GPipe; each split holds
// exactly its share of the parameters; impossible splits are refused in one line.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <string>

#include "dtrain/common/error.h"
#include "dtrain/parallel/gpt_checkpoint.h"
#include "dtrain/parallel/mesh.h"
#include "dtrain/parallel/schedule.h"
#include "gpt_mesh_oracle.h"
#include "rank_threads.h"

namespace {

using dtrain::comm::Communicator;
namespace par = dtrain::parallel;
namespace dt = dtrain::testing;
namespace fs = std::filesystem;

const char* const kMeshes[] = {"dp=1",      "dp=2",      "tp=2",      "pp=2",
                               "dp=2,tp=2", "tp=2,pp=2", "dp=2,pp=2", "dp=2,tp=2,pp=2"};

void run_mesh(const std::string& spec, const dt::OracleRun& ref, par::GptMeshOptions o) {
  SCOPED_TRACE(spec + " zero " + std::to_string(o.zero) + " clip " + std::to_string(o.clip));
  const par::MeshShape shape = par::MeshShape::parse(spec);
  if (shape.pp > 1) o.microbatches = 2;
  dt::run_tcp_ranks(shape.world(), "gpt-mesh", [&](int, Communicator& world) {
    par::ProcessMesh mesh(world, shape);
    dt::expect_mesh_follows(ref, mesh, o);
  });
}

TEST(GptMesh, EveryMeshFollowsTheOneProcessRun) {
  const dt::OracleRun ref = dt::oracle_run(0);
  ASSERT_LT(ref.losses.back(), ref.losses.front());  // it trains
  for (const char* spec : kMeshes) run_mesh(spec, ref, {});
}

TEST(GptMesh, ZeroAndClippingOnEveryMesh) {
  const double clip = 2.0;  // below the gradient norm of every step: always clips
  const dt::OracleRun ref = dt::oracle_run(clip);
  for (const char* spec : kMeshes) {
    for (int zero : {0, 1, 2, 3}) run_mesh(spec, ref, {.zero = zero, .clip = clip});
  }
}

TEST(GptMesh, GPipeFourStagesAndAHandMadeSplit) {
  const dt::OracleRun ref = dt::oracle_run(0);
  run_mesh("pp=2", ref, {.schedule = par::ScheduleKind::kGPipe});
  run_mesh("pp=4", ref, {});
  run_mesh("pp=2", ref, {.stage_starts = {0, 1}});  // the embedding alone on stage 0
}

// train_state() / load_train_state() on the same mesh: 10 steps, a fresh GptOnMesh
// loads the state, 10 more steps follow the uninterrupted oracle run.
TEST(GptMesh, TrainStateResumesTheRun) {
  const dt::OracleRun ref = dt::oracle_run(0);
  for (const char* spec : {"dp=2,tp=2", "tp=2,pp=2", "dp=2,pp=2"}) {
    for (int zero : {0, 1, 2, 3}) {
      SCOPED_TRACE(std::string(spec) + " zero " + std::to_string(zero));
      const par::MeshShape shape = par::MeshShape::parse(spec);
      const par::GptMeshOptions o{.zero = zero, .microbatches = shape.pp > 1 ? 2 : 1};
      dt::run_tcp_ranks(shape.world(), "gpt-resume", [&](int, Communicator& world) {
        par::ProcessMesh mesh(world, shape);
        dtrain::nn::StateDict state;
        {
          par::GptOnMesh first(mesh, dt::small_gpt(), o);
          dt::follow_steps(ref, first, 0, dt::kSteps / 2);
          state = first.train_state();
        }
        EXPECT_EQ(state.at("step").item(), dt::kSteps / 2);
        par::GptOnMesh second(mesh, dt::small_gpt(), o);
        second.load_train_state(state);
        dt::follow_steps(ref, second, dt::kSteps / 2, dt::kSteps);
        dt::expect_final_params(ref, second, o);
      });
    }
  }
}

// Acceptance: a checkpoint saved at one mesh loads at another (gpt_checkpoint.h) and
// the run goes on as if uninterrupted: saved after 10 steps at (dp=2,tp=2)+ZeRO-1,
// loaded at pp=4 and at 1 process; saved at dp=2+ZeRO-3, loaded at tp=2,pp=2.
void reshard(const dt::OracleRun& ref, const std::string& from, par::GptMeshOptions from_o,
             const std::string& to, par::GptMeshOptions to_o) {
  SCOPED_TRACE(from + " -> " + to);
  const fs::path dir = fs::temp_directory_path() / ("dtrain_gpt_reshard_" + std::to_string(::getpid()));
  const par::MeshShape a = par::MeshShape::parse(from), b = par::MeshShape::parse(to);
  if (a.pp > 1) from_o.microbatches = 2;
  if (b.pp > 1) to_o.microbatches = 2;
  dt::run_tcp_ranks(a.world(), "gpt-save", [&](int, Communicator& world) {
    par::ProcessMesh mesh(world, a);
    par::GptOnMesh run(mesh, dt::small_gpt(), from_o);
    dt::follow_steps(ref, run, 0, dt::kSteps / 2);
    par::save_gpt_sharded(dir.string(), *run.model(), mesh, run.train_state(), {{"mesh", from}});
  });
  dt::run_tcp_ranks(b.world(), "gpt-load", [&](int, Communicator& world) {
    par::ProcessMesh mesh(world, b);
    par::GptOnMesh run(mesh, dt::small_gpt(), to_o);
    run.load_train_state(par::load_gpt_sharded(dir.string(), *run.model(), run.train_state()));
    dt::follow_steps(ref, run, dt::kSteps / 2, dt::kSteps);
    dt::expect_final_params(ref, run, to_o);
  });
  fs::remove_all(dir);
}

TEST(GptMesh, CheckpointsLoadAtAnotherMesh) {
  const dt::OracleRun ref = dt::oracle_run(0);
  reshard(ref, "dp=2,tp=2", {.zero = 1}, "pp=4", {});
  reshard(ref, "dp=2,tp=2", {.zero = 1}, "dp=1", {});
  reshard(ref, "dp=2", {.zero = 3}, "tp=2,pp=2", {});
  reshard(ref, "tp=2,pp=2", {}, "dp=4", {.zero = 2});
}

// bf16 autocast (amp.h): the run trains like the f32 one (losses within 2%) but is
// not it (the GEMM operands are rounded: up to ~5e-5 apart here); a tp x pp mesh
// follows the 1-process bf16 run much closer than the f32 one (bf16 roundings of
// sums that differ in the last f32 bit may flip, so not to 1e-5).
TEST(GptMesh, Bf16AutocastTrainsAndSplits) {
  const dt::OracleRun f32 = dt::oracle_run(0);
  std::vector<double> one;
  dt::run_tcp_ranks(1, "gpt-bf16", [&](int, Communicator& world) {
    par::ProcessMesh mesh(world, par::MeshShape{});
    par::GptOnMesh run(mesh, dt::small_gpt(), {.bf16 = true});
    for (int s = 0; s < dt::kSteps; ++s) {
      auto [x, y] = dt::batch_of(s, dt::small_gpt());
      one.push_back(run.train_step(x, y, dt::kLr));
    }
  });
  double max_diff = 0;
  for (int s = 0; s < dt::kSteps; ++s) {
    const double a = one[static_cast<size_t>(s)], b = f32.losses[static_cast<size_t>(s)];
    EXPECT_NEAR(a, b, 0.02 * b) << "step " << s;
    max_diff = std::max(max_diff, std::abs(a - b) / b);
  }
  EXPECT_GT(max_diff, 1e-5) << "bf16 autocast changed nothing";
  EXPECT_LT(one.back(), one.front());
  dt::run_tcp_ranks(4, "gpt-bf16-mesh", [&](int, Communicator& world) {
    par::ProcessMesh mesh(world, par::MeshShape::parse("tp=2,pp=2"));
    par::GptOnMesh run(mesh, dt::small_gpt(), {.microbatches = 2, .bf16 = true});
    double to_bf16 = 0, to_f32 = 0;
    for (int s = 0; s < dt::kSteps; ++s) {
      auto [x, y] = dt::batch_of(s, dt::small_gpt());
      const double loss = run.train_step(x, y, dt::kLr), want = one[static_cast<size_t>(s)];
      EXPECT_NEAR(loss, want, 1e-4 * want) << "step " << s;
      to_bf16 += std::abs(loss - want);
      to_f32 += std::abs(loss - f32.losses[static_cast<size_t>(s)]);
    }
    EXPECT_LT(to_bf16, 0.5 * to_f32) << "the mesh run is not the bf16 run";
  });
}

// Per-rank parameter elements: every tp-sliced tensor / tp, each stage its layers.
TEST(GptMesh, EachSplitReallyShards) {
  const dtrain::nn::GptConfig c = dt::small_gpt();
  const int64_t C = c.n_embd, V = c.vocab_size, T = c.block_size;
  const int64_t block_sliced = 12 * C * C + 6 * C, block_whole = 6 * C;  // 4 LayerNorm, 2 biases
  for (const char* spec : {"tp=2", "pp=2", "tp=2,pp=2", "tp=4", "pp=4"}) {
    SCOPED_TRACE(spec);
    const par::MeshShape shape = par::MeshShape::parse(spec);
    dt::run_tcp_ranks(shape.world(), "gpt-shards", [&](int, Communicator& world) {
      par::ProcessMesh mesh(world, shape);
      par::GptOnMesh run(mesh, c, {});
      const dtrain::nn::GptStage& st = run.model()->stage();
      const int64_t tp = shape.tp;
      const int64_t want = (st.embedding ? V * C / tp + T * C : 0) +
                           (st.end_block - st.first_block) * (block_sliced / tp + block_whole) +
                           (st.head ? (st.embedding ? 0 : V * C / tp) + 2 * C : 0);
      EXPECT_EQ(run.model()->num_parameters(), want) << "rank " << world.rank();
      EXPECT_EQ(run.optimizer_state_bytes(), 8 * want);
    });
  }
}

// ZeRO-1/2: Adam state 8 bytes x ceil(P_local / dp). ZeRO-3: the blocks' parameters
// and state are dp shards too (each block one padded flat unit); the rest as ZeRO-1.
TEST(GptMesh, ZeroShardsStateAndParameters) {
  const dtrain::nn::GptConfig c = dt::small_gpt();
  const int64_t C = c.n_embd;
  for (int zero : {1, 2, 3}) {
    dt::run_tcp_ranks(4, "gpt-zero-bytes", [&](int, Communicator& world) {
      par::ProcessMesh mesh(world, par::MeshShape::parse("dp=2,tp=2"));
      par::GptOnMesh run(mesh, c, {.zero = zero});
      const int64_t dp = 2, tp = 2;
      const int64_t block = (12 * C * C + 6 * C) / tp + 6 * C;
      const int64_t rest = c.vocab_size * C / tp + c.block_size * C + 2 * C;
      const int64_t local = rest + c.n_layer * block;
      if (zero < 3) {
        EXPECT_EQ(run.parameter_elements(), local);
        EXPECT_EQ(run.optimizer_state_bytes(), 8 * ((local + dp - 1) / dp));
        return;
      }
      const int64_t block_shard = (block + dp - 1) / dp;
      EXPECT_EQ(run.parameter_elements(), rest + c.n_layer * block_shard);
      EXPECT_EQ(run.optimizer_state_bytes(), 8 * ((rest + dp - 1) / dp + c.n_layer * block_shard));
    });
  }
}

template <typename Error>
void expect_refused(const std::string& spec, par::GptMeshOptions o, const std::string& text) {
  const par::MeshShape shape = par::MeshShape::parse(spec);
  dt::run_tcp_ranks(shape.world(), "gpt-refuse", [&](int, Communicator& world) {
    par::ProcessMesh mesh(world, shape);
    try {
      par::GptOnMesh run(mesh, dt::small_gpt(), o);
      ADD_FAILURE() << spec << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  });
}

TEST(GptMesh, ImpossibleSplitsAreRefused) {
  // 2 blocks + embedding + head = 4 layers: 5 stages cannot be made.
  expect_refused<dtrain::InvalidArgument>("pp=5", {}, "5 stages");
  expect_refused<dtrain::InvalidArgument>("dp=1", {.zero = 4}, "--zero 4");
  expect_refused<dtrain::InvalidArgument>("pp=2", {.stage_starts = {0, 4}}, "--stage-split");
  EXPECT_THROW(par::parse_stage_starts("0,x", dt::small_gpt(), 2), dtrain::InvalidArgument);
  EXPECT_EQ(par::parse_stage_starts("0,3", dt::small_gpt(), 2), (std::vector<int64_t>{0, 3}));
}

}  // namespace
