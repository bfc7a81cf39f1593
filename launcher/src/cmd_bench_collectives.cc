// `dtrain bench all_gather | reduce_scatter | sendrecv`: the collectives of the
// model-parallel groups, in the nccl-tests format, with Open MPI side by side.
//
// Same shape as `dtrain bench allreduce` (cmd_bench.cc): the orchestrator starts the
// workers of each backend (tcp and tcp-noshm through `dtrain launch`, mpi and mpi-native
// through mpirun); every worker runs the sweep (doubling sizes, float); per size: warm
// up, then rounds of a barrier and `iters` operations back to back (bench_detail::
// time_loop: the slowest rank's time per operation, median round), then one checked
// operation on refilled buffers for #wrong; rank 0 writes JSON lines that the
// orchestrator prints.
// Sizes and bandwidths follow nccl-tests (doc/PERFORMANCE.md):
//   all_gather      size = the gathered buffer (n x count floats), count per rank,
//                   busbw = algbw x (n-1)/n
//   reduce_scatter  size = the send buffer (n x count floats), count per rank (the
//                   received block), float sum, busbw = algbw x (n-1)/n
//   sendrecv        every rank sends count floats to rank+1 and receives count from
//                   rank-1; size = count floats, busbw = algbw
// #wrong counts the elements (over all ranks) that differ from the expected values
// (exact small floats, so the reduction order does not matter); the receive buffer is
// overwritten with a sentinel before every repetition.
//
// sendrecv caveat: Communicator::send/recv block, and one thread issues, so even ranks
// send first and odd ranks receive first: the two directions of the exchange run one
// after the other, where nccl-tests (and the Open MPI peer, MPI_Sendrecv) overlap them.
//
// The peer: bench/peers_mpi_collectives.cpp (MPI_Allgather, MPI_Reduce_scatter_block,
// MPI_Sendrecv), compiled with mpicxx at run time and run with mpirun on the same sizes;
// the last table gives busbw per backend and the ratios against it.
//
// Deliberately not here: allreduce and scaling (cmd_bench.cc), other dtypes and ops.
#include "cmd_bench_collectives.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "commands.h"
#include "dtrain/common/error.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace dtrain::cli {

namespace bench_detail {

LoopTiming loop_timing(int64_t bytes) {
  LoopTiming t;
  t.iters = static_cast<int>(
      std::clamp<int64_t>((int64_t{64} << 20) / std::max<int64_t>(1, bytes), 4, 50));
  t.trials = bytes < (int64_t{1} << 20) ? 5 : 3;
  t.warmup = std::min(5, t.iters);
  return t;
}

void check_timing(const LoopTiming& t) {
  DTRAIN_CHECK(t.iters >= 1 && t.trials >= 1 && t.warmup >= 0, InvalidArgument,
               "bench: iters {}, trials {}, warm-up {}: expected iters, trials >= 1", t.iters,
               t.trials, t.warmup);
}

double time_round(comm::Communicator& comm, int iters, const std::function<void()>& op) {
  comm.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) op();
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  comm.allreduce(&dt, 1, DType::f64, comm::ReduceOp::kMax);
  return dt / iters;
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double time_loop(comm::Communicator& comm, const LoopTiming& t, const std::function<void()>& op) {
  check_timing(t);
  for (int i = 0; i < t.warmup; ++i) op();
  std::vector<double> rounds;
  for (int r = 0; r < t.trials; ++r) rounds.push_back(time_round(comm, t.iters, op));
  return median_of(std::move(rounds));
}

comm::Algo tcp_allreduce_algo(const comm::Communicator& comm, size_t bytes) {
  const std::optional<comm::Algo> a =
      comm::tcp_algorithm(comm, comm::Collective::kAllreduce, bytes);
  DTRAIN_CHECK(a.has_value(), InternalError, "bench: rank {} has no tcp communicator to ask",
               comm.rank());
  return *a;
}

}  // namespace bench_detail

