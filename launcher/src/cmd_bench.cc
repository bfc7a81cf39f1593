// `dtrain bench allreduce`: all-reduce bandwidth in the nccl-tests format, with peers.
//
// The orchestrating process starts the workers itself: for the tcp backend through
// `dtrain launch --nproc N` (as `tcp`, with its same-host shared-memory path, and as
// `tcp-noshm`, with DTRAIN_SHM=0: plain loopback TCP), for the mpi backends through
// mpirun. Each worker runs the
// same sweep (8 B .. --max-bytes, doubling; f32 sum) with the peers' protocol
// (bench_detail::time_loop, nccl-tests' way): per size, warm up, then rounds of a
// barrier and `iters` all-reduces back to back, the slowest rank's time per operation,
// the median round; then one all-reduce of refilled buffers counts #wrong. tcp rows
// also name the algorithm the backend ran (bench_detail::tcp_allreduce_algo). Rank 0
// writes JSON lines that the orchestrator prints as the nccl-tests table (size, count,
// type, redop, time, algbw, busbw, #wrong; busbw = algbw x 2(n-1)/n). Then, where
// installed, it runs the peers with the same timing loop (PyTorch Gloo:
// bench/peers/gloo_allreduce.py, Open MPI's MPI_Allreduce: bench/peers_mpi_collectives.cpp;
// the programs of ../shared/bench/peers with this timing) in the same run and prints the ratios
// side by side. With the peers (and mpirun installed) the backends' sweeps themselves run
// paired: under mpirun, each size alternating rounds of ours and of MPI_Allreduce in the
// same processes (cmd_bench_paired.cc), which gives the `<backend>/ompi-job` columns, the
// ratio least disturbed by this VM's drift; --no-paired starts the tcp workers through
// `dtrain launch` instead. all_gather, reduce_scatter and sendrecv live in
// cmd_bench_collectives.cc.
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <vector>

#include <sched.h>

#include "cmd_bench_collectives.h"
#include "cmd_bench_scaling_model.h"
#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/threading.h"
#include "dtrain/parallel/ddp.h"
#include "progress.h"
#include "scaling_report.h"
#include "worker_env.h"
#include "worker_session.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace dtrain::cli {

namespace fs = std::filesystem;

namespace bench_detail {

std::string self_exe() {
  std::array<char, 4096> buf{};
  ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  DTRAIN_CHECK(n > 0, IoError, "bench: cannot find its own binary (/proc/self/exe)");
  return std::string(buf.data(), static_cast<size_t>(n));
}

std::vector<nlohmann::json> json_lines(const std::string& text) {
  std::vector<nlohmann::json> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] != '{') continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded()) out.push_back(std::move(j));
  }
  return out;
}

// The tcp workers get launch's default binding (--bind-to auto: one core each for up to
// 2 ranks, as mpirun binds the Open MPI peer and the mpi backend), so that two ranks
// never share a core while another idles (a waiter would spin through its whole spin
// before its peer can run). DTRAIN_BENCH_PIN=0 passes --bind-to none.
std::string launch_command(const std::string& backend, int nproc, const std::string& worker) {
  const char* pin = std::getenv("DTRAIN_BENCH_PIN");
  const bool unpinned = pin != nullptr && std::string_view(pin) == "0";
  return backend == "tcp" || backend == "tcp-noshm"
             ? fmt::format("{} launch --nproc {}{} -- {} 2>&1", self_exe(), nproc,
                           unpinned ? " --bind-to none" : "", worker)
             : fmt::format("mpirun --allow-run-as-root --oversubscribe -np {} {} 2>&1", nproc,
                           worker);
}

std::unique_ptr<WorkerSession> open_bench_session(const std::string& backend) {
  SessionOptions so;
  // tcp-noshm: the tcp backend with the shared-memory path off (read by
  // TcpOptions::from_env when the session connects).
  if (backend == "tcp-noshm") ::setenv("DTRAIN_SHM", "0", 1);
  so.backend = backend == "mpi-native" ? "mpi" : backend == "tcp-noshm" ? "tcp" : backend;
  so.mpi_native = backend == "mpi-native";
  return WorkerSession::open(detect_worker_identity(process_env_reader()), so);
}

