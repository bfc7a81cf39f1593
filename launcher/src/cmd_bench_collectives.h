// `dtrain bench all_gather | reduce_scatter | sendrecv` (cmd_bench_collectives.cc), and
// the pieces of cmd_bench.cc both files use: spawning the workers of a backend, reading
// their JSON lines, opening a worker's session.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/comm/algorithm.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/common/process.h"
#include "worker_session.h"

namespace dtrain::cli {
namespace bench_detail {

std::string self_exe();
using dtrain::run_capture;  // dtrain/common/process.h
// The lines of `text` that parse as JSON objects.
std::vector<nlohmann::json> json_lines(const std::string& text);
// `worker` (a command line) on `nproc` ranks of `backend`: tcp and tcp-noshm through
// `dtrain launch`, mpi and mpi-native through mpirun.
std::string launch_command(const std::string& backend, int nproc, const std::string& worker);
// This worker's session on `backend` (tcp, tcp-noshm, mpi, mpi-native).
std::unique_ptr<WorkerSession> open_bench_session(const std::string& backend);

// How every bench worker (and its peers: bench/peers_mpi_collectives.cpp,
// bench/peers/gloo_allreduce.py) times one size, nccl-tests' way: `warmup` operations,
// then `trials` rounds of a barrier and `iters` operations back to back; a round's
// time per operation is the slowest rank's (max over ranks: the collective is done
// when the last rank is), the median round is reported. One operation after a
// barrier measured who left the barrier last, not the link (docs/scaling.md).
struct LoopTiming {
  int warmup = 5;
  int iters = 50;
  int trials = 5;
};
// iters = 64 MiB / bytes clamped to [4, 50] (a round of ~64 MiB moved); 5 trials below
// 1 MiB, 3 from there; warm-up min(5, iters).
LoopTiming loop_timing(int64_t bytes);
// Seconds per `op` on the slowest rank, median over the trials; every rank returns
// the same figure. `op` runs warmup + trials x iters times.
double time_loop(comm::Communicator& comm, const LoopTiming& t, const std::function<void()>& op);

// The all-reduce algorithm the tcp communicator `comm` runs for `bytes` (after its
// setup probes: comm::tcp_algorithm). What the bench rows record.
comm::Algo tcp_allreduce_algo(const comm::Communicator& comm, size_t bytes);

// ---- bench allreduce's rows (cmd_bench.cc) and its paired sweep (cmd_bench_paired.cc) ----
// 2000 8 B all-reduces: the launcher and the coordinator still start up beside the
// workers for a moment (nccl-tests warms up too).
void warm_up_allreduce(comm::Communicator& comm);
// Refills `buf` with rank + 1, all-reduces it (f32 sum) and returns the elements that
// differ from n(n+1)/2, summed over every rank.
int64_t count_wrong_allreduce(comm::Communicator& comm, std::vector<float>& buf);
// Rank 0's JSON row of one size: backend, nproc, bytes, count, time_us, algbw_GBps,
// busbw_GBps (algbw x 2(n-1)/n), wrong, and for the tcp backends the algorithm run.
nlohmann::json allreduce_row(const std::string& backend, const comm::Communicator& comm,
                             int64_t nbytes, double seconds, int64_t wrong);

// One size of the paired sweep: ours and the peer's seconds per operation (each the
// median round) and the median over rounds of peer / ours (ours' busbw against the
// peer's, round by round).
struct PairedTime {
  double ours = 0, peer = 0, ratio = 0;
};
// `t.warmup` calls of each, then 2 x t.trials rounds of each (a round as time_loop's:
// barrier, t.iters calls, the slowest rank's time), ours and the peer alternating,
// every second pair with the peer first.
PairedTime paired_loop(comm::Communicator& comm, const LoopTiming& t,
                       const std::function<void()>& ours, const std::function<void()>& peer);
// `worker` on `nproc` ranks under mpirun (every backend: the peer is MPI_Allreduce in
// the same processes); tcp workers get --store-dir (their bootstrap), tcp-noshm also
// DTRAIN_SHM=0.
std::string paired_launch_command(const std::string& backend, int nproc, const std::string& worker,
                                  const std::string& store_dir);
// One rank of the paired sweep (started by paired_launch_command): per size, ours and
// MPI_Allreduce on MPI_COMM_WORLD through paired_loop, then #wrong; rank 0 writes
// allreduce_row plus peer_time_us, peer_busbw_GBps and paired_ratio to `out`.
int run_paired_allreduce_worker(const std::string& backend, const std::vector<int64_t>& sizes,
                                const std::string& store_dir, const std::string& out);

}  // namespace bench_detail

// Registers the three collectives' subcommands on `bench`. The returned function runs the
// one that was parsed and returns its exit code, or nullopt when none of them was.
std::function<std::optional<int>()> add_collective_benches(CLI::App& bench);
// `dtrain bench gpt` (cmd_bench_gpt.cc), registered the same way.
std::function<std::optional<int>()> add_gpt_bench(CLI::App& bench);
// `dtrain bench hosts` (cmd_bench_hosts.cc), registered the same way.
std::function<std::optional<int>()> add_hosts_bench(CLI::App& bench);

}  // namespace dtrain::cli
