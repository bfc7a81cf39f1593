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
#include <mpi.h>

#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "cmd_bench_collectives.h"
#include "dtrain/comm/mpi.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/common/error.h"

namespace dtrain::cli::bench_detail {

PairedTime paired_loop(comm::Communicator& comm, const LoopTiming& t,
                       const std::function<void()>& ours, const std::function<void()>& peer) {
  check_timing(t);
  for (int i = 0; i < t.warmup; ++i) ours(), peer();
  std::vector<double> a, b, ratio;
  // Twice the trials of an unpaired sweep, each pair in alternating order (ours first,
  // then the peer first), so that neither side always runs on the other's cache.
  for (int r = 0; r < 2 * t.trials; ++r) {
    const bool ours_first = r % 2 == 0;
    const double first = time_round(comm, t.iters, ours_first ? ours : peer);
    const double second = time_round(comm, t.iters, ours_first ? peer : ours);
    a.push_back(ours_first ? first : second);
    b.push_back(ours_first ? second : first);
    ratio.push_back(b.back() / a.back());
  }
  return {median_of(std::move(a)), median_of(std::move(b)), median_of(std::move(ratio))};
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
  if (backend == "tcp-noshm") ::setenv("DTRAIN_SHM", "0", 1);  // read by TcpOptions::from_env
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
  return run_allreduce_sweep(
      comm, backend, sizes, out_path, [&](std::vector<float>& buf, int64_t nbytes) {
        const int count = static_cast<int>(buf.size());
        auto ours = [&] {
          comm.allreduce(buf.data(), buf.size(), DType::f32, comm::ReduceOp::kSum);
        };
        auto peer = [&] {
          MPI_Allreduce(MPI_IN_PLACE, buf.data(), count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        };
        const PairedTime t = paired_loop(comm, loop_timing(nbytes), ours, peer);
        return SizeTiming{t.ours,
                          {{"peer_time_us", t.peer * 1e6},
                           {"peer_busbw_GBps", allreduce_busbw(nbytes, t.peer, comm.size())},
                           {"paired_ratio", t.ratio}}};
      });
}

}  // namespace dtrain::cli::bench_detail