double allreduce_busbw(int64_t nbytes, double seconds, int n) {
  return static_cast<double>(nbytes) / seconds / 1e9 * 2.0 * (n - 1) / n;
}

namespace {

int64_t count_wrong_allreduce(comm::Communicator& comm, std::vector<float>& buf) {
  const int n = comm.size();
  std::fill(buf.begin(), buf.end(), static_cast<float>(comm.rank() + 1));
  comm.allreduce(buf.data(), buf.size(), DType::f32, comm::ReduceOp::kSum);
  const float expect = static_cast<float>(n) * static_cast<float>(n + 1) / 2.0f;
  int64_t wrong = std::count_if(buf.begin(), buf.end(), [&](float v) { return v != expect; });
  comm.allreduce(&wrong, 1, DType::i64, comm::ReduceOp::kSum);
  return wrong;
}

}  // namespace

int run_allreduce_sweep(comm::Communicator& comm, const std::string& backend,
                        const std::vector<int64_t>& sizes, const std::string& out_path,
                        const TimeSize& time_size) {
  std::ofstream out;
  if (comm.rank() == 0) {
    out.open(out_path, std::ios::trunc);
    DTRAIN_CHECK(out.good(), IoError, "bench: cannot write {}", out_path);
  }
  // Warm-up before the sweep: the launcher and the coordinator still start up beside
  // the workers for a moment (nccl-tests warms up too); 8 B all-reduces are cheap.
  for (int i = 0; i < 2000; ++i) {
    float x = 1;
    comm.allreduce(&x, 1, DType::f32, comm::ReduceOp::kSum);
  }
  const int n = comm.size();
  for (int64_t nbytes : sizes) {
    const auto count = static_cast<size_t>(std::max<int64_t>(1, nbytes / 4));
    std::vector<float> buf(count, 0.0f);
    const SizeTiming t = time_size(buf, nbytes);
    const int64_t wrong = count_wrong_allreduce(comm, buf);
    if (comm.rank() != 0) continue;
    nlohmann::json row{{"backend", backend},
                       {"nproc", n},
                       {"bytes", nbytes},
                       {"count", count},
                       {"time_us", t.seconds * 1e6},
                       {"algbw_GBps", static_cast<double>(nbytes) / t.seconds / 1e9},
                       {"busbw_GBps", allreduce_busbw(nbytes, t.seconds, n)},
                       {"wrong", wrong}};
    if (backend == "tcp" || backend == "tcp-noshm") {
      row["algo"] = comm::algo_name(tcp_allreduce_algo(comm, count * sizeof(float)));
    }
    row.update(t.extra);
    out << row.dump() << "\n";
    out.flush();
  }
  return 0;
}

}  // namespace bench_detail

