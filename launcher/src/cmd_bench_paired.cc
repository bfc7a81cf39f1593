// `dtrain bench allreduce`'s paired sweep: our all-reduce and Open MPI's MPI_Allreduce
// timed in the same processes of one mpirun job, round by round.
//
// Why: this VM's speed drifts by 2-3x between runs of the same configuration (the
// load of the other guests), so a ratio of two sweeps taken a minute apart measures
// the drift as much as the code. Here every size alternates rounds of ours and of
// MPI_Allreduce on the same buffer, with the same pinning (mpirun's), and the ratio
// is the median of the per-round ratios: what one round's drift does to both sides
// cancels. The tcp backend bootstraps through a FileStore in a folder the orchestrator
// names (every rank is on this host); the mpi backends open their session as any
// worker under mpirun does.
#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cmd_bench_collectives.h"
#include "dtrain/comm/mpi.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/common/error.h"
#include "worker_env.h"

namespace dtrain::cli::bench_detail {

namespace {

// Seconds of `iters` calls of `op` on the slowest rank.
double one_round(comm::Communicator& comm, int iters, const std::function<void()>& op) {
  comm.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) op();
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  comm.allreduce(&dt, 1, DType::f64, comm::ReduceOp::kMax);
  return dt / iters;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

PairedTime paired_loop(comm::Communicator& comm, const LoopTiming& t,
                       const std::function<void()>& ours, const std::function<void()>& peer) {
  DTRAIN_CHECK(t.iters >= 1 && t.trials >= 1 && t.warmup >= 0, InvalidArgument,
               "bench: iters {}, trials {}, warm-up {}: expected iters, trials >= 1", t.iters,
               t.trials, t.warmup);
  for (int i = 0; i < t.warmup; ++i) ours(), peer();
  std::vector<double> a, b, ratio;
  // Twice the trials of an unpaired sweep, each pair in alternating order (ours first,
  // then the peer first), so that neither side always runs on the other's cache.
  for (int r = 0; r < 2 * t.trials; ++r) {
    const bool ours_first = r % 2 == 0;
    const double first = one_round(comm, t.iters, ours_first ? ours : peer);
    const double second = one_round(comm, t.iters, ours_first ? peer : ours);
    a.push_back(ours_first ? first : second);
    b.push_back(ours_first ? second : first);
    ratio.push_back(b.back() / a.back());
  }
  return {median(a), median(b), median(ratio)};
}

std::string paired_launch_command(const std::string& backend, int nproc, const std::string& worker,
                                  const std::string& store_dir) {
  const bool tcp = backend == "tcp" || backend == "tcp-noshm";
  return fmt::format("mpirun --allow-run-as-root --oversubscribe -np {}{} {}{} 2>&1", nproc,
                     backend == "tcp-noshm" ? " -x DTRAIN_SHM=0" : "", worker,
                     tcp ? " --store-dir " + store_dir : "");
}

namespace {

// The communicator the sweep measures, and what it needs to outlive it.
struct PairedComm {
  std::shared_ptr<comm::MpiRuntime> runtime;  // MPI for the peer (and the mpi backends)
  std::unique_ptr<comm::FileStore> store;     // tcp bootstrap
  std::unique_ptr<WorkerSession> session;     // mpi backends
  std::unique_ptr<comm::Communicator> tcp;
  comm::Communicator& get() { return tcp ? *tcp : session->comm(); }
};

void open_paired(const std::string& backend, const std::string& store_dir, PairedComm& c) {
  c.runtime = comm::MpiRuntime::init();
  if (backend.rfind("mpi", 0) == 0) {
    c.session = open_bench_session(backend);
    return;
  }
  DTRAIN_CHECK(
      !store_dir.empty(), InvalidArgument,
      "bench allreduce --paired-worker --backend {}: a paired tcp worker needs --store-dir",
      backend);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  c.store = std::make_unique<comm::FileStore>(store_dir);
  c.tcp = comm::make_tcp_communicator(*c.store, rank, size, comm::CommOptions{});
}

}  // namespace

int run_paired_allreduce_worker(const std::string& backend, const std::vector<int64_t>& sizes,
                                const std::string& store_dir, const std::string& out_path) {
  PairedComm pc;
  open_paired(backend, store_dir, pc);
  comm::Communicator& comm = pc.get();
  std::ofstream out;
  if (comm.rank() == 0) {
    out.open(out_path, std::ios::trunc);
    DTRAIN_CHECK(out.good(), IoError, "bench: cannot write {}", out_path);
  }
  warm_up_allreduce(comm);
  for (int64_t nbytes : sizes) {
    const size_t count = static_cast<size_t>(std::max<int64_t>(1, nbytes / 4));
    std::vector<float> buf(count, 0.0f);  // zeros: in-place sums stay finite
    auto ours = [&] { comm.allreduce(buf.data(), count, DType::f32, comm::ReduceOp::kSum); };
    auto peer = [&] {
      MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM,
                    MPI_COMM_WORLD);
    };
    const PairedTime t = paired_loop(comm, loop_timing(nbytes), ours, peer);
    const int64_t wrong = count_wrong_allreduce(comm, buf);
    if (comm.rank() != 0) continue;
    nlohmann::json row = allreduce_row(backend, comm, nbytes, t.ours, wrong);
    const double n = comm.size();
    row["peer_time_us"] = t.peer * 1e6;
    row["peer_busbw_GBps"] = static_cast<double>(nbytes) / t.peer / 1e9 * 2.0 * (n - 1) / n;
    row["paired_ratio"] = t.ratio;
    out << row.dump() << "\n";
    out.flush();
  }
  return 0;
}

}  // namespace dtrain::cli::bench_detail
