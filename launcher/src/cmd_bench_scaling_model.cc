// `dtrain bench scaling --predict N | --fit OUT.json | --validate`: the scaling model
// (scaling_model.h) on the command line. docs/scaling.md describes the model.
//
//   --fit OUT      measures every configuration this machine offers (1-4 tcp ranks on
//                  this host: `bench allreduce` workers; 2 and 4 namespaced hosts x 1
//                  rank and 2 x 2 at --rate: `bench hosts`, root only; seed-cnn weak
//                  scaling on 1-4 workers), fits alpha/beta per link class and the
//                  overlap, and writes the fit with the rows it came from.
//   --predict N    prints step time, efficiency and busbw for 1, 2, 4, ..., N ranks from
//                  the fit file, with the link numbers as parameters (or a preset).
//   --validate     every measured row of the fit file (or, with --measure, a fresh
//                  measurement) against the model, and the error per row.
// Deliberately not here: the formulas (scaling_model.cc), timing loops (the benches).
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <thread>

#include "cmd_bench_collectives.h"
#include "cmd_bench_scaling_model.h"
#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/parallel/ddp.h"
#include "scaling_model.h"
#include "scaling_report.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace dtrain::cli {
namespace {

namespace fs = std::filesystem;
namespace sm = scaling;
using bench_detail::json_lines;
using bench_detail::run_capture;
using bench_detail::self_exe;
using nlohmann::json;

struct ModelOptions {
  std::optional<int> predict;
  std::string fit_out;
  bool validate = false, measure = false, refit = false;
  std::string fit_file = std::string(DTRAIN_SOURCE_DIR) + "/bench/scaling_fit.json";
  std::string preset, algo = "auto";
  std::optional<double> link_gbps, latency_us, nvlink_gbps, nvlink_latency_us, compute_ms, grad_mib,
      bytes;
  std::optional<int> gpus_per_node, nics_per_node;
  double tolerance = 15;
  int rate_mbit = 1000;  // tbf rate of the namespaced hosts
  int64_t max_bytes = int64_t{16} << 20;
  int rounds = 3;
  std::string out;  // --predict --out DIR: scaling.md and scaling.png (scaling_report.h)
};

// ---- the fit file ----

sm::Fit load_fit(const std::string& path) {
  std::ifstream in(path);
  DTRAIN_CHECK(in.good(), IoError, "fit file {}: cannot be read (refit with --fit {})", path, path);
  std::stringstream text;
  text << in.rdbuf();
  json j = json::parse(text.str(), nullptr, false);
  DTRAIN_CHECK(!j.is_discarded(), DataFormatError, "fit file {}: not valid JSON", path);
  try {
    return sm::fit_from_json(j);
  } catch (const DataFormatError& e) {
    DTRAIN_CHECK(false, DataFormatError, "{}: {}", path, e.message());
  }
  return {};
}

// ---- measuring ----

std::string temp_file(const std::string& what) {
  return (fs::temp_directory_path() / fmt::format("dtrain-model-{}-{}", getpid(), what)).string();
}

std::vector<json> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  fs::remove(path);
  return json_lines(text.str());
}

// `bench allreduce` workers (tcp backend) on n ranks of this host, auto's choice or
// with `algo` forced (DTRAIN_ALLREDUCE_ALGO): auto runs the slots and direct on one
// host, so the intra link's ring is measured forced.
void measure_host(const ModelOptions& o, int n, const std::string& algo, json& rows,
                  std::string* note) {
  const std::string out = temp_file(fmt::format("host{}{}.jsonl", n, algo));
  const std::string worker =
      fmt::format("{} bench allreduce --worker --backend tcp --max-bytes {} --out {}", self_exe(),
                  o.max_bytes, out);
  const std::string env = algo.empty() ? "" : fmt::format("DTRAIN_ALLREDUCE_ALGO={} ", algo);
  int st = 0;
  std::string log = run_capture(env + bench_detail::launch_command("tcp", n, worker), &st);
  if (st != 0) *note += fmt::format("host, {} ranks {}: status {}: {}\n", n, algo, st, log);
  for (const json& j : read_lines(out)) {
    rows.push_back({{"where", "host"},
                    {"algo", j.value("algo", "auto")},  // the algorithm the backend ran
                    {"ranks", n},
                    {"ranks_per_node", n},
                    {"bytes", j["bytes"]},
                    {"time_us", j["time_us"]}});
  }
}