namespace {

namespace fs = std::filesystem;
using bench_detail::json_lines;
using bench_detail::run_capture;
using bench_detail::self_exe;
using Rows = std::map<int64_t, nlohmann::json>;  // by size in bytes

enum class Coll { kAllGather, kReduceScatter, kSendRecv };

const char* coll_name(Coll c) {
  return c == Coll::kAllGather       ? "all_gather"
         : c == Coll::kReduceScatter ? "reduce_scatter"
                                     : "sendrecv";
}

struct CollectiveOptions {
  Coll coll = Coll::kAllGather;
  int nproc = 2;
  std::string backends = "tcp,tcp-noshm,mpi,mpi-native";
  int64_t min_bytes = 8;
  int64_t max_bytes = int64_t{64} << 20;
  bool peers = true;
  std::string peer_src = std::string(DTRAIN_SOURCE_DIR) + "/bench/peers_mpi_collectives.cpp";
  // worker mode
  bool worker = false;
  std::string backend;
  std::string out;
};

// One row's shape, as nccl-tests derives it from a requested size.
struct Shape {
  int64_t bytes;  // the size column
  size_t count;   // the count column: floats per rank
};

Shape shape_of(Coll c, int64_t nbytes, int n) {
  const int64_t ranks = c == Coll::kSendRecv ? 1 : n;
  const int64_t count = std::max<int64_t>(1, nbytes / 4 / ranks);
  return {count * ranks * 4, static_cast<size_t>(count)};
}

double busbw_factor(Coll c, int n) {
  return c == Coll::kSendRecv ? 1.0 : static_cast<double>(n - 1) / n;
}

std::vector<int64_t> requested_sizes(const CollectiveOptions& o) {
  std::vector<int64_t> sizes;
  for (int64_t b = o.min_bytes; b <= o.max_bytes; b *= 2) sizes.push_back(b);
  return sizes;
}

// Element i of rank r's input: small halves, exact in float and in sums of a few ranks.
float value(int rank, size_t i) {
  return static_cast<float>(rank + 1) + static_cast<float>(i % 13) * 0.5f;
}

// The buffers of one size on one rank: the input, the output and its expected values.
struct Buffers {
  std::vector<float> send, recv, want;
};

Buffers make_buffers(Coll c, size_t count, int me, int n) {
  Buffers b;
  const size_t un = static_cast<size_t>(n);
  const size_t send_count = c == Coll::kReduceScatter ? count * un : count;
  b.send.resize(send_count);
  for (size_t i = 0; i < send_count; ++i) b.send[i] = value(me, i);
  b.recv.resize(c == Coll::kAllGather ? count * un : count);
  b.want.resize(b.recv.size());
  for (size_t i = 0; i < b.want.size(); ++i) {
    if (c == Coll::kAllGather) {
      b.want[i] = value(static_cast<int>(i / count), i % count);
    } else if (c == Coll::kReduceScatter) {
      float sum = 0;
      for (int r = 0; r < n; ++r) sum += value(r, static_cast<size_t>(me) * count + i);
      b.want[i] = sum;
    } else {
      b.want[i] = value((me + n - 1) % n, i);
    }
  }
  return b;
}

// One timed operation. sendrecv: even ranks send first, odd ranks receive first.
void run_once(Coll c, comm::Communicator& comm, Buffers& b, size_t count) {
  if (c == Coll::kAllGather) {
    comm.allgather(b.send.data(), b.recv.data(), count, DType::f32);
  } else if (c == Coll::kReduceScatter) {
    comm.reduce_scatter(b.send.data(), b.recv.data(), count, DType::f32, comm::ReduceOp::kSum);
  } else {
    const int n = comm.size(), me = comm.rank();
    const int next = (me + 1) % n, prev = (me + n - 1) % n;
    if (me % 2 == 0) {
      comm.send(b.send.data(), count, DType::f32, next);
      comm.recv(b.recv.data(), count, DType::f32, prev);
    } else {
      comm.recv(b.recv.data(), count, DType::f32, prev);
      comm.send(b.send.data(), count, DType::f32, next);
    }
  }
}

// Seconds per operation (bench_detail::time_loop), and the wrong elements of one
// operation on a receive buffer overwritten with a sentinel.
std::pair<double, int64_t> time_size(Coll c, comm::Communicator& comm, size_t count,
                                     int64_t bytes) {
  Buffers b = make_buffers(c, count, comm.rank(), comm.size());
  const double t = bench_detail::time_loop(comm, bench_detail::loop_timing(bytes),
                                           [&] { run_once(c, comm, b, count); });
  std::fill(b.recv.begin(), b.recv.end(), -1.0f);
  run_once(c, comm, b, count);
  int64_t wrong = 0;
  for (size_t i = 0; i < b.want.size(); ++i) wrong += b.recv[i] != b.want[i];
  comm.allreduce(&wrong, 1, DType::i64, comm::ReduceOp::kSum);
  return {t, wrong};
}

int run_collective_worker(const CollectiveOptions& o) {
  auto session = bench_detail::open_bench_session(o.backend);
  comm::Communicator& comm = session->comm();
  const int n = comm.size();
  DTRAIN_CHECK(o.coll != Coll::kSendRecv || n >= 2, InvalidArgument,
               "bench sendrecv: needs at least 2 ranks, got {}", n);
  std::ofstream out;
  if (comm.rank() == 0) {
    out.open(o.out, std::ios::trunc);
    DTRAIN_CHECK(out.good(), IoError, "bench: cannot write {}", o.out);
  }
  for (int64_t requested : requested_sizes(o)) {
    const Shape s = shape_of(o.coll, requested, n);
    auto [t, wrong] = time_size(o.coll, comm, s.count, s.bytes);
    if (comm.rank() != 0) continue;
    const double algbw = static_cast<double>(s.bytes) / t / 1e9;
    out << nlohmann::json{{"coll", coll_name(o.coll)},
                          {"backend", o.backend},
                          {"nproc", n},
                          {"bytes", s.bytes},
                          {"count", s.count},
                          {"time_us", t * 1e6},
                          {"algbw_GBps", algbw},
                          {"busbw_GBps", algbw * busbw_factor(o.coll, n)},
                          {"wrong", wrong}}
               .dump()
        << "\n";
    out.flush();
  }
  return 0;
}

// ---- orchestrator ----

Rows read_rows(const std::string& text) {
  Rows rows;
  for (auto& j : json_lines(text)) rows[j["bytes"].get<int64_t>()] = j;
  return rows;
}

Rows run_backend(const CollectiveOptions& o, const std::string& backend, std::string* note) {
  fs::path out =
      fs::temp_directory_path() /
      fmt::format("dtrain-bench-{}-{}-{}-{}.jsonl", coll_name(o.coll), backend, getpid(), o.nproc);
  std::string worker =
      fmt::format("{} bench {} --worker --backend {} --min-bytes {} --max-bytes {} --out {}",
                  self_exe(), coll_name(o.coll), backend, o.min_bytes, o.max_bytes, out.string());
  int st = 0;
  std::string log = run_capture(bench_detail::launch_command(backend, o.nproc, worker), &st);
  std::ifstream in(out);
  std::stringstream text;
  text << in.rdbuf();
  fs::remove(out);
  if (st != 0) *note += fmt::format("{}: workers exited with status {}:\n{}\n", backend, st, log);
  return read_rows(text.str());
}

Rows run_openmpi_peer(const CollectiveOptions& o, std::string* note) {
  int st = 0;
  run_capture("command -v mpicxx >/dev/null 2>&1", &st);
  if (st != 0) {
    *note += "openmpi: mpicxx not installed, skipped\n";
    return {};
  }
  fs::path bin = fs::temp_directory_path() / fmt::format("dtrain-peer-mpi-coll-{}", getpid());
  std::string log =
      run_capture(fmt::format("mpicxx -O2 -o {} {} 2>&1", bin.string(), o.peer_src), &st);
  std::string text;
  if (st == 0) {
    text =
        run_capture(fmt::format("mpirun --allow-run-as-root --oversubscribe -np {} {} {} {} {} "
                                "2>/dev/null",
                                o.nproc, bin.string(), coll_name(o.coll), o.min_bytes, o.max_bytes),
                    &st);
  }
  fs::remove(bin);
  if (st != 0) *note += fmt::format("openmpi: peer failed (status {}) {}\n", st, log);
  return read_rows(text);
}

void print_table(Coll c, const std::string& backend, int nproc, const Rows& rows) {
  fmt::print("# dtrain {}, backend {}, {} ranks, float{}\n", coll_name(c), backend, nproc,
             c == Coll::kReduceScatter ? " sum" : "");
  fmt::print("#{:>11} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7}\n", "size", "count", "type",
             "redop", "time", "algbw", "busbw", "#wrong");
  fmt::print("#{:>11} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7}\n", "(B)", "(elements)", "", "",
             "(us)", "(GB/s)", "(GB/s)", "");
  double sum = 0;
  for (const auto& [bytes, j] : rows) {
    fmt::print("{:>12} {:>12} {:>6} {:>6} {:>10.1f} {:>8.3f} {:>8.3f} {:>7}\n", bytes,
               j["count"].get<int64_t>(), "float", c == Coll::kReduceScatter ? "sum" : "none",
               j["time_us"].get<double>(), j["algbw_GBps"].get<double>(),
               j["busbw_GBps"].get<double>(), j["wrong"].get<int64_t>());
    sum += j["busbw_GBps"].get<double>();
  }
  if (!rows.empty()) {
    fmt::print("# Avg bus bandwidth    : {:.3f} GB/s\n\n", sum / static_cast<double>(rows.size()));
  }
}

double busbw_at(const Rows& rows, int64_t bytes) {
  auto it = rows.find(bytes);
  return it == rows.end() ? -1.0 : it->second["busbw_GBps"].get<double>();
}

// busbw of every backend and of Open MPI per size, then each backend / Open MPI.
void print_side_by_side(const CollectiveOptions& o, const std::vector<std::string>& backends,
                        std::map<std::string, Rows>& ours, const Rows& openmpi) {
  fmt::print("# {} busbw (GB/s) side by side, {} ranks on this host\n", coll_name(o.coll), o.nproc);
  std::string head = fmt::format("{:>12}", "size(B)");
  for (const auto& b : backends) head += fmt::format(" {:>10}", b);
  if (!openmpi.empty()) {
    head += fmt::format(" {:>10}", "openmpi");
    for (const auto& b : backends) head += fmt::format(" {:>18}", b + "/openmpi");
  }
  fmt::print("{}\n", head);
  std::map<int64_t, bool> sizes;
  for (const auto& [b, rows] : ours) {
    for (const auto& [s, j] : rows) sizes[s] = true;
  }
  auto cell = [](double v, int width, const char* fmt_spec) {
    return v < 0 ? fmt::format(" {:>{}}", "-", width)
                 : fmt::format(fmt::runtime(fmt_spec), v, width);
  };
  for (const auto& [s, unused] : sizes) {
    std::string line = fmt::format("{:>12}", s);
    for (const auto& b : backends) line += cell(busbw_at(ours[b], s), 10, " {:>{}.3f}");
    if (!openmpi.empty()) {
      const double m = busbw_at(openmpi, s);
      line += cell(m, 10, " {:>{}.3f}");
      for (const auto& b : backends) {
        const double a = busbw_at(ours[b], s);
        line += cell(a > 0 && m > 0 ? a / m : -1.0, 18, " {:>{}.2f}");
      }
    }
    fmt::print("{}\n", line);
  }
}

int run_collective_orchestrator(const CollectiveOptions& o) {
  std::vector<std::string> backends;
  std::stringstream ss(o.backends);
  for (std::string b; std::getline(ss, b, ',');) {
    DTRAIN_CHECK(b == "tcp" || b == "tcp-noshm" || b == "mpi" || b == "mpi-native", InvalidArgument,
                 "--backends: unknown backend '{}' (tcp, tcp-noshm, mpi, mpi-native)", b);
    backends.push_back(b);
  }
  DTRAIN_CHECK(o.coll != Coll::kSendRecv || o.nproc >= 2, InvalidArgument,
               "bench sendrecv: --nproc must be at least 2, got {}", o.nproc);
  DTRAIN_CHECK(o.min_bytes <= o.max_bytes, InvalidArgument,
               "--min-bytes {} is larger than --max-bytes {}", o.min_bytes, o.max_bytes);
  std::string note;
  std::map<std::string, Rows> ours;
  for (const auto& b : backends) {
    ours[b] = run_backend(o, b, &note);
    print_table(o.coll, b, o.nproc, ours[b]);
  }
  Rows openmpi = o.peers ? run_openmpi_peer(o, &note) : Rows{};
  print_side_by_side(o, backends, ours, openmpi);
  if (!note.empty()) fmt::print("# notes:\n{}", note);
  bool complete = true;
  for (const auto& b : backends) {
    complete &= !ours[b].empty();
    for (const auto& [s, j] : ours[b]) complete &= j["wrong"].get<int64_t>() == 0;
  }
  return complete ? 0 : 1;
}

CLI::App* add_one(CLI::App& bench, Coll coll, const char* help,
                  const std::shared_ptr<CollectiveOptions>& o) {
  o->coll = coll;
  CLI::App* app = bench.add_subcommand(coll_name(coll), help);
  app->add_option("--nproc", o->nproc, "Ranks on this host")
      ->capture_default_str()
      ->check(kPositive);
  app->add_option("--backends", o->backends, "Comma-separated: tcp, tcp-noshm, mpi, mpi-native")
      ->capture_default_str();
  app->add_option("--min-bytes", o->min_bytes, "Smallest message (the sweep doubles from it)")
      ->capture_default_str()
      ->check(kPositive);
  app->add_option("--max-bytes", o->max_bytes, "Largest message")
      ->capture_default_str()
      ->check(kPositive);
  app->add_flag("!--no-peers", o->peers, "Do not run the Open MPI peer");
  app->add_option("--peer-src", o->peer_src, "The Open MPI peer's source (compiled with mpicxx)")
      ->capture_default_str();
  app->add_flag("--worker", o->worker, "(internal) run as one rank of the sweep");
  app->add_option("--backend", o->backend, "(internal) the worker's backend");
  app->add_option("--out", o->out, "(internal) where rank 0 writes its rows");
  return app;
}

}  // namespace

std::function<std::optional<int>()> add_collective_benches(CLI::App& bench) {
  const std::pair<Coll, const char*> colls[] = {
      {Coll::kAllGather, "All-gather bandwidth per backend (nccl-tests table) against Open MPI"},
      {Coll::kReduceScatter,
       "Reduce-scatter bandwidth per backend (nccl-tests table) against Open MPI"},
      {Coll::kSendRecv,
       "Send/recv to the next rank per backend (nccl-tests table) against Open MPI"}};
  std::vector<std::pair<CLI::App*, std::shared_ptr<CollectiveOptions>>> apps;
  for (const auto& [coll, help] : colls) {
    auto o = std::make_shared<CollectiveOptions>();
    apps.emplace_back(add_one(bench, coll, help, o), o);
  }
  return [apps]() -> std::optional<int> {
    for (const auto& [app, o] : apps) {
      if (app->parsed())
        return o->worker ? run_collective_worker(*o) : run_collective_orchestrator(*o);
    }
    return std::nullopt;
  };
}

}  // namespace dtrain::cli
