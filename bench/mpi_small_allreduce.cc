// Small all-reduces on the mpi backend against MPI_Allreduce, in one mpirun job (run
// under mpirun, 2 ranks: `mpirun -np 2 build/bench/mpi_small_allreduce`). Per size and
// in alternating blocks (the same minutes for both):
//   back-to-back  dependent calls in a row, the median over groups of 50 of their mean:
//                 the per-call cost, free of the barrier's exit skew;
//   after barrier the bench allreduce protocol (barrier, time one call), the median over
//                 the block on rank 0 and on the last rank: `dtrain bench allreduce`
//                 times rank 0 only, and with the shared-memory slots rank 0's figure
//                 depends on whether it leaves the barrier first (then it also waits for
//                 its peer) or last (its peer's input is already there).
// Both run in the same process under MPI_THREAD_MULTIPLE (which the backend needs), so
// Open MPI's figure carries its thread-safety cost; `dtrain bench allreduce` has the
// peer in a process of its own (MPI_Init): `--peer` runs that one alone, for a second
// mpirun job right after. Prints the medians over the blocks and ours / MPI's time.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "dtrain/comm/mpi.h"

namespace {

using Clock = std::chrono::steady_clock;
using dtrain::DType;
using dtrain::comm::Communicator;
using dtrain::comm::ReduceOp;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double us_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

// One implementation under test: the backend or MPI_Allreduce.
struct Side {
  Communicator* comm = nullptr;  // nullptr: Open MPI
  void allreduce(std::vector<float>& x) const {
    if (comm != nullptr) return comm->allreduce(x.data(), x.size(), DType::f32, ReduceOp::kSum);
    MPI_Allreduce(MPI_IN_PLACE, x.data(), static_cast<int>(x.size()), MPI_FLOAT, MPI_SUM,
                  MPI_COMM_WORLD);
  }
  void barrier() const {
    if (comm != nullptr) return comm->barrier();
    MPI_Barrier(MPI_COMM_WORLD);
  }
};

struct Figures {
  std::vector<double> loop, rank0, last;  // one entry per block, us
};

// One block: `calls` back to back (in groups), then `calls` times barrier + one timed call; every
// rank's median after the barrier, gathered to see rank 0's and the last rank's.
void run_block(const Side& s, std::vector<float>& x, int calls, Figures& f) {
  // Groups of kGroup calls: the median group's mean drops the groups a preemption hit
  // (the plain mean of a block is the scheduler's figure on a loaded machine).
  constexpr int kGroup = 50;
  std::vector<double> groups;
  for (int g = 0; g < std::max(1, calls / kGroup); ++g) {
    const auto t0 = Clock::now();
    for (int i = 0; i < kGroup; ++i) s.allreduce(x);
    groups.push_back(us_since(t0) / kGroup);
  }
  f.loop.push_back(median(groups));
  std::vector<double> one;
  for (int i = 0; i < calls; ++i) {
    s.barrier();
    const auto t0 = Clock::now();
    s.allreduce(x);
    one.push_back(us_since(t0));
  }
  double mine = median(one);
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  std::vector<double> all(static_cast<size_t>(n));
  MPI_Allgather(&mine, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
  f.rank0.push_back(all.front());
  f.last.push_back(all.back());
}

void print_row(size_t bytes, const Figures& ours, const Figures& mpi) {
  auto cell = [](const std::vector<double>& a, const std::vector<double>& b) {
    return std::vector<double>{median(a), median(b), median(a) / median(b)};
  };
  const auto l = cell(ours.loop, mpi.loop), r0 = cell(ours.rank0, mpi.rank0),
             rl = cell(ours.last, mpi.last);
  std::printf("%8zu %9.3f %9.3f %6.2fx %9.3f %9.3f %6.2fx %9.3f %9.3f %6.2fx\n", bytes, l[0], l[1],
              l[2], r0[0], r0[1], r0[2], rl[0], rl[1], rl[2]);
}

}  // namespace

// --peer: MPI_Allreduce alone after a plain MPI_Init (no threads), as the peer process
// of `dtrain bench allreduce`: loop, rank 0 and last-rank medians per size.
int run_peer(int blocks, int calls, size_t max_bytes) {
  MPI_Init(nullptr, nullptr);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0)
    std::printf("#%7s %9s %9s %9s   (MPI_Init, MPI alone)\n", "bytes", "loop", "rank0", "last");
  for (size_t bytes = 8; bytes <= max_bytes; bytes *= 2) {
    std::vector<float> x(bytes / 4, 0.0f);
    const Side mpi{nullptr};
    for (int i = 0; i < 2000; ++i) mpi.allreduce(x);
    Figures f;
    for (int k = 0; k < blocks; ++k) run_block(mpi, x, calls, f);
    if (rank == 0) {
      std::printf("%8zu %9.3f %9.3f %9.3f\n", bytes, median(f.loop), median(f.rank0),
                  median(f.last));
    }
  }
  MPI_Finalize();
  return 0;
}

int main(int argc, char** argv) {
  CLI::App app{"Small all-reduces: the mpi backend against MPI_Allreduce (run under mpirun)"};
  int blocks = 10, calls = 2000;
  size_t max_bytes = 64;
  bool peer = false;
  app.add_option("--blocks", blocks, "Alternating blocks per size")->capture_default_str();
  app.add_option("--calls", calls, "Calls per block")->capture_default_str();
  app.add_option("--max-bytes", max_bytes, "Largest size (8 B, doubling)")->capture_default_str();
  app.add_flag("--peer", peer, "MPI_Allreduce alone, after MPI_Init (a run of its own)");
  CLI11_PARSE(app, argc, argv);
  if (peer) return run_peer(blocks, calls, max_bytes);

  auto runtime = dtrain::comm::MpiRuntime::init();
  dtrain::comm::MpiOptions mo;
  mo.algorithm = dtrain::comm::MpiAlgorithm::kAuto;  // as dtrain train and the bench
  auto comm = dtrain::comm::make_mpi_communicator(
      runtime, dtrain::comm::CommOptions{std::chrono::milliseconds(20'000)}, mo);
  const Side ours{comm.get()}, mpi{nullptr};
  if (comm->rank() == 0) {
    std::printf("# %d ranks, f32 sum in place, %d blocks x %d calls, times in us (ours / MPI)\n",
                comm->size(), blocks, calls);
    std::printf("#%7s %9s %9s %7s %9s %9s %7s %9s %9s %7s\n", "bytes", "loop", "MPI", "ratio",
                "rank0", "MPI", "ratio", "last", "MPI", "ratio");
  }
  for (size_t bytes = 8; bytes <= max_bytes; bytes *= 2) {
    std::vector<float> x(bytes / 4, 0.0f);  // stays 0: no overflow over the calls
    for (int i = 0; i < 2000; ++i) ours.allreduce(x), mpi.allreduce(x);  // warm-up
    Figures a, b;
    for (int k = 0; k < blocks; ++k) {
      run_block(ours, x, calls, a);
      run_block(mpi, x, calls, b);
    }
    if (comm->rank() == 0) print_row(bytes, a, b);
  }
  comm.reset();
  return 0;
}
