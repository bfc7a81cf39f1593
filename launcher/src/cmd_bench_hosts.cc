// `dtrain bench hosts`: all-reduce across hosts that are network namespaces on this
// machine, each link shaped to a line rate, in the nccl-tests format.
//
// The orchestrator brings up --hosts namespaces with scripts/netns-hosts (a bridge,
// one veth per host, tbf at --rate on each host's egress), and for every algorithm
// in --algos starts one worker process per host inside its namespace. A worker runs
// --ranks-per-host rank threads; each binds its tcp communicator to the namespace's
// address and meets the others through a FileStore in a shared temp folder. ring is
// the flat ring over every rank; hierarchical is HierarchicalCommunicator with the
// real host key (host_key_from_env: the namespaces differ). The sweep (doubling from
// --min-bytes to --max-bytes, f32 sum, in place): per size, bench_detail::time_loop
// (warm-up, rounds of a barrier and back-to-back all-reduces, the slowest rank's time
// per operation, the median round; as `bench allreduce`), then one checked all-reduce
// for #wrong. busbw = algbw x 2(n-1)/n over all n ranks (nccl-tests);
// "line" is busbw / line rate: the flat ring's ideal is 1.0; the hierarchical
// all-reduce moves less over each host's link and can go above it. The namespaces
// are removed when the bench ends (and by the next `netns-hosts up` if it is killed).
// --rows FILE also writes every row as a JSON line with the algorithm that ran it
// (ring's sizes run rd or ring by comm::algorithm_for; `dtrain bench scaling --fit`
// reads them).
//
// TCP settings come from TcpOptions::from_env (DTRAIN_TCP_SOCKET_BUFFER,
// DTRAIN_TCP_CHUNK_BYTES, ...); tbf's burst and latency from NETNS_TBF_BURST and
// NETNS_TBF_LATENCY, the links' MTU from NETNS_MTU (read by the script).
// Deliberately not here: other dtypes and ops, peers (Gloo, Open MPI).
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "cmd_bench_collectives.h"
#include "commands.h"
#include "dtrain/comm/hierarchical.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/common/error.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace dtrain::cli {
namespace {

namespace fs = std::filesystem;
using bench_detail::json_lines;
using bench_detail::run_capture;
using bench_detail::self_exe;
using Rows = std::map<int64_t, nlohmann::json>;  // by size in bytes

struct HostsOptions {
  int hosts = 4;
  int ranks_per_host = 1;
  std::string rate = "1gbit";
  std::string algos = "ring,hierarchical";
  int64_t min_bytes = 8;
  int64_t max_bytes = int64_t{64} << 20;
  std::string script = std::string(DTRAIN_SOURCE_DIR) + "/scripts/netns-hosts";
  // worker mode
  bool worker = false;
  int host = 0;
  std::string addr, store, algo, out;
  std::string rows;  // --rows: every row as a JSON line
};

// "1gbit", "500mbit", "100kbit", "1e9bit": bits per second (tc's spelling).
double rate_bits_per_s(const std::string& rate) {
  size_t end = 0;
  double v = 0;
  try {
    v = std::stod(rate, &end);
  } catch (const std::exception&) {
  }
  const std::string unit = rate.substr(end);
  const double scale = unit == "gbit"   ? 1e9
                       : unit == "mbit" ? 1e6
                       : unit == "kbit" ? 1e3
                       : unit == "bit"  ? 1.0
                                        : 0.0;
  DTRAIN_CHECK(v > 0 && scale > 0, InvalidArgument,
               "--rate '{}': expected a number with gbit, mbit, kbit or bit (tc's units)", rate);
  return v * scale;
}

// ---- worker: one host's rank threads ----
// The algorithm one size of the sweep runs: hierarchical's own, or the flat tcp
// communicator's choice (bench_detail::tcp_allreduce_algo).
std::string ran_algo(const comm::Communicator& comm, const HostsOptions& o, size_t bytes) {
  if (o.algo == "hierarchical") return "hierarchical";
  return comm::algo_name(bench_detail::tcp_allreduce_algo(comm, bytes));
}

// The sweep on one rank; rank 0 appends its rows to `out`.
void sweep(comm::Communicator& comm, const HostsOptions& o, std::ofstream& out) {
  const int n = comm.size();
  for (int64_t nbytes = o.min_bytes; nbytes <= o.max_bytes; nbytes *= 2) {
    const size_t count = static_cast<size_t>(std::max<int64_t>(1, nbytes / 4));
    std::vector<float> buf(count, 0.0f);  // zeros: in-place sums stay finite
    auto allreduce = [&] { comm.allreduce(buf.data(), count, DType::f32, comm::ReduceOp::kSum); };
    const bench_detail::LoopTiming timing = bench_detail::loop_timing(nbytes);
    const double t = bench_detail::time_loop(comm, timing, allreduce);
    std::fill(buf.begin(), buf.end(), static_cast<float>(comm.rank() + 1));
    allreduce();
    const float expect = static_cast<float>(n) * static_cast<float>(n + 1) / 2.0f;
    int64_t wrong = std::count_if(buf.begin(), buf.end(), [&](float v) { return v != expect; });
    comm.allreduce(&wrong, 1, DType::i64, comm::ReduceOp::kSum);
    if (comm.rank() != 0) continue;
    const double algbw = static_cast<double>(count * 4) / t / 1e9;
    out << nlohmann::json{{"bytes", count * 4},
                          {"count", count},
                          {"time_us", t * 1e6},
                          {"algbw_GBps", algbw},
                          {"busbw_GBps", algbw * 2.0 * (n - 1) / n},
                          {"wrong", wrong},
                          {"algo", ran_algo(comm, o, count * 4)},
                          {"iters", timing.iters}}
               .dump()
        << "\n";
    out.flush();
  }
}

void run_rank(const HostsOptions& o, comm::Store& store, int rank, std::ofstream& out) {
  comm::TcpOptions tcp = comm::TcpOptions::from_env();
  tcp.bind_address = o.addr;
  tcp.advertise_host = o.addr;
  tcp.tag = "bench-hosts-" + o.algo;
  const int world = o.hosts * o.ranks_per_host;
  auto flat = comm::make_tcp_communicator(store, rank, world,
                                          comm::CommOptions{std::chrono::seconds(120)}, tcp);
  if (o.algo == "ring") return sweep(*flat, o, out);
  auto hier = comm::HierarchicalCommunicator::create(*flat, comm::host_key_from_env());
  DTRAIN_CHECK(hier->layout().hosts == o.hosts, InternalError,
               "bench hosts: the host keys tell {} hosts apart, expected {}", hier->layout().hosts,
               o.hosts);
  sweep(*hier, o, out);
}

int run_host_worker(const HostsOptions& o) {
  comm::FileStore store(o.store);
  std::ofstream out;
  if (o.host == 0) {
    out.open(o.out, std::ios::trunc);
    DTRAIN_CHECK(out.good(), IoError, "bench hosts: cannot write {}", o.out);
  }
  std::vector<std::string> errors(static_cast<size_t>(o.ranks_per_host));
  std::vector<std::thread> threads;
  for (int k = 0; k < o.ranks_per_host; ++k) {
    threads.emplace_back([&, k] {
      try {
        run_rank(o, store, o.host * o.ranks_per_host + k, out);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(k)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  int rc = 0;
  for (int k = 0; k < o.ranks_per_host; ++k) {
    if (errors[static_cast<size_t>(k)].empty()) continue;
    spdlog::error("host {} rank {}: {}", o.host, o.host * o.ranks_per_host + k,
                  errors[static_cast<size_t>(k)]);
    rc = 1;
  }
  return rc;
}

// ---- orchestrator ----

// The namespaces of one bench run; removed when this goes out of scope.
class NetnsRun {
 public:
  NetnsRun(const HostsOptions& o) : script_(o.script) {
    int st = 0;
    std::string why = run_capture(script_ + " check 2>&1", &st);
    DTRAIN_CHECK(st == 0, UnsupportedError, "bench hosts: cannot make network namespaces: {}", why);
    std::string id = run_capture(fmt::format("{} up {} {}", script_, o.hosts, o.rate), &st);
    id.erase(id.find_last_not_of(" \n") + 1);
    DTRAIN_CHECK(st == 0 && !id.empty(), IoError, "bench hosts: `{} up {} {}` failed (status {})",
                 script_, o.hosts, o.rate, st);
    id_ = id;
  }
  ~NetnsRun() {
    int st = 0;
    run_capture(fmt::format("{} down {}", script_, id_), &st);
  }
  NetnsRun(const NetnsRun&) = delete;
  NetnsRun& operator=(const NetnsRun&) = delete;
  const std::string& id() const { return id_; }
  std::string address(int host) const {
    int st = 0;
    std::string a = run_capture(fmt::format("{} ip {}", script_, host), &st);
    a.erase(a.find_last_not_of(" \n") + 1);
    return a;
  }

 private:
  std::string script_, id_;
};

Rows run_algo(const HostsOptions& o, const NetnsRun& run, const std::string& algo,
              std::string* note) {
  const fs::path base = fs::temp_directory_path() / fmt::format("dtrain-bench-hosts-{}", getpid());
  const fs::path store = base / (algo + "-store"), out = base / (algo + ".jsonl");
  fs::remove_all(base);
  fs::create_directories(store);
  std::string shell;  // every host's worker in the background, then every status
  for (int h = 0; h < o.hosts; ++h) {
    shell += fmt::format(
        "{} exec {} {} {} bench hosts --worker --host {} --hosts {} --ranks-per-host {} --addr {} "
        "--store {} --algo {} --min-bytes {} --max-bytes {} --out {} & p{}=$!; ",
        o.script, run.id(), h, self_exe(), h, o.hosts, o.ranks_per_host, run.address(h),
        store.string(), algo, o.min_bytes, o.max_bytes, out.string(), h);
  }
  shell += "rc=0; ";
  for (int h = 0; h < o.hosts; ++h) shell += fmt::format("wait $p{} || rc=1; ", h);
  int st = 0;
  std::string log = run_capture(fmt::format("sh -c '{}exit $rc' 2>&1", shell), &st);
  Rows rows;
  std::ifstream in(out);
  std::stringstream text;
  text << in.rdbuf();
  for (auto& j : json_lines(text.str())) rows[j["bytes"].get<int64_t>()] = j;
  fs::remove_all(base);
  if (st != 0) *note += fmt::format("{}: workers exited with status {}:\n{}\n", algo, st, log);
  return rows;
}

void print_table(const HostsOptions& o, const std::string& algo, const Rows& rows, double line) {
  fmt::print(
      "# dtrain all-reduce across {} namespaced hosts x {} rank(s), tbf {} per host "
      "(line rate {:.4f} GB/s), algorithm {}, float sum, in place\n",
      o.hosts, o.ranks_per_host, o.rate, line, algo);
  fmt::print("#{:>11} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7} {:>7}\n", "size", "count", "type",
             "redop", "time", "algbw", "busbw", "line", "#wrong");
  fmt::print("#{:>11} {:>12} {:>6} {:>6} {:>10} {:>8} {:>8} {:>7} {:>7}\n", "(B)", "(elements)", "",
             "", "(us)", "(GB/s)", "(GB/s)", "(x)", "");
  for (const auto& [bytes, j] : rows) {
    const double bus = j["busbw_GBps"].get<double>();
    fmt::print("{:>12} {:>12} {:>6} {:>6} {:>10.1f} {:>8.4f} {:>8.4f} {:>7.3f} {:>7}\n", bytes,
               j["count"].get<int64_t>(), "float", "sum", j["time_us"].get<double>(),
               j["algbw_GBps"].get<double>(), bus, bus / line, j["wrong"].get<int64_t>());
  }
  fmt::print("\n");
}

// Every algorithm's busbw per size, and each against the first (the flat ring).
void print_side_by_side(const std::vector<std::string>& algos, std::map<std::string, Rows>& rows) {
  fmt::print("# busbw (GB/s) side by side; ratio = time of {} / time of the other\n", algos[0]);
  std::string head = fmt::format("#{:>11}", "size (B)");
  for (const auto& a : algos) head += fmt::format(" {:>13}", a);
  for (size_t i = 1; i < algos.size(); ++i)
    head += fmt::format(" {:>13}", algos[i] + "/" + algos[0]);
  fmt::print("{}\n", head);
  for (const auto& [bytes, j0] : rows[algos[0]]) {
    std::string line = fmt::format("{:>12}", bytes);
    for (const auto& a : algos) {
      auto it = rows[a].find(bytes);
      line += it == rows[a].end()
                  ? fmt::format(" {:>13}", "-")
                  : fmt::format(" {:>13.4f}", it->second["busbw_GBps"].get<double>());
    }
    for (size_t i = 1; i < algos.size(); ++i) {
      auto it = rows[algos[i]].find(bytes);
      line += it == rows[algos[i]].end()
                  ? fmt::format(" {:>13}", "-")
                  : fmt::format(" {:>12.2f}x",
                                j0["time_us"].get<double>() / it->second["time_us"].get<double>());
    }
    fmt::print("{}\n", line);
  }
}

// --rows: every row of every algorithm, with the bench's shape (hosts, ranks, tbf).
void write_rows(const HostsOptions& o, const std::map<std::string, Rows>& rows) {
  std::ofstream out(o.rows, std::ios::trunc);
  DTRAIN_CHECK(out.good(), IoError, "bench hosts --rows {}: cannot be written", o.rows);
  for (const auto& [requested, by_size] : rows) {
    for (const auto& [bytes, j] : by_size) {
      nlohmann::json row = j;
      row["requested"] = requested;
      row["hosts"] = o.hosts;
      row["ranks_per_host"] = o.ranks_per_host;
      row["rate_bps"] = rate_bits_per_s(o.rate);
      out << row.dump() << "\n";
    }
  }
}

int run_hosts_bench(const HostsOptions& o) {
  const double line = rate_bits_per_s(o.rate) / 8 / 1e9;
  std::vector<std::string> algos;
  std::stringstream ss(o.algos);
  for (std::string a; std::getline(ss, a, ',');) {
    DTRAIN_CHECK(a == "ring" || a == "hierarchical", InvalidArgument,
                 "--algos: unknown algorithm '{}' (ring, hierarchical)", a);
    algos.push_back(a);
  }
  DTRAIN_CHECK(!algos.empty(), InvalidArgument, "--algos: name at least one of ring, hierarchical");
  NetnsRun run(o);
  std::string note;
  std::map<std::string, Rows> rows;
  for (const auto& a : algos) {
    rows[a] = run_algo(o, run, a, &note);
    print_table(o, a, rows[a], line);
  }
  if (algos.size() > 1) print_side_by_side(algos, rows);
  if (!o.rows.empty()) write_rows(o, rows);
  if (!note.empty()) fmt::print("# notes:\n{}", note);
  bool complete = true;
  for (const auto& a : algos) complete &= !rows[a].empty();
  return complete && note.empty() ? 0 : 1;
}

}  // namespace

std::function<std::optional<int>()> add_hosts_bench(CLI::App& bench) {
  auto o = std::make_shared<HostsOptions>();
  CLI::App* h = bench.add_subcommand(
      "hosts", "All-reduce across namespaced hosts shaped with tbf (root; nccl-tests table)");
  h->add_option("--hosts", o->hosts, "Hosts (network namespaces)")
      ->capture_default_str()
      ->check(kPositive);
  h->add_option("--ranks-per-host", o->ranks_per_host, "Rank threads per host")
      ->capture_default_str()
      ->check(kPositive);
  h->add_option("--rate", o->rate, "tbf rate of each host's link (tc units: 1gbit, 500mbit)")
      ->capture_default_str();
  h->add_option("--algos", o->algos, "Comma-separated: ring, hierarchical")->capture_default_str();
  h->add_option("--min-bytes", o->min_bytes, "Smallest message")
      ->capture_default_str()
      ->check(kPositive);
  h->add_option("--max-bytes", o->max_bytes, "Largest message (the sweep doubles)")
      ->capture_default_str()
      ->check(kPositive);
  h->add_option("--netns-script", o->script, "The namespace hosts script")->capture_default_str();
  h->add_option("--rows", o->rows,
                "Also write every row (with the algorithm it ran) as JSON lines");
  h->add_flag("--worker", o->worker, "(internal) run one host's ranks");
  h->add_option("--host", o->host, "(internal) this worker's host");
  h->add_option("--addr", o->addr, "(internal) this host's address");
  h->add_option("--store", o->store, "(internal) the FileStore folder");
  h->add_option("--algo", o->algo, "(internal) ring or hierarchical");
  h->add_option("--out", o->out, "(internal) where rank 0 writes its rows");
  return [o, h]() -> std::optional<int> {
    if (!h->parsed()) return std::nullopt;
    return o->worker ? run_host_worker(*o) : run_hosts_bench(*o);
  };
}

}  // namespace dtrain::cli