namespace {

using bench_detail::json_lines;
using bench_detail::self_exe;
using dtrain::run_capture;

struct BenchOptions {
  int nproc = 2;
  std::string backends = "tcp,tcp-noshm,mpi,mpi-native";
  int64_t max_bytes = int64_t{64} << 20;
  bool peers = true;
  // The project's gloo_allreduce.py: the shared peer's with this bench's timing loop.
  std::string peers_dir = std::string(DTRAIN_SOURCE_DIR) + "/bench/peers";
  // worker mode
  // Open MPI's MPI_Allreduce in the same processes, interleaved (cmd_bench_paired.cc).
  bool paired = true;
  bool worker = false;
  bool paired_worker = false;  // --worker --paired-worker: one rank of a paired sweep
  std::string backend;
  std::string store_dir;  // worker: the paired tcp workers' bootstrap
  std::string out;
};

std::vector<int64_t> sweep_sizes(int64_t max_bytes) {
  std::vector<int64_t> sizes;
  for (int64_t b = 8; b <= max_bytes; b *= 2) sizes.push_back(b);
  return sizes;
}

// ---- worker: one rank of the sweep ----
int run_worker(const BenchOptions& o) {
  if (o.paired_worker) {
    return bench_detail::run_paired_allreduce_worker(o.backend, sweep_sizes(o.max_bytes),
                                                     o.store_dir, o.out);
  }
  auto session = bench_detail::open_bench_session(o.backend);
  comm::Communicator& comm = session->comm();
  return bench_detail::run_allreduce_sweep(
      comm, o.backend, sweep_sizes(o.max_bytes), o.out, [&](std::vector<float>& buf, int64_t n) {
        auto op = [&] { comm.allreduce(buf.data(), buf.size(), DType::f32, comm::ReduceOp::kSum); };
        return bench_detail::SizeTiming{
            bench_detail::time_loop(comm, bench_detail::loop_timing(n), op)};
      });
}

// ---- data-parallel weak scaling: one rank's timing ----
struct ScalingOptions {
  std::vector<int> workers = {1, 2};
  std::string model = "seed-cnn";
  int64_t batch = 64;  // per worker
  int steps = 20, reps = 5;
  int rounds = 5;  // interleaved sweeps over `workers`
  bool pin = true;
  bool compute_too = false;  // --compute-too: also time reps inside DDP's no_sync()
  bool worker = false;
  std::string out;
};

int run_scaling_worker(const ScalingOptions& o) {
  WorkerIdentity id = detect_worker_identity(process_env_reader());
  if (o.pin) {  // one core per worker, as a cluster job would place them
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(id.local_rank % static_cast<int>(std::thread::hardware_concurrency()), &set);
    ::sched_setaffinity(0, sizeof set, &set);
  }
  set_num_threads(1);
  auto session = WorkerSession::open(id, SessionOptions{});
  comm::Communicator& comm = session->comm();
  Generator gen(0);
  auto model = nn::make_model(o.model, gen);
  Generator data_gen(100 + static_cast<uint64_t>(comm.rank()));
  nn::Batch data = nn::make_random_batch(o.model, o.batch, data_gen);
  std::unique_ptr<parallel::DistributedDataParallel> ddp;
  if (comm.size() > 1) ddp = std::make_unique<parallel::DistributedDataParallel>(model, comm);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.01).momentum(0.9));
  auto step = [&] {
    opt.zero_grad();
    Tensor loss = cross_entropy(model->forward(data.input), data.target);
    loss.backward();
    if (ddp) ddp->finish_gradient_sync();
    opt.step();
  };
  for (int i = 0; i < 5; ++i) step();
  auto rep = [&] {  // seconds per step of the slowest rank
    comm.barrier();
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < o.steps; ++i) step();
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    comm.allreduce(&dt, 1, DType::f64, comm::ReduceOp::kMax);  // the slowest rank sets the pace
    return dt / o.steps;
  };
  // --compute-too: each rep is followed by one inside no_sync() (no all-reduce: the
  // compute of N concurrent workers), so both see the same load on the cores.
  std::vector<double> times, compute;
  for (int r = 0; r < o.reps; ++r) {
    times.push_back(rep());
    if (!o.compute_too) continue;
    std::optional<parallel::DistributedDataParallel::NoSyncGuard> quiet;
    if (ddp) quiet.emplace(ddp->no_sync());
    compute.push_back(rep());
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double med = median(times);
  if (comm.rank() == 0) {
    nlohmann::json row{{"workers", comm.size()},
                       {"batch_per_worker", o.batch},
                       {"ms_per_step", med * 1e3},
                       {"samples_per_s", static_cast<double>(o.batch * comm.size()) / med}};
    if (o.compute_too) row["compute_ms"] = median(compute) * 1e3;
    std::ofstream(o.out, std::ios::trunc) << row.dump() << "\n";
  }
  return 0;
}