// `bench hosts --rows`: every row with the algorithm it ran. DTRAIN_TCP_SPIN_US=0:
// the namespaced hosts share this machine's cores, and a rank spinning for its peer's
// packet keeps the core the packet's delivery (softirq) needs: with the default 300 us
// spin a small all-reduce step took 340-830 us here, blocking at once 40 us
// (docs/scaling.md). Real hosts deliver on their own cores.
void measure_netns(const ModelOptions& o, int hosts, int per_host, json& rows, std::string* note) {
  const std::string out = temp_file(fmt::format("netns{}x{}.jsonl", hosts, per_host));
  int st = 0;
  std::string text = run_capture(
      fmt::format("DTRAIN_TCP_SPIN_US=0 {} bench hosts --hosts {} --ranks-per-host {} --rate "
                  "{}mbit --max-bytes {} --rows {} 2>&1",
                  self_exe(), hosts, per_host, o.rate_mbit, o.max_bytes, out),
      &st);
  if (st != 0) *note += fmt::format("netns {} x {}: status {}: {}\n", hosts, per_host, st, text);
  for (const json& j : read_lines(out)) {
    rows.push_back({{"where", "netns"},
                    {"algo", j["algo"]},
                    {"ranks", hosts * per_host},
                    {"ranks_per_node", per_host},
                    {"rate_bps", j["rate_bps"]},
                    {"bytes", j["bytes"]},
                    {"iters", j["iters"]},
                    {"spin_us", 0},
                    {"time_us", j["time_us"]}});
  }
}

