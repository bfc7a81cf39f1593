// The GPT on every mesh of the acceptance list (1 to 8 ranks), with MPI processes as
// the ranks (ctest runs this binary under mpirun -np 8: entry gpt_mpi_np8): the same
// comparison as the tcp suite (test_gpt_mesh.cc), through parallel::GptOnMesh on a
// ProcessMesh over an mpi communicator, against the 1-process run that every rank
// computes itself (gpt_mesh_oracle.h): plain, ZeRO-1 with clipping, ZeRO-2 and ZeRO-3
// where dp > 1. A mesh of fewer than 8 ranks runs on each group of that many ranks,
// split from the world (Communicator::split), all groups at once.
//
// Agreement without hanging: a rank that stops early (a failed ASSERT) leaves its peers
// in a collective, which fails with TimeoutError after kRunTimeout (caught, a failure on
// that rank). After every run the ranks all-reduce "failed so far" over a communicator
// of their own, so a test fails on every rank when it failed on any; when that verdict
// cannot be reached within kVerdictTimeout the job ends (MpiRuntime::abort_job) instead
// of waiting forever. The exit status is agreed the same way.
//
// Output: rank 0 prints GoogleTest's usual report; the other ranks run in brief mode
// (their failures and a summary line). Every failure inside a run names its rank, mesh and options.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "dtrain/comm/mpi.h"
#include "dtrain/common/error.h"
#include "dtrain/parallel/mesh.h"
#include "gpt_mesh_oracle.h"

namespace {

namespace comm = dtrain::comm;
namespace par = dtrain::parallel;
namespace dt = dtrain::testing;
using std::chrono::milliseconds;

constexpr int kRanks = 8;
constexpr milliseconds kRunTimeout{5'000};       // any one collective of a mesh run
constexpr milliseconds kVerdictTimeout{60'000};  // the slowest rank's timeouts and more

const char* const kMeshes[] = {"dp=1",      "dp=2",      "tp=2",      "pp=2",
                               "dp=2,tp=2", "tp=2,pp=2", "dp=2,pp=2", "dp=2,tp=2,pp=2"};

// The live runtime: main() holds it, so this never initialises MPI again.
std::shared_ptr<comm::MpiRuntime> mpi() { return comm::MpiRuntime::init(); }

// A fresh communicator over every process (collective, bounded by `timeout`).
std::unique_ptr<comm::Communicator> world(milliseconds timeout) {
  return comm::make_mpi_communicator(mpi(), comm::CommOptions{timeout});
}

// True on every rank when `failed_here` is true on any. Ends the job (exit status 3)
// when the ranks cannot agree within kVerdictTimeout: one of them is stuck.
bool failed_anywhere(bool failed_here) {
  try {
    int32_t failed = failed_here ? 1 : 0;
    world(kVerdictTimeout)->allreduce(&failed, 1, dtrain::DType::i32, comm::ReduceOp::kMax);
    return failed != 0;
  } catch (const dtrain::Error& e) {
    std::fprintf(stderr, "[rank %d] the ranks cannot agree on a verdict: %s\n",
                 mpi()->world_rank(), e.what());
    mpi()->abort_job(3);
  }
}

// One mesh run on this rank, then the verdict of every rank for the test so far.
void run_mesh(const std::string& spec, const dt::OracleRun& ref, par::GptMeshOptions o) {
  const par::MeshShape shape = par::MeshShape::parse(spec);
  if (shape.pp > 1) o.microbatches = 2;
  SCOPED_TRACE("rank " + std::to_string(mpi()->world_rank()) + " of " + spec + " zero " +
               std::to_string(o.zero) + " clip " + std::to_string(o.clip));
  try {
    const std::unique_ptr<comm::Communicator> all = world(kRunTimeout);
    const int group = all->rank() / shape.world();
    const std::unique_ptr<comm::Communicator> comm = all->split(group, all->rank());
    par::ProcessMesh mesh(*comm, shape);
    dt::expect_mesh_follows(ref, mesh, o);
  } catch (const dtrain::Error& e) {  // TimeoutError when a peer stopped early
    ADD_FAILURE() << e.what();
  }
  const bool here = ::testing::Test::HasFailure();
  if (failed_anywhere(here) && !here) ADD_FAILURE() << "failed on another rank (see its lines)";
}

TEST(GptMpi, EveryMeshFollowsTheOneProcessRun) {
  const dt::OracleRun ref = dt::oracle_run(0);
  ASSERT_LT(ref.losses.back(), ref.losses.front());  // it trains
  for (const char* spec : kMeshes) {
    run_mesh(spec, ref, {});
    if (par::MeshShape::parse(spec).dp == 1) continue;  // ZeRO over one rank: ZeRO-1's run
    run_mesh(spec, ref, {.zero = 2});
    run_mesh(spec, ref, {.zero = 3});
  }
}

TEST(GptMpi, ZeroOneAndClippingOnEveryMesh) {
  const double clip = 0.5;
  const dt::OracleRun ref = dt::oracle_run(clip);
  // Below the gradient norm of most steps: clipping really changes the run.
  const auto clipped = std::count_if(ref.grad_norms.begin(), ref.grad_norms.end(),
                                     [&](double norm) { return norm > clip; });
  ASSERT_GE(clipped, dt::kSteps / 2);
  for (const char* spec : kMeshes) run_mesh(spec, ref, {.zero = 1, .clip = clip});
}

}  // namespace

int main(int argc, char** argv) {
  const std::shared_ptr<comm::MpiRuntime> runtime = comm::MpiRuntime::init();
  if (runtime->world_size() != kRanks) {
    if (runtime->world_rank() == 0) std::fprintf(stderr, "run me with mpirun -np %d\n", kRanks);
    return 1;
  }
  // Before InitGoogleTest, which picks the printer.
  if (runtime->world_rank() != 0) GTEST_FLAG_SET(brief, true);
  testing::InitGoogleTest(&argc, argv);
  const bool failed = RUN_ALL_TESTS() != 0;
  return failed_anywhere(failed) ? 1 : 0;
}