// The worker counts are measured in `rounds` interleaved rounds (1, 2, 1, 2, ...):
// this VM's single-core speed drifts by 20-30% over tens of seconds, so each round's
// N-worker figure is compared with the 1-worker figure of the same round, and the
// table reports the median of those ratios.
int run_scaling(const ScalingOptions& o) {
  std::string self = self_exe();
  std::map<int, std::vector<double>> ms, speedup;  // per worker count, one entry per round
  std::string note;
  const ProgressFn bar = progress_reporter({.label = "bench scaling", .unit = "runs"});
  const auto runs = static_cast<int64_t>(o.rounds) * static_cast<int64_t>(o.workers.size());
  int64_t done = 0;
  if (bar) bar(0, runs);
  for (int round = 0; round < o.rounds && note.empty(); ++round) {
    double base = 0;
    for (int n : o.workers) {
      fs::path out =
          fs::temp_directory_path() / fmt::format("dtrain-scaling-{}-{}.json", getpid(), n);
      std::string cmd = fmt::format(
          "{} launch --nproc {}{} -- {} bench scaling --worker --model {} --batch {} --steps {} "
          "--reps {}{} --out {} 2>&1",
          self, n, o.pin ? "" : " --bind-to none", self, o.model, o.batch, o.steps, o.reps,
          o.pin ? "" : " --no-pin", out.string());
      int st = 0;
      std::string log = run_capture(cmd, &st);
      std::ifstream in(out);
      std::stringstream text;
      text << in.rdbuf();
      auto got = json_lines(text.str());
      fs::remove(out);
      if (st != 0 || got.empty()) {
        note += fmt::format("{} worker(s): failed (status {}):\n{}\n", n, st, log);
        break;
      }
      double sps = got[0]["samples_per_s"].get<double>();
      if (n == 1) base = sps;
      ms[n].push_back(got[0]["ms_per_step"].get<double>());
      if (base > 0) speedup[n].push_back(sps / base);
      if (bar) bar(++done, runs);
    }
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  ScalingReport report;
  report.title = fmt::format(
      "data-parallel weak scaling: {}, batch {} per worker, 1 thread per worker{}, "
      "tcp backend, {} interleaved round(s), each the median of {} x {} steps",
      o.model, o.batch, o.pin ? " pinned to its own core" : "", o.rounds, o.reps, o.steps);
  report.columns = {"workers",     "ms/step",    "samples/s",
                    "vs 1 worker", "efficiency", "vs 1 worker, each round"};
  ScalingSeries measured{"measured (this host)", true, {}, {}, {}};
  fmt::print("# {}\n", report.title);
  const auto& c = report.columns;
  fmt::print("{:>8} {:>12} {:>14} {:>16} {:>12}   {}\n", c[0], c[1], c[2], c[3], c[4], c[5]);
  for (int n : o.workers) {
    if (ms[n].empty()) continue;
    double t = median(ms[n]);
    std::string rounds;
    for (double r : speedup[n]) rounds += fmt::format("{}{:.2f}x", rounds.empty() ? "" : " ", r);
    bool has = !speedup[n].empty();
    double sp = median(speedup[n]);
    const auto& r = report.rows.emplace_back(std::vector<std::string>{
        std::to_string(n), fmt::format("{:.3f}", t),
        fmt::format("{:.1f}", static_cast<double>(o.batch * n) / (t / 1e3)),
        has ? fmt::format("{:.2f}x", sp) : "-", has ? fmt::format("{:.0f}%", 100.0 * sp / n) : "-",
        has ? rounds : "-"});
    fmt::print("{:>8} {:>12} {:>14} {:>16} {:>12}   {}\n", r[0], r[1], r[2], r[3], r[4], r[5]);
    if (has) measured.ranks.push_back(n), measured.step_ms.push_back(t);
    if (has) measured.efficiency.push_back(sp / n);
  }
  if (!o.out.empty()) {
    report.series = {measured};
    write_scaling_report(o.out, report);
    fmt::print("# table and plot: {}/scaling.md, {}/scaling.png\n", o.out, o.out);
  }
  if (!note.empty()) fmt::print("# notes:\n{}", note);
  return note.empty() ? 0 : 1;
}

// ---- orchestrator ----
// Paired (the default with the peers, where mpirun is installed): every backend under
// mpirun, with MPI_Allreduce in the same processes (cmd_bench_paired.cc).
bool runs_paired(const BenchOptions& o) {
  if (!o.peers || !o.paired) return false;
  int st = 0;
  run_capture("command -v mpirun >/dev/null 2>&1", &st);
  return st == 0;
}

std::map<int64_t, nlohmann::json> run_backend(const BenchOptions& o, const std::string& backend,
                                              bool paired, std::string* note) {
  const std::string stem = fmt::format("dtrain-bench-{}-{}-{}", backend, getpid(), o.nproc);
  fs::path out = fs::temp_directory_path() / (stem + ".jsonl");
  fs::path store = fs::temp_directory_path() / (stem + "-store");
  std::string worker =
      fmt::format("{} bench allreduce --worker --backend {} --max-bytes {} --out {}{}", self_exe(),
                  backend, o.max_bytes, out.string(), paired ? " --paired-worker" : "");
  if (paired && backend.rfind("tcp", 0) == 0) worker += " --store-dir " + store.string();
  // Paired, every backend runs under mpirun (the tcp backend bootstraps through the store).
  std::string cmd = bench_detail::launch_command(paired ? "mpi" : backend, o.nproc, worker);
  int st = 0;
  std::string log = run_capture(cmd, &st);
  std::map<int64_t, nlohmann::json> rows;
  std::ifstream in(out);
  std::stringstream text;
  text << in.rdbuf();
  for (auto& j : json_lines(text.str())) rows[j["bytes"].get<int64_t>()] = j;
  fs::remove(out);
  std::error_code ec;
  fs::remove_all(store, ec);
  if (st != 0) *note += fmt::format("{}: workers exited with status {}:\n{}\n", backend, st, log);
  return rows;
}

std::map<int64_t, nlohmann::json> run_peer(const BenchOptions& o, const std::string& peer,
                                           std::string* note) {
  std::map<int64_t, nlohmann::json> rows;
  int st = 0;
  std::string text;
  if (peer == "gloo") {
    run_capture("/usr/bin/python3 -c 'import torch.distributed' >/dev/null 2>&1", &st);
    if (st != 0) {
      *note += "gloo: PyTorch not installed (apt-get install python3-torch), skipped\n";
      return rows;
    }
    text = run_capture(fmt::format("/usr/bin/python3 {}/gloo_allreduce.py --nproc {} 2>/dev/null",
                                   o.peers_dir, o.nproc),
                       &st);
  } else {
    run_capture("command -v mpicxx >/dev/null 2>&1", &st);
    if (st != 0) {
      *note += "openmpi: mpicxx not installed, skipped\n";
      return rows;
    }
    // The project's copy of the peer (bench/peers_mpi_collectives.cpp): the same
    // MPI_Allreduce timing at every doubling size, not only the shared peer's six.
    fs::path bin =
        fs::temp_directory_path() / fmt::format("dtrain-peer-mpi-allreduce-{}", getpid());
    run_capture(fmt::format("mpicxx -O2 -o {} {}/bench/peers_mpi_collectives.cpp 2>&1",
                            bin.string(), DTRAIN_SOURCE_DIR),
                &st);
    if (st == 0) {
      text = run_capture(fmt::format("mpirun --allow-run-as-root --oversubscribe -np {} {} "
                                     "all_reduce 8 {} 2>/dev/null",
                                     o.nproc, bin.string(), o.max_bytes),
                         &st);
    }
    fs::remove(bin);
  }
  if (st != 0) *note += fmt::format("{}: peer failed (status {})\n", peer, st);
  for (auto& j : json_lines(text)) rows[j["bytes"].get<int64_t>()] = j;
  return rows;
}

void print_nccl_table(const std::string& backend, int nproc,
                      const std::map<int64_t, nlohmann::json>& rows) {
  fmt::print("# dtrain all-reduce, backend {}, {} ranks, float sum, in place\n", backend, nproc);
  fmt::print("#{:>11} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7}\n", "size", "count", "type",
             "redop", "time", "algbw", "busbw", "#wrong");
  fmt::print("#{:>11} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7}\n", "(B)", "(elements)", "", "",
             "(us)", "(GB/s)", "(GB/s)", "");
  double sum = 0;
  for (const auto& [bytes, j] : rows) {
    fmt::print("{:>12} {:>12} {:>6} {:>6} {:>10.1f} {:>8.3f} {:>8.3f} {:>7}\n", bytes,
               j["count"].get<int64_t>(), "float", "sum", j["time_us"].get<double>(),
               j["algbw_GBps"].get<double>(), j["busbw_GBps"].get<double>(),
               j["wrong"].get<int64_t>());
    sum += j["busbw_GBps"].get<double>();
  }
  if (!rows.empty()) {
    fmt::print("# Avg bus bandwidth    : {:.3f} GB/s\n\n", sum / static_cast<double>(rows.size()));
  }
}

using Rows = std::map<int64_t, nlohmann::json>;

double busbw_at(const Rows& rows, int64_t s) {
  auto it = rows.find(s);
  return it == rows.end() ? -1.0 : it->second["busbw_GBps"].get<double>();
}

std::string ratio_cell(double a, double b) {
  return a > 0 && b > 0 ? fmt::format(" {:>12.2f}", a / b) : fmt::format(" {:>12}", "-");
}

// The smallest message's time (8 B: latency) of each backend against Open MPI's.
void print_latency(std::map<std::string, Rows>& ours, std::map<std::string, Rows>& peers) {
  if (!peers.count("openmpi") || peers["openmpi"].empty()) return;
  const auto& [bytes, peer] = *peers["openmpi"].begin();
  const double t_peer = peer["time_us"].get<double>();
  for (const auto& [b, rows] : ours) {
    auto it = rows.find(bytes);
    if (it == rows.end()) continue;
    const double t = it->second["time_us"].get<double>();
    fmt::print("# {} B latency: {} {:.2f} us, openmpi {:.2f} us ({:.2f}x Open MPI's time)\n", bytes,
               b, t, t_peer, t / t_peer);
  }
}

// The same from the paired sweeps: MPI_Allreduce in the backend's own processes.
void print_paired_latency(std::map<std::string, Rows>& ours) {
  for (const auto& [b, rows] : ours) {
    if (rows.empty() || !rows.begin()->second.contains("peer_time_us")) continue;
    const auto& [bytes, j] = *rows.begin();
    const double t = j["time_us"].get<double>(), t_peer = j["peer_time_us"].get<double>();
    fmt::print(
        "# {} B latency, same job: {} {:.2f} us, MPI_Allreduce {:.2f} us ({:.2f}x its time; "
        "median of the rounds' ratios {:.2f}x)\n",
        bytes, b, t, t_peer, t / t_peer, 1.0 / j["paired_ratio"].get<double>());
  }
}

// busbw of every backend and peer at every size, then ours / peer for each pair that
// the acceptance compares (tcp and mpi against Open MPI and Gloo). The cells go into
// `report` too (bench allreduce --out), and each column's busbw into its plot.
void print_side_by_side(const BenchOptions& o, const std::vector<std::string>& backends,
                        std::map<std::string, Rows>& ours, std::map<std::string, Rows>& peers,
                        TableReport& report) {
  std::vector<std::string> cols = backends;
  for (const auto& [p, rows] : peers) {
    if (!rows.empty()) cols.push_back(p);
  }
  std::vector<std::pair<std::string, std::string>> ratios;
  for (const char* b : {"tcp", "mpi"}) {
    for (const char* p : {"openmpi", "gloo"}) {
      if (ours.count(b) && peers.count(p) && !peers[p].empty()) ratios.emplace_back(b, p);
    }
  }
  report.title = fmt::format("busbw (GB/s) side by side, {} ranks on this host", o.nproc);
  fmt::print("# {}\n", report.title);
  report.columns = {"size(B)"};
  std::string head = fmt::format("{:>12}", "size(B)");
  for (const auto& c : cols) head += fmt::format(" {:>10}", c), report.columns.push_back(c);
  for (const auto& [b, p] : ratios) {
    head += fmt::format(" {:>12}", b + "/" + p), report.columns.push_back(b + "/" + p);
  }
  std::vector<std::string> paired;  // backends with MPI_Allreduce in their own processes
  for (const char* b : {"tcp", "mpi"}) {
    if (ours.count(b) && !ours[b].empty() && ours[b].begin()->second.contains("paired_ratio")) {
      paired.emplace_back(b);
      const std::string c = std::string(b) + "/ompi-job";
      head += fmt::format(" {:>12}", c), report.columns.push_back(c);
    }
  }
  fmt::print("{}\n", head);
  std::map<int64_t, bool> sizes;
  for (const auto& [b, rows] : ours) {
    for (const auto& [sz, j] : rows) sizes[sz] = true;
  }
  std::map<std::string, nlohmann::json> series;
  for (const auto& [sz, unused] : sizes) {
    std::vector<std::string>& cells = report.rows.emplace_back(1, std::to_string(sz));
    std::string line = fmt::format("{:>12}", sz);
    for (const auto& c : cols) {
      const double v = busbw_at(ours.count(c) ? ours[c] : peers[c], sz);
      cells.push_back(v < 0 ? "-" : fmt::format("{:.3f}", v));
      line += fmt::format(" {:>10}", cells.back());
      if (v >= 0) series[c]["bytes"].push_back(sz), series[c]["busbw_GBps"].push_back(v);
    }
    for (const auto& [b, p] : ratios) {
      const std::string cell = ratio_cell(busbw_at(ours[b], sz), busbw_at(peers[p], sz));
      line += cell;
      cells.push_back(cell.substr(cell.find_first_not_of(' ')));
    }
    for (const auto& b : paired) {
      auto it = ours[b].find(sz);
      cells.push_back(it == ours[b].end()
                          ? "-"
                          : fmt::format("{:.2f}", it->second["paired_ratio"].get<double>()));
      line += fmt::format(" {:>12}", cells.back());
    }
    fmt::print("{}\n", line);
  }
  report.plot = {{"title", report.title}, {"series", nlohmann::json::array()}};
  for (const auto& c : cols) {
    if (!series.count(c)) continue;
    nlohmann::json one = series[c];
    one["name"] = c;
    report.plot["series"].push_back(one);
  }
  print_latency(ours, peers);
  print_paired_latency(ours);
}

int run_orchestrator(const BenchOptions& o) {
  std::vector<std::string> backends;
  std::stringstream ss(o.backends);
  for (std::string b; std::getline(ss, b, ',');) {
    DTRAIN_CHECK(b == "tcp" || b == "tcp-noshm" || b == "mpi" || b == "mpi-native", InvalidArgument,
                 "--backends: unknown backend '{}' (tcp, tcp-noshm, mpi, mpi-native)", b);
    backends.push_back(b);
  }
  std::string note;
  std::map<std::string, std::map<int64_t, nlohmann::json>> ours, peers;
  const ProgressFn bar = progress_reporter({.label = "bench allreduce", .unit = "sweeps"});
  const auto sweeps = static_cast<int64_t>(backends.size()) + (o.peers ? 2 : 0);
  if (bar) bar(0, sweeps);
  const bool paired = runs_paired(o);
  for (const auto& b : backends) {
    ours[b] = run_backend(o, b, paired, &note);
    if (bar) bar(static_cast<int64_t>(ours.size()), sweeps);
    print_nccl_table(b, o.nproc, ours[b]);
  }
  if (o.peers) {
    for (const char* p : {"gloo", "openmpi"}) {
      peers[p] = run_peer(o, p, &note);
      if (bar) bar(static_cast<int64_t>(ours.size() + peers.size()), sweeps);
    }
  }
  TableReport report{"allreduce", "allreduce_plot.py", "", {}, {}, {}, {}};
  print_side_by_side(o, backends, ours, peers, report);
  if (!o.out.empty()) {
    for (const auto& b : backends) {
      double sum = 0;
      for (const auto& [bytes, j] : ours[b]) sum += j["busbw_GBps"].get<double>();
      if (!ours[b].empty()) {
        report.notes.push_back(fmt::format("{}: average bus bandwidth {:.3f} GB/s", b,
                                           sum / static_cast<double>(ours[b].size())));
      }
    }
    write_table_report(o.out, report);
    fmt::print("# table and plot: {}/allreduce.md, {}/allreduce.png\n", o.out, o.out);
  }
  if (!note.empty()) fmt::print("# notes:\n{}", note);
  bool complete = true;
  for (const auto& b : backends) complete &= !ours[b].empty();
  return complete ? 0 : 1;
}

}  // namespace

