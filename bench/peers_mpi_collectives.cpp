// Open MPI's all-reduce, all-gather, reduce-scatter and send/recv in the nccl-tests format:
// the peer of `dtrain bench allreduce` (launcher/src/cmd_bench.cc, every doubling size
// where ../shared/bench/peers/mpi_allreduce.cpp measures six) and of
// `dtrain bench all_gather | reduce_scatter | sendrecv` (launcher/src/cmd_bench_collectives.cc),
// which compiles it with mpicxx and runs it under mpirun on the same sizes:
//   peers_mpi_collectives <all_reduce|all_gather|reduce_scatter|sendrecv> <min_bytes> <max_bytes>
// Same shapes, inputs, timing and #wrong as dtrain's workers: float; sizes doubling from
// min_bytes; per size the loop of bench_detail::time_loop (launcher/src/cmd_bench_collectives.cc):
// min(5, iters) warm-ups, then `trials` rounds of MPI_Barrier and `iters` operations back
// to back, iters = 64 MiB / size clamped to [4, 50], 5 trials below 1 MiB and 3 from there;
// a round's time per operation is the slowest rank's (MPI_MAX), the median round is
// reported; then one operation on refilled buffers counts #wrong (all_reduce times zeros
// in place, so repeated sums stay finite). MPI_Allgather, MPI_Reduce_scatter_block
// (sum) and MPI_Sendrecv (to rank+1, from rank-1; both directions overlap). One JSON line
// per size on stdout ({"peer": "openmpi", ...}), a table on stderr.
// Not a dtrain target (bench/CMakeLists.txt builds *.cc only): it needs only mpi.h.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

float value(int rank, long i) { return float(rank + 1) + float(i % 13) * 0.5f; }

struct Run {
  std::string coll;
  int rank, n;
  long count;  // floats per rank
  std::vector<float> send, recv, want;
};

void setup(Run& r) {
  const bool ag = r.coll == "all_gather", rs = r.coll == "reduce_scatter";
  if (r.coll == "all_reduce") {  // in place: recv holds the input, then the sum
    r.recv.resize(r.count);
    r.want.resize(r.count);
    for (long i = 0; i < r.count; ++i) {
      float sum = 0;
      for (int p = 0; p < r.n; ++p) sum += value(p, i);
      r.want[i] = sum;
    }
    return;
  }
  r.send.resize(rs ? r.count * r.n : r.count);
  for (long i = 0; i < long(r.send.size()); ++i) r.send[i] = value(r.rank, i);
  r.recv.assign(ag ? r.count * r.n : r.count, -1.0f);
  r.want.resize(r.recv.size());
  for (long i = 0; i < long(r.want.size()); ++i) {
    if (ag) {
      r.want[i] = value(int(i / r.count), i % r.count);
    } else if (rs) {
      float sum = 0;
      for (int p = 0; p < r.n; ++p) sum += value(p, r.rank * r.count + i);
      r.want[i] = sum;
    } else {
      r.want[i] = value((r.rank + r.n - 1) % r.n, i);
    }
  }
}

void refill(Run& r) {
  if (r.coll != "all_reduce") return std::fill(r.recv.begin(), r.recv.end(), -1.0f);
  for (long i = 0; i < r.count; ++i) r.recv[i] = value(r.rank, i);
}

void run_once(Run& r);

// Seconds per operation: the slowest rank's, median over the rounds (dtrain's time_loop).
double time_loop(Run& r, long nbytes) {
  const int iters = int(std::min(50L, std::max(4L, (64L << 20) / nbytes)));
  const int trials = nbytes < (1L << 20) ? 5 : 3;
  if (r.coll == "all_reduce") std::fill(r.recv.begin(), r.recv.end(), 0.0f);
  for (int i = 0; i < std::min(5, iters); ++i) run_once(r);
  std::vector<double> rounds;
  for (int k = 0; k < trials; ++k) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    for (int i = 0; i < iters; ++i) run_once(r);
    double dt = (MPI_Wtime() - t0) / iters;
    MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    rounds.push_back(dt);
  }
  std::sort(rounds.begin(), rounds.end());
  return rounds[rounds.size() / 2];
}

void run_once(Run& r) {
  if (r.coll == "all_reduce") {
    MPI_Allreduce(MPI_IN_PLACE, r.recv.data(), int(r.count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  } else if (r.coll == "all_gather") {
    MPI_Allgather(r.send.data(), int(r.count), MPI_FLOAT, r.recv.data(), int(r.count), MPI_FLOAT,
                  MPI_COMM_WORLD);
  } else if (r.coll == "reduce_scatter") {
    MPI_Reduce_scatter_block(r.send.data(), r.recv.data(), int(r.count), MPI_FLOAT, MPI_SUM,
                             MPI_COMM_WORLD);
  } else {
    MPI_Sendrecv(r.send.data(), int(r.count), MPI_FLOAT, (r.rank + 1) % r.n, 0, r.recv.data(),
                 int(r.count), MPI_FLOAT, (r.rank + r.n - 1) % r.n, 0, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Run r;
  MPI_Comm_rank(MPI_COMM_WORLD, &r.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &r.n);
  r.coll = argc > 1 ? argv[1] : "all_gather";
  const long min_bytes = argc > 2 ? std::atol(argv[2]) : 8;
  const long max_bytes = argc > 3 ? std::atol(argv[3]) : 64L << 20;
  if (r.coll != "all_gather" && r.coll != "reduce_scatter" && r.coll != "sendrecv" &&
      r.coll != "all_reduce") {
    if (r.rank == 0) std::fprintf(stderr, "unknown collective %s\n", r.coll.c_str());
    MPI_Finalize();
    return 2;
  }
  const bool ar = r.coll == "all_reduce";
  const int ranks = r.coll == "sendrecv" || ar ? 1 : r.n;
  const double factor = r.coll == "sendrecv" ? 1.0 : (ar ? 2.0 : 1.0) * double(r.n - 1) / r.n;
  if (r.rank == 0)
    std::fprintf(stderr, "%12s %12s %12s %12s %12s %7s\n", "size(B)", "count", "time(us)",
                 "algbw(GB/s)", "busbw(GB/s)", "#wrong");
  for (long requested = min_bytes; requested <= max_bytes; requested *= 2) {
    r.count = std::max(1L, requested / 4 / ranks);
    const long nbytes = r.count * ranks * 4;
    setup(r);
    const double t = time_loop(r, nbytes);
    refill(r);
    run_once(r);
    long wrong = 0, total = 0;
    for (size_t i = 0; i < r.want.size(); ++i) wrong += r.recv[i] != r.want[i];
    MPI_Reduce(&wrong, &total, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    if (r.rank == 0) {
      const double algbw = nbytes / t / 1e9, busbw = algbw * factor;
      std::fprintf(stderr, "%12ld %12ld %12.1f %12.3f %12.3f %7ld\n", nbytes, r.count, t * 1e6,
                   algbw, busbw, total);
      std::printf(
          "{\"peer\": \"openmpi\", \"coll\": \"%s\", \"nproc\": %d, \"bytes\": %ld, "
          "\"count\": %ld, \"time_us\": %.2f, \"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f, "
          "\"wrong\": %ld}\n",
          r.coll.c_str(), r.n, nbytes, r.count, t * 1e6, algbw, busbw, total);
      std::fflush(stdout);
    }
  }
  MPI_Finalize();
  return 0;
}
