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
// time_loop's pieces: InvalidArgument unless iters, trials >= 1 and warmup >= 0; one
// round (barrier, `iters` calls of `op`, the slowest rank's seconds per call); the
// median (upper middle) of `v`.
void check_timing(const LoopTiming& t);
double time_round(comm::Communicator& comm, int iters, const std::function<void()>& op);
double median_of(std::vector<double> v);

// The all-reduce algorithm the tcp communicator `comm` runs for `bytes` (after its
// setup probes: comm::tcp_algorithm). What the bench rows record.
comm::Algo tcp_allreduce_algo(const comm::Communicator& comm, size_t bytes);

// ---- bench allreduce's sweep (cmd_bench.cc), unpaired and paired (cmd_bench_paired.cc) ----
// One size's timing: seconds per all-reduce, and fields rank 0 adds to the size's row.
struct SizeTiming {
  double seconds = 0;
  nlohmann::json extra = nlohmann::json::object();
};
using TimeSize = std::function<SizeTiming(std::vector<float>& buf, int64_t nbytes)>;
// Rank 0 writes one JSON row per size of `sizes` to `out`, after 2000 8 B warm-up
// all-reduces: backend, nproc, bytes, count, time_us, algbw_GBps, busbw_GBps (algbw x
// 2(n-1)/n), #wrong (one f32 sum of refilled buffers, checked on every rank), for the tcp
// backends the algorithm run, and `time_size`'s extra fields. `buf` holds the size's
// count floats, zero (in-place sums stay finite).
int run_allreduce_sweep(comm::Communicator& comm, const std::string& backend,
                        const std::vector<int64_t>& sizes, const std::string& out,
                        const TimeSize& time_size);
// busbw in GB/s of an all-reduce of `nbytes` over `n` ranks taking `seconds`.
double allreduce_busbw(int64_t nbytes, double seconds, int n);

// One size of the paired sweep: ours and the peer's seconds per operation (each the
// median round) and the median over rounds of peer / ours (ours' busbw against the
// peer's, round by round).
struct PairedTime {
  double ours = 0, peer = 0, ratio = 0;
};
// `t.warmup` calls of each, then 2 x t.trials rounds of each (time_round), ours and the
// peer alternating, every second pair with the peer first.
PairedTime paired_loop(comm::Communicator& comm, const LoopTiming& t,
                       const std::function<void()>& ours, const std::function<void()>& peer);
// One rank of the paired sweep, under mpirun (launch_command's mpi form; tcp workers
// bootstrap through a FileStore in `store_dir`): per size, ours and MPI_Allreduce on
// MPI_COMM_WORLD through paired_loop; the rows of run_allreduce_sweep plus peer_time_us,
// peer_busbw_GBps and paired_ratio.
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