Command add_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  CLI::App* ar = bench->add_subcommand(
      "allreduce", "All-reduce bandwidth per backend (nccl-tests table) against Gloo and Open MPI");
  ar->add_option("--nproc", o->nproc, "Ranks on this host")
      ->capture_default_str()
      ->check(kPositive);
  ar->add_option("--backends", o->backends, "Comma-separated: tcp, tcp-noshm, mpi, mpi-native")
      ->capture_default_str();
  ar->add_option("--max-bytes", o->max_bytes, "Largest message (the sweep doubles from 8 B)")
      ->capture_default_str()
      ->check(kPositive);
  ar->add_flag("!--no-peers", o->peers, "Do not run the Gloo and Open MPI peers");
  ar->add_option("--peers-dir", o->peers_dir, "Folder with gloo_allreduce.py")
      ->capture_default_str();
  ar->add_flag("!--no-paired", o->paired,
               "Time the backends alone (tcp through dtrain launch), without MPI_Allreduce "
               "interleaved in the same processes (the <backend>/ompi-job columns)");
  ar->add_flag("--worker", o->worker, "(internal) run as one rank of the sweep");
  ar->add_flag("--paired-worker", o->paired_worker,
               "(internal, with --worker) one rank of the paired sweep, under mpirun");
  ar->add_option("--store-dir", o->store_dir, "(internal) a paired tcp worker's bootstrap folder");
  ar->add_option("--backend", o->backend, "(internal) the worker's backend");
  ar->add_option("--out", o->out,
                 "Folder for allreduce.md and allreduce.png (with --worker, internal: rank 0's "
                 "rows)");
  auto so = std::make_shared<ScalingOptions>();
  CLI::App* sc = bench->add_subcommand(
      "scaling", "Data-parallel weak scaling: N workers on N cores against 1 worker on 1 core");
  sc->add_option("--workers", so->workers, "Worker counts to measure")->capture_default_str();
  sc->add_option("--model", so->model, "seed-cnn | mlp | seed-lstm")->capture_default_str();
  sc->add_option("--batch", so->batch, "Batch per worker")->capture_default_str()->check(kPositive);
  sc->add_option("--steps", so->steps, "Steps per repetition")->capture_default_str();
  sc->add_option("--reps", so->reps, "Repetitions (median reported)")->capture_default_str();
  sc->add_option("--rounds", so->rounds,
                 "Interleaved sweeps over the worker counts (median ratio reported)")
      ->capture_default_str()
      ->check(kPositive);
  sc->add_flag("!--no-pin", so->pin, "Do not pin each worker to its own core");
  sc->add_flag("--compute-too", so->compute_too,
               "(with --worker) also time steps without the all-reduce (DDP no_sync)");
  sc->add_flag("--worker", so->worker, "(internal) run as one rank");
  sc->add_option("--out", so->out,
                 "Folder for scaling.md and scaling.png (with --worker, internal: rank 0's row)");
  auto model = add_scaling_model_options(*sc);  // --predict, --fit, --validate
  auto collectives = add_collective_benches(*bench);
  auto gpt = add_gpt_bench(*bench);
  auto hosts = add_hosts_bench(*bench);
  return {bench, [o, so, ar, sc, collectives, gpt, hosts, model] {
            if (std::optional<int> rc = collectives()) return *rc;
            if (std::optional<int> rc = hosts()) return *rc;
            if (std::optional<int> rc = gpt()) return *rc;
            if (ar->parsed()) return o->worker ? run_worker(*o) : run_orchestrator(*o);
            if (std::optional<int> rc = model()) return *rc;
            return so->worker ? run_scaling_worker(*so) : run_scaling(*so);
          }};
}

}  // namespace dtrain::cli