// One `bench scaling --compute-too` worker run of n workers: its row (ms_per_step
// with DDP, compute_ms without the all-reduce, rep by rep interleaved), or nullopt.
std::optional<json> scaling_run(const std::string& model, int n, std::string* note) {
  const std::string out = temp_file(fmt::format("scaling{}.json", n));
  int st = 0;
  std::string log =
      run_capture(fmt::format("{0} launch --nproc {1} -- {0} bench scaling --worker --model {2} "
                              "--batch 64 --steps 10 --reps 5 --compute-too --out {3} 2>&1",
                              self_exe(), n, model, out),
                  &st);
  auto got = read_lines(out);
  if (st != 0 || got.empty()) *note += fmt::format("scaling {}: status {}: {}\n", n, st, log);
  if (got.empty()) return std::nullopt;
  return got[0];
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// seed-cnn weak scaling on 1-4 workers, `rounds` interleaved sweeps, medians: the step
// with DDP, and the compute alone of the same concurrent workers (what the cores and
// the other builds leave each worker; measured in the same run, rep by rep).
void measure_scaling(const ModelOptions& o, const std::string& model, json& rows,
                     std::string* note) {
  std::map<int, std::vector<double>> step, compute;
  for (int round = 0; round < o.rounds; ++round) {
    for (int n = 1; n <= 4; ++n) {
      if (auto r = scaling_run(model, n, note)) {
        step[n].push_back((*r)["ms_per_step"].get<double>());
        compute[n].push_back((*r)["compute_ms"].get<double>());
      }
    }
  }
  for (auto& [n, v] : step) {
    rows.push_back({{"model", model},
                    {"workers", n},
                    {"ms_per_step", median_of(v)},
                    {"compute_ms", median_of(compute[n])}});
  }
}

json measure_all(const ModelOptions& o, const std::string& model) {
  json m = {{"allreduce", json::array()}, {"scaling", json::array()}};
  std::string note;
  for (int n = 2; n <= 4; ++n) {
    for (const char* algo : {"", "ring"}) measure_host(o, n, algo, m["allreduce"], &note);
  }
  for (auto [h, k] : {std::pair{2, 1}, {4, 1}, {2, 2}})
    measure_netns(o, h, k, m["allreduce"], &note);
  measure_scaling(o, model, m["scaling"], &note);
  if (!note.empty()) fmt::print("# measurement notes:\n{}", note);
  return m;
}

// ---- fitting ----

// The machine one measured row ran on, with `fit`'s links.
// Ranks beyond the measuring host's cores share them: copies and reductions run at
// cores/ranks of a core, as the compute does (host_slowdown).
double host_slowdown(const json& row, int cores) {
  const int ranks = row.contains("workers") ? row["workers"].get<int>() : row["ranks"].get<int>();
  return std::max(1.0, static_cast<double>(ranks) / cores);
}

// Ranks of a row beyond the measuring machine's cores (namespaced hosts share them).
double oversub_ranks(const json& row, int cores) {
  const int ranks = row.contains("workers") ? row["workers"].get<int>() : row["ranks"].get<int>();
  return std::max(0, ranks - cores);
}

sm::Machine row_machine(const sm::Machine& fit, const json& row, double fit_rate, int cores) {
  sm::Machine m = fit;
  m.ranks_per_node = row["ranks_per_node"].get<int>();
  for (sm::Link* l : {&m.mem, &m.intra}) {
    l->beta_Bps /= host_slowdown(row, cores);
    l->beta_mem_Bps /= host_slowdown(row, cores);
  }
  for (sm::Link* l : {&m.mem, &m.intra, &m.inter}) {
    l->alpha_s += oversub_ranks(row, cores) * l->alpha_oversub_s;
  }
  if (row.contains("rate_bps") && fit_rate > 0) {
    m.inter.beta_Bps *= row["rate_bps"].get<double>() / fit_rate;
  }
  return m;
}

// The algorithm the row ran (rows of fit files from before the benches recorded it
// say "auto": the model's auto on the row's machine).
comm::Algo row_algo(const json& row) {
  const comm::Algo a = comm::parse_algo(row["algo"].get<std::string>(), "measured row");
  if (a != comm::Algo::kAuto) return a;
  sm::Machine m;
  m.ranks_per_node = row["ranks_per_node"].get<int>();
  return sm::auto_algo(m, row["ranks"].get<int>(), row["bytes"].get<size_t>());
}

// The link class one row measures alone, or nullopt (hierarchical, 2 x 2: validation
// only). One-host rows beyond the cores move their bytes at cores/ranks of the speed.
std::optional<sm::Sample> row_sample(const json& row, int cores) {
  const int per_node = row["ranks_per_node"].get<int>(), n = row["ranks"].get<int>();
  const double bytes = row["bytes"].get<double>(), t = row["time_us"].get<double>() * 1e-6;
  if (per_node != 1 && per_node != n) return std::nullopt;
  const bool one_host = per_node == n;
  const double slow = one_host ? host_slowdown(row, cores) : 1.0;
  auto sample = [&](sm::LinkClass link, sm::Cost c) {
    c.wire_bytes *= slow;
    return sm::Sample{link, c, t, oversub_ranks(row, cores)};
  };
  const sm::LinkClass between = one_host ? sm::LinkClass::kIntra : sm::LinkClass::kInter;
  switch (row_algo(row)) {
    case comm::Algo::kLocal:
      return sample(sm::LinkClass::kMem, sm::local_cost(n, bytes));
    case comm::Algo::kDirect:
      return sample(sm::LinkClass::kMem, sm::direct_cost(n, bytes));
    case comm::Algo::kRecursiveDoubling:
      return sample(between, sm::rd_cost(n, bytes));
    case comm::Algo::kRing:
      return sample(between, sm::ring_cost(n, bytes));
    default:
      return std::nullopt;
  }
}

std::vector<double> model_buckets(const std::string& model) {
  Generator gen(0);
  auto net = nn::make_model(model, gen);
  parallel::DdpOptions d;
  std::vector<double> out;
  for (const auto& b :
       parallel::assign_buckets(net->parameters(), d.first_bucket_bytes, d.bucket_bytes)) {
    out.push_back(static_cast<double>(b.bytes));
  }
  return out;
}

// The compute of one weak-scaling row: measured alone at that worker count where the
// row has it (compute_ms), else the 1-worker compute x ranks/cores.
double row_compute_s(const json& r, const sm::Workload& w, int cores) {
  if (r.contains("compute_ms")) return r["compute_ms"].get<double>() * 1e-3;
  return w.compute_s * host_slowdown(r, cores);
}

sm::Workload fit_workload(const sm::Fit& fit, const std::string& model, double fit_rate) {
  sm::Workload w{model, 0, model_buckets(model), 0};
  std::vector<sm::StepSample> rows;
  for (const json& r : fit.measured["scaling"]) {
    if (r["workers"].get<int>() == 1) w.compute_s = r["ms_per_step"].get<double>() * 1e-3;
  }
  DTRAIN_CHECK(w.compute_s > 0, InvalidArgument, "--fit: no 1-worker {} step was measured", model);
  for (const json& r : fit.measured["scaling"]) {
    const int n = r["workers"].get<int>();
    if (n == 1) continue;
    json row = {{"workers", n}, {"ranks_per_node", n}};
    sm::Machine m = row_machine(fit.machine, row, fit_rate, fit.host_cores);
    rows.push_back({r["ms_per_step"].get<double>() * 1e-3, row_compute_s(r, w, fit.host_cores),
                    sm::predict_step(m, w, n, comm::Algo::kAuto).comm_s});
  }
  // The overlap is seen only where the all-reduce is more than the steps' noise: with
  // every comm under 5% of its step nothing is assumed hidden (0), not fitted.
  double largest = 0;
  for (const sm::StepSample& r : rows) largest = std::max(largest, r.comm_s / r.step_s);
  w.overlap = largest >= 0.05 ? sm::fit_overlap(rows) : 0.0;
  if (largest < 0.05) {
    fmt::print("# {}: comm at most {:.1f}% of a step: overlap not measurable, 0\n", model,
               100 * largest);
  }
  return w;
}

sm::Fit fit_measured(json measured, const std::string& model, int cores) {
  sm::Fit fit;
  fit.host_cores = cores;
  std::map<sm::LinkClass, std::vector<sm::Sample>> by_class;
  double rate = 0;
  for (const json& row : measured["allreduce"]) {
    if (row.contains("rate_bps")) rate = row["rate_bps"].get<double>();
    if (auto s = row_sample(row, cores)) by_class[s->link].push_back(*s);
    fit.machine.direct |= row_algo(row) == comm::Algo::kDirect;  // the backend has it
  }
  for (auto c : {sm::LinkClass::kMem, sm::LinkClass::kIntra, sm::LinkClass::kInter}) {
    DTRAIN_CHECK(by_class[c].size() >= 2, InvalidArgument,
                 "--fit: {} row(s) measure the {} link (need 2; bench hosts needs root)",
                 by_class[c].size(), sm::link_class_name(c));
  }
  fit.machine.mem = sm::fit_link(by_class[sm::LinkClass::kMem], true);
  fit.machine.intra = sm::fit_link(by_class[sm::LinkClass::kIntra], true);
  fit.machine.inter = sm::fit_link(by_class[sm::LinkClass::kInter], false, true);  // tbf
  for (auto c : {sm::LinkClass::kMem, sm::LinkClass::kIntra, sm::LinkClass::kInter}) {
    fmt::print("# {}: {} rows, mean |error| {:.1f}%\n", sm::link_class_name(c), by_class[c].size(),
               100 * sm::relative_error(sm::link_of(fit.machine, c), by_class[c]));
  }
  measured["inter_rate_bps"] = rate;
  fit.measured = measured;
  fit.workloads.push_back(fit_workload(fit, model, rate));
  return fit;
}

std::string link_text(const sm::Link& l) {
  std::string text =
      fmt::format("alpha {:>9.2f} us  beta {:>9.4f} GB/s", l.alpha_s * 1e6, l.beta_Bps / 1e9);
  if (l.knee_bytes > 0) {
    text += fmt::format(" up to a {:.0f} KiB working set, {:.4f} GB/s beyond", l.knee_bytes / 1024,
                        l.beta_mem_Bps / 1e9);
  }
  if (l.alpha_oversub_s > 0) {
    text += fmt::format("; +{:.2f} us a step per rank beyond the cores", l.alpha_oversub_s * 1e6);
  }
  if (l.shaped) text += "; shaped: max(latency, transfer)";
  return text;
}

void print_links(const sm::Machine& m) {
  for (auto [name, l] : {std::pair{"mem", m.mem}, {"intra", m.intra}, {"inter", m.inter}}) {
    fmt::print("# {:<6} {}\n", name, link_text(l));
  }
}

int run_fit(const ModelOptions& o, const std::string& model) {
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  json measured = o.refit ? load_fit(o.fit_file).measured : measure_all(o, model);
  sm::Fit fit = fit_measured(measured, model, cores);
  std::ofstream out(o.fit_out, std::ios::trunc);
  DTRAIN_CHECK(out.good(), IoError, "--fit {}: cannot be written", o.fit_out);
  out << sm::fit_to_json(fit).dump(1) << "\n";
  fmt::print("# fitted on {} cores, written to {}\n", cores, o.fit_out);
  print_links(fit.machine);
  for (const auto& w : fit.workloads) {
    fmt::print("# {}: compute {:.3f} ms/step, {} bucket(s), overlap {:.2f}\n", w.name,
               w.compute_s * 1e3, w.bucket_bytes.size(), w.overlap);
  }
  return 0;
}

// ---- validating ----

struct Verdict {
  int rows = 0, off = 0;
  double worst = 0;
  void add(double err, double tol) {
    ++rows;
    off += std::abs(err) > tol;
    worst = std::max(worst, std::abs(err));
  }
};

void validate_allreduce(const ModelOptions& o, const sm::Fit& fit, const json& measured,
                        Verdict& v) {
  const double rate = fit.measured.value("inter_rate_bps", 0.0);
  fmt::print("#{:>5} {:>6} {:>4} {:>13} {:>10} {:>12} {:>12} {:>8}  {}\n", "where", "ranks", "K",
             "algo", "bytes", "meas(us)", "model(us)", "err", "verdict");
  for (const json& row : measured["allreduce"]) {
    sm::Machine m = row_machine(fit.machine, row, rate, fit.host_cores);
    const int n = row["ranks"].get<int>();
    auto p = sm::allreduce_time(m, n, row["bytes"].get<size_t>(), row_algo(row));
    const double t = row["time_us"].get<double>(), err = 100.0 * (p.seconds * 1e6 - t) / t;
    v.add(err, o.tolerance);
    fmt::print("{:>6} {:>6} {:>4} {:>13} {:>10} {:>12.1f} {:>12.1f} {:>+7.1f}%  {}\n",
               row["where"].get<std::string>(), n, m.ranks_per_node, comm::algo_name(p.algo),
               row["bytes"].get<int64_t>(), t, p.seconds * 1e6, err,
               std::abs(err) <= o.tolerance ? "ok" : "OFF");
  }
}

void validate_scaling(const ModelOptions& o, const sm::Fit& fit, const json& measured, Verdict& v) {
  fmt::print("\n#{:>9} {:>8} {:>12} {:>12} {:>8}  {}\n", "model", "workers", "meas(ms)",
             "model(ms)", "err", "verdict");
  for (const json& row : measured["scaling"]) {
    sm::Workload w = sm::find_workload(fit, row["model"].get<std::string>());
    const int n = row["workers"].get<int>();
    const json where = {{"workers", n}, {"ranks_per_node", n}};
    sm::Machine m = row_machine(fit.machine, where, 0, fit.host_cores);
    w.compute_s = row_compute_s(row, w, fit.host_cores);
    const double pred = sm::predict_step(m, w, n, comm::Algo::kAuto).step_s * 1e3;
    const double t = row["ms_per_step"].get<double>(), err = 100.0 * (pred - t) / t;
    v.add(err, o.tolerance);
    fmt::print("{:>10} {:>8} {:>12.3f} {:>12.3f} {:>+7.1f}%  {}\n", w.name, n, t, pred, err,
               std::abs(err) <= o.tolerance ? "ok" : "OFF");
  }
}

int run_validate(const ModelOptions& o, const std::string& model) {
  sm::Fit fit = load_fit(o.fit_file);
  json measured = o.measure ? measure_all(o, model) : fit.measured;
  DTRAIN_CHECK(measured.contains("allreduce") && measured.contains("scaling"), DataFormatError,
               "fit file {}: holds no measured rows (refit with --fit)", o.fit_file);
  fmt::print("# scaling model against {} rows ({}), tolerance {:.0f}%\n",
             o.measure ? "freshly measured" : "the fit file's measured", o.fit_file, o.tolerance);
  print_links(fit.machine);
  Verdict v;
  validate_allreduce(o, fit, measured, v);
  validate_scaling(o, fit, measured, v);
  fmt::print("\n# {} of {} rows within {:.0f}%; worst error {:.1f}%: {}\n", v.rows - v.off, v.rows,
             o.tolerance, v.worst, v.off == 0 ? "PASS" : "FAIL");
  return v.off == 0 ? 0 : 1;
}

// ---- predicting ----

// dgx-h100: NVLink 4 at 450 GB/s per direction; 8 ConnectX-7 NICs at 400 Gb/s, one per
// GPU; alpha per step from NCCL's tuning table (src/graph/tuning.cc hwLat, Ring/LL128:
// NVLink 1.9 us, network 4.0 us).
sm::Machine preset_machine(const sm::Machine& fitted, const std::string& preset) {
  if (preset.empty() || preset == "fitted") return fitted;
  DTRAIN_CHECK(preset == "dgx-h100", InvalidArgument, "--preset '{}': expected dgx-h100 or fitted",
               preset);
  sm::Machine m = fitted;
  m.intra = {1.9e-6, 450e9};
  m.inter = {4.0e-6, 400e9 / 8};
  m.ranks_per_node = 8;
  m.nics_per_node = 8;
  m.slots = false;
  m.direct = false;
  return m;
}

double positive(const std::optional<double>& v, const char* flag) {
  DTRAIN_CHECK(*v > 0 && std::isfinite(*v), InvalidArgument, "{} {}: must be > 0", flag, *v);
  return *v;
}

sm::Machine predict_machine(const ModelOptions& o, const sm::Fit& fit) {
  sm::Machine m = preset_machine(fit.machine, o.preset);
  if (o.link_gbps || o.latency_us) m.inter.shaped = false;  // a real NIC, not tbf
  if (o.link_gbps) m.inter.beta_Bps = positive(o.link_gbps, "--link-gbps") * 1e9 / 8;
  if (o.latency_us) m.inter.alpha_s = positive(o.latency_us, "--latency-us") * 1e-6;
  if (o.nvlink_gbps) {  // a link of its own: no cache knee of this host's memory
    m.intra.beta_Bps = positive(o.nvlink_gbps, "--nvlink-gbps") * 1e9, m.slots = false;
    m.intra.knee_bytes = 0, m.direct = false;
  }
  if (o.nvlink_latency_us)
    m.intra.alpha_s = positive(o.nvlink_latency_us, "--nvlink-latency-us") * 1e-6;
  if (o.gpus_per_node) m.ranks_per_node = *o.gpus_per_node;
  if (o.nics_per_node) m.nics_per_node = *o.nics_per_node;
  DTRAIN_CHECK(m.ranks_per_node >= 1 && m.nics_per_node >= 1, InvalidArgument,
               "--gpus-per-node and --nics-per-node must be >= 1");
  return m;
}

sm::Workload predict_workload(const ModelOptions& o, const sm::Fit& fit, const std::string& model) {
  sm::Workload w = sm::find_workload(fit, model);
  if (o.compute_ms) w.compute_s = positive(o.compute_ms, "--compute-ms") * 1e-3;
  if (o.grad_mib) w.bucket_bytes = sm::ddp_buckets(positive(o.grad_mib, "--grad-mib") * (1 << 20));
  return w;
}

// One printed row: the cells as the console shows them (and the markdown repeats).
std::vector<std::string> predict_cells(const sm::Machine& m, const sm::Workload& w, int n,
                                       double bytes, comm::Algo algo, sm::StepPrediction* step) {
  const int nodes = std::max(1, n / std::min(n, m.ranks_per_node));
  auto one = sm::allreduce_time(m, n, static_cast<size_t>(bytes), algo);
  *step = sm::predict_step(m, w, n, algo);
  return {std::to_string(n),
          std::to_string(nodes),
          n == 1 ? "-" : comm::algo_name(one.algo),
          fmt::format("{:.1f}", one.seconds * 1e6),
          fmt::format("{:.3f}", sm::busbw_Bps(n, bytes, one.seconds) / 1e9),
          fmt::format("{:.3f}", step->comm_s * 1e3),
          fmt::format("{:.3f}", step->exposed_s * 1e3),
          fmt::format("{:.3f}", step->step_s * 1e3),
          fmt::format("{:.1f}%", 100.0 * step->efficiency)};
}

// The fit file's measured weak-scaling rows of `model` (this host), as plot points.
ScalingSeries measured_series(const sm::Fit& fit, const std::string& model) {
  ScalingSeries s{"measured (fit file, this host)", true, {}, {}, {}};
  double one = 0;
  const json rows =
      fit.measured.is_object() ? fit.measured.value("scaling", json::array()) : json::array();
  for (const json& r : rows) {
    if (r.value("model", "") != model) continue;
    const int n = r["workers"].get<int>();
    const double ms = r["ms_per_step"].get<double>();
    if (n == 1) one = ms;
    s.ranks.push_back(n);
    s.step_ms.push_back(ms);
  }
  for (double ms : s.step_ms) s.efficiency.push_back(one > 0 ? one / ms : 0.0);
  if (one <= 0) s.ranks.clear(), s.step_ms.clear(), s.efficiency.clear();
  return s;
}

int run_predict(const ModelOptions& o, const std::string& model) {
  const std::vector<int> ranks = sm::predict_ranks(*o.predict);
  sm::Fit fit = load_fit(o.fit_file);
  const sm::Machine m = predict_machine(o, fit);
  const sm::Workload w = predict_workload(o, fit, model);
  const comm::Algo algo = comm::parse_algo(o.algo, "--algo");
  double grad = 0;
  for (double b : w.bucket_bytes) grad += b;
  const double bytes = o.bytes ? positive(o.bytes, "--bytes") : grad;
  ScalingReport report;
  report.title = fmt::format(
      "scaling model ({}{}): {} compute {:.3f} ms/step, gradients {:.0f} B in {} "
      "bucket(s), overlap {:.2f}; {} rank(s)/node, {} NIC(s)/node",
      o.fit_file, o.preset.empty() ? "" : ", preset " + o.preset, w.name, w.compute_s * 1e3, grad,
      w.bucket_bytes.size(), w.overlap, m.ranks_per_node, m.nics_per_node);
  fmt::print("# {}\n", report.title);
  print_links(m);
  report.columns = {"ranks",    "nodes",   "algo",     "allreduce(us)", "busbw(GB/s)",
                    "comm(ms)", "exposed", "step(ms)", "effic"};
  const auto& c = report.columns;
  fmt::print("{:>6} {:>6} {:>13} {:>14} {:>12} {:>10} {:>10} {:>10} {:>8}\n", c[0], c[1], c[2],
             c[3], c[4], c[5], c[6], c[7], c[8]);
  ScalingSeries predicted{"predicted", false, {}, {}, {}};
  for (int n : ranks) {
    sm::StepPrediction s;
    const auto& r = report.rows.emplace_back(predict_cells(m, w, n, bytes, algo, &s));
    fmt::print("{:>6} {:>6} {:>13} {:>14} {:>12} {:>10} {:>10} {:>10} {:>8}\n", r[0], r[1], r[2],
               r[3], r[4], r[5], r[6], r[7], r[8]);
    predicted.ranks.push_back(n);
    predicted.step_ms.push_back(s.step_s * 1e3);
    predicted.efficiency.push_back(s.efficiency);
  }
  if (o.out.empty()) return 0;
  for (auto [name, l] : {std::pair{"mem", m.mem}, {"intra", m.intra}, {"inter", m.inter}}) {
    report.notes.push_back(fmt::format("{} alpha {:.2f} us, beta {:.4f} GB/s", name,
                                       l.alpha_s * 1e6, l.beta_Bps / 1e9));
  }
  report.series = {predicted};  // this host's measured rows say nothing of a preset's machine
  if (o.preset.empty() || o.preset == "fitted")
    report.series.push_back(measured_series(fit, model));
  write_scaling_report(o.out, report);
  fmt::print("# table and plot: {}/scaling.md, {}/scaling.png\n", o.out, o.out);
  return 0;
}

void add_options(CLI::App& sc, ModelOptions& o) {
  sc.add_option("--predict", o.predict,
                "Predict for 1, 2, 4, ..., N ranks (N a power of two <= 1024)");
  sc.add_option("--fit", o.fit_out, "Measure this machine and write the fitted model to this file");
  sc.add_flag("--validate", o.validate, "Compare the model with every measured row");
  sc.add_flag("--refit", o.refit, "With --fit: fit the rows of --fit-file instead of measuring");
  sc.add_flag("--measure", o.measure, "With --validate: measure fresh rows instead of the file's");
  sc.add_option("--fit-file", o.fit_file, "The fitted model to read")->capture_default_str();
  sc.add_option("--preset", o.preset, "Link numbers: fitted (default) or dgx-h100");
  sc.add_option("--link-gbps", o.link_gbps, "Inter-node link per NIC, Gb/s (InfiniBand: 400)");
  sc.add_option("--latency-us", o.latency_us, "Inter-node alpha per step, us");
  sc.add_option("--nvlink-gbps", o.nvlink_gbps,
                "Intra-node link per direction, GB/s (NVLink 4: 450)");
  sc.add_option("--nvlink-latency-us", o.nvlink_latency_us, "Intra-node alpha per step, us");
  sc.add_option("--gpus-per-node", o.gpus_per_node, "Ranks per node");
  sc.add_option("--nics-per-node", o.nics_per_node, "Inter-node NICs per node");
  sc.add_option("--algo", o.algo, "auto, ring, rd, local, direct, hierarchical")
      ->capture_default_str();
  sc.add_option("--compute-ms", o.compute_ms, "Compute per step instead of the measured one");
  sc.add_option("--grad-mib", o.grad_mib, "Gradient MiB instead of the model's (DDP buckets)");
  sc.add_option("--bytes", o.bytes, "All-reduce size of the busbw column (default: gradients)");
  sc.add_option("--tolerance", o.tolerance, "--validate: allowed error, %")->capture_default_str();
  sc.add_option("--rate-mbit", o.rate_mbit, "--fit/--measure: tbf rate of the namespaced hosts")
      ->capture_default_str()
      ->check(kPositive);
}

}  // namespace

std::function<std::optional<int>()> add_scaling_model_options(CLI::App& sc) {
  auto o = std::make_shared<ModelOptions>();
  add_options(sc, *o);
  return [o, &sc]() -> std::optional<int> {
    if (!sc.parsed() || (!o->predict && o->fit_out.empty() && !o->validate)) return std::nullopt;
    const std::string model = sc.get_option("--model")->as<std::string>();
    o->out = sc.get_option("--out")->as<std::string>();  // --predict: the report folder
    if (!o->fit_out.empty()) return run_fit(*o, model);
    if (o->validate) return run_validate(*o, model);
    return run_predict(*o, model);
  };
}

}  // namespace dtrain::cli
