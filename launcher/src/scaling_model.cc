// The scaling model's formulas, fits and fit-file schema (scaling_model.h).
#include "scaling_model.h"

#include <algorithm>
#include <cmath>

#include "dtrain/common/error.h"

namespace dtrain::cli::scaling {

const char* link_class_name(LinkClass c) {
  switch (c) {
    case LinkClass::kMem:
      return "mem";
    case LinkClass::kIntra:
      return "intra";
    case LinkClass::kInter:
      return "inter";
  }
  return "?";
}

namespace {

int floor_log2(int n) {
  int r = 0;
  while ((2 << r) <= n) ++r;
  return r;
}

// The slower of two links, step by step (a ring step waits for its slowest edge).
Link slowest(const Link& a, const Link& b) {
  return {std::max(a.alpha_s, b.alpha_s), std::min(a.beta_Bps, b.beta_Bps)};
}

}  // namespace

Cost ring_cost(int n, double bytes) {
  if (n <= 1) return {};
  return {2.0 * (n - 1), 2.0 * (n - 1) / n * bytes};
}

Cost ring_half_cost(int n, double bytes) {
  if (n <= 1) return {};
  return {static_cast<double>(n - 1), static_cast<double>(n - 1) / n * bytes};
}

Cost rd_cost(int n, double bytes) {
  if (n <= 1) return {};
  const int p = 1 << floor_log2(n);
  const double rounds = floor_log2(n) + (n != p ? 2 : 0);
  return {rounds, rounds * bytes};
}

Cost local_cost(int n, double bytes) {
  if (n <= 1) return {};
  return {2.0, n * bytes};  // two waits; the copy-in and the n-1 peers' reads
}

comm::Algo auto_algo(const Machine& m, int ranks, size_t bytes) {
  const bool one_node = ranks <= m.ranks_per_node;
  if (m.slots && one_node && bytes <= m.local_max_bytes) return comm::Algo::kLocal;
  if (bytes <= m.small_max_bytes) return comm::Algo::kRecursiveDoubling;
  return comm::Algo::kRing;
}

namespace {

// Recursive doubling with the ranks of a node numbered together: the rounds whose
// partner is inside the node (distance < K) run on the intra link, the others between
// nodes; the fold-in pairs (2i, 2i+1) are neighbours.
double rd_seconds(const Machine& m, int n, int per_node, double bytes) {
  Cost all = rd_cost(n, bytes);
  if (n == per_node) return all.seconds(m.intra);
  const int rounds = floor_log2(n);
  const int inside = std::min(rounds, floor_log2(per_node));
  const double fold = all.steps - rounds;
  const Link fold_link = per_node >= 2 ? m.intra : m.inter;
  return Cost{double(inside), inside * bytes}.seconds(m.intra) +
         Cost{double(rounds - inside), (rounds - inside) * bytes}.seconds(m.inter) +
         Cost{fold, fold * bytes}.seconds(fold_link);
}

// One of hierarchical's local stages: reduce-scatter of `bytes` (or all-gather to
// `bytes`) over K ranks; `placed` is the buffer one rank places (what algorithm_for
// sees). The slot forms copy in what a rank places and read the peers' blocks.
double local_stage(const Machine& m, int k, double bytes, double placed) {
  if (k <= 1) return 0;
  if (m.slots && placed <= static_cast<double>(m.local_max_bytes)) {
    return Cost{2.0, placed + (k - 1) * bytes / k}.seconds(m.mem);
  }
  return ring_half_cost(k, bytes).seconds(m.intra);
}

double hierarchical_seconds(const Machine& m, int per_node, int nodes, double bytes) {
  const double shard = bytes / per_node;
  double cross = 0;
  if (nodes > 1) {
    // K cross rings, one per local index, share the node's NICs.
    Link net = m.inter;
    net.beta_Bps *= static_cast<double>(std::min(m.nics_per_node, per_node)) / per_node;
    cross = shard <= static_cast<double>(m.small_max_bytes) ? rd_cost(nodes, shard).seconds(net)
                                                            : ring_cost(nodes, shard).seconds(net);
  }
  return local_stage(m, per_node, bytes, bytes) + cross + local_stage(m, per_node, bytes, shard);
}

}  // namespace

Prediction allreduce_time(const Machine& m, int ranks, size_t bytes, comm::Algo algo) {
  DTRAIN_CHECK(ranks >= 1, InvalidArgument, "scaling model: ranks must be >= 1, got {}", ranks);
  DTRAIN_CHECK(m.ranks_per_node >= 1, InvalidArgument,
               "scaling model: ranks per node must be >= 1, got {}", m.ranks_per_node);
  const int k = std::min(ranks, m.ranks_per_node);
  DTRAIN_CHECK(ranks % k == 0, InvalidArgument,
               "scaling model: {} ranks do not fill nodes of {} evenly", ranks, k);
  const int nodes = ranks / k;
  if (algo == comm::Algo::kAuto) algo = auto_algo(m, ranks, bytes);
  const double s = static_cast<double>(bytes);
  switch (algo) {
    case comm::Algo::kLocal:
      DTRAIN_CHECK(nodes == 1 && m.slots, InvalidArgument,
                   "scaling model: the local algorithm needs every rank on one host");
      return {algo, local_cost(ranks, s).seconds(m.mem)};
    case comm::Algo::kRecursiveDoubling:
      return {algo, rd_seconds(m, ranks, k, s)};
    case comm::Algo::kRing:
      return {algo, ring_cost(ranks, s).seconds(nodes > 1 ? slowest(m.intra, m.inter) : m.intra)};
    case comm::Algo::kHierarchical:
      return {algo, hierarchical_seconds(m, k, nodes, s)};
    default:
      break;
  }
  DTRAIN_CHECK(false, InvalidArgument, "scaling model: no model of algorithm '{}'",
               comm::algo_name(algo));
  return {};
}

double busbw_Bps(int ranks, double bytes, double seconds) {
  if (ranks <= 1 || seconds <= 0) return 0;
  return bytes / seconds * 2.0 * (ranks - 1) / ranks;
}

std::vector<double> ddp_buckets(double grad_bytes, double first_bytes, double bucket_bytes) {
  std::vector<double> out;
  double left = grad_bytes;
  for (double cap = first_bytes; left > 0; cap = bucket_bytes) {
    out.push_back(std::min(cap, left));
    left -= out.back();
  }
  return out;
}

StepPrediction predict_step(const Machine& m, const Workload& w, int ranks, comm::Algo algo) {
  StepPrediction p;
  p.ranks = ranks;
  double largest = -1;
  for (double b : w.bucket_bytes) {
    Prediction one = allreduce_time(m, ranks, static_cast<size_t>(b), algo);
    p.comm_s += one.seconds;
    if (b > largest) largest = b, p.algo = one.algo;
  }
  p.exposed_s = (1.0 - w.overlap) * p.comm_s;
  p.step_s = w.compute_s + p.exposed_s;
  p.efficiency = p.step_s > 0 ? w.compute_s / p.step_s : 1.0;
  return p;
}

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

// Latency from the small messages, bandwidth from the large ones (Hockney's fit):
// the rows sorted by bytes on the wire, alpha is the median of (t - wire/beta)/steps
// over the smallest third (robust to the bimodal latencies of a shared machine), 1/beta
// the least-squares slope of t - steps x alpha against wire over the largest third;
// two rounds, starting from alpha = 0.
Link fit_link(const std::vector<Sample>& samples) {
  DTRAIN_CHECK(samples.size() >= 3, InvalidArgument,
               "scaling fit: {} sample(s); alpha and beta need at least 3", samples.size());
  std::vector<Sample> rows = samples;
  std::sort(rows.begin(), rows.end(),
            [](const Sample& a, const Sample& b) { return a.cost.wire_bytes < b.cost.wire_bytes; });
  const size_t third = std::max<size_t>(1, rows.size() / 3);
  double alpha = 0, inv_beta = 0;
  for (int round = 0; round < 2; ++round) {
    double num = 0, den = 0;
    for (size_t i = rows.size() - third; i < rows.size(); ++i) {
      num += rows[i].cost.wire_bytes * (rows[i].seconds - rows[i].cost.steps * alpha);
      den += rows[i].cost.wire_bytes * rows[i].cost.wire_bytes;
    }
    inv_beta = den > 0 ? num / den : 0;
    DTRAIN_CHECK(inv_beta > 0, InvalidArgument,
                 "scaling fit: the samples fix no bandwidth (sizes too small or too alike)");
    std::vector<double> per_step;
    for (size_t i = 0; i < third; ++i) {
      per_step.push_back((rows[i].seconds - rows[i].cost.wire_bytes * inv_beta) /
                         rows[i].cost.steps);
    }
    alpha = std::max(0.0, median(per_step));
  }
  return {alpha, 1.0 / inv_beta};
}

double fit_overlap(const std::vector<StepSample>& rows) {
  double num = 0, den = 0;
  for (const StepSample& r : rows) {
    const double w = 1.0 / (r.step_s * r.step_s);
    num += w * r.comm_s * (r.step_s - r.compute_s);
    den += w * r.comm_s * r.comm_s;
  }
  const double exposed = den > 0 ? num / den : 1.0;
  return 1.0 - std::clamp(exposed, 0.0, 1.0);
}

std::vector<int> predict_ranks(int max_ranks) {
  DTRAIN_CHECK(max_ranks >= 1 && max_ranks <= 1024 && (max_ranks & (max_ranks - 1)) == 0,
               InvalidArgument, "--predict {}: expected a power of two from 1 to 1024", max_ranks);
  std::vector<int> out;
  for (int n = 1; n <= max_ranks; n *= 2) out.push_back(n);
  return out;
}

// ---- the fit file ----
namespace {

using nlohmann::json;

nlohmann::json link_json(const Link& l) {
  return {{"alpha_us", l.alpha_s * 1e6}, {"beta_GBps", l.beta_Bps / 1e9}};
}

// j[key] as a number, positive unless `zero_ok`; DataFormatError naming `where.key`.
double number(const json& j, const char* key, const std::string& where, bool zero_ok = false) {
  DTRAIN_CHECK(j.is_object() && j.contains(key) && j[key].is_number(), DataFormatError,
               "fit file: {}.{} is missing or not a number", where, key);
  const double v = j[key].get<double>();
  DTRAIN_CHECK(std::isfinite(v) && (zero_ok ? v >= 0 : v > 0), DataFormatError,
               "fit file: {}.{} = {} must be {}", where, key, v, zero_ok ? ">= 0" : "> 0");
  return v;
}

Link link_from(const json& j, const char* key) {
  DTRAIN_CHECK(j.contains(key), DataFormatError, "fit file: machine.{} is missing", key);
  const std::string where = std::string("machine.") + key;
  return {number(j[key], "alpha_us", where, true) * 1e-6, number(j[key], "beta_GBps", where) * 1e9};
}

Workload workload_from(const json& j, size_t i) {
  const std::string where = "workloads[" + std::to_string(i) + "]";
  DTRAIN_CHECK(j.is_object() && j.contains("name") && j["name"].is_string(), DataFormatError,
               "fit file: {}.name is missing", where);
  Workload w;
  w.name = j["name"].get<std::string>();
  w.compute_s = number(j, "compute_ms", where) * 1e-3;
  w.overlap = number(j, "overlap", where, true);
  DTRAIN_CHECK(w.overlap <= 1, DataFormatError, "fit file: {}.overlap = {} is above 1", where,
               w.overlap);
  DTRAIN_CHECK(
      j.contains("bucket_bytes") && j["bucket_bytes"].is_array() && !j["bucket_bytes"].empty(),
      DataFormatError, "fit file: {}.bucket_bytes is missing or empty", where);
  for (const json& b : j["bucket_bytes"]) {
    DTRAIN_CHECK(b.is_number() && b.get<double>() > 0, DataFormatError,
                 "fit file: {}.bucket_bytes holds {}, expected positive byte counts", where,
                 b.dump());
    w.bucket_bytes.push_back(b.get<double>());
  }
  return w;
}

}  // namespace

nlohmann::json fit_to_json(const Fit& fit) {
  const Machine& m = fit.machine;
  json workloads = json::array();
  for (const Workload& w : fit.workloads) {
    workloads.push_back({{"name", w.name},
                         {"compute_ms", w.compute_s * 1e3},
                         {"overlap", w.overlap},
                         {"bucket_bytes", w.bucket_bytes}});
  }
  return {{"version", 1},
          {"host_cores", fit.host_cores},
          {"machine",
           {{"mem", link_json(m.mem)},
            {"intra", link_json(m.intra)},
            {"inter", link_json(m.inter)},
            {"local_max_bytes", m.local_max_bytes},
            {"small_max_bytes", m.small_max_bytes}}},
          {"workloads", workloads},
          {"measured", fit.measured}};
}

Fit fit_from_json(const json& j) {
  DTRAIN_CHECK(j.is_object() && j.value("version", 0) == 1, DataFormatError,
               "fit file: expected an object with \"version\": 1");
  DTRAIN_CHECK(j.contains("machine") && j["machine"].is_object(), DataFormatError,
               "fit file: machine is missing");
  DTRAIN_CHECK(j.contains("workloads") && j["workloads"].is_array(), DataFormatError,
               "fit file: workloads is missing");
  const json& jm = j["machine"];
  Fit fit;
  fit.machine.mem = link_from(jm, "mem");
  fit.machine.intra = link_from(jm, "intra");
  fit.machine.inter = link_from(jm, "inter");
  fit.machine.local_max_bytes = static_cast<size_t>(number(jm, "local_max_bytes", "machine"));
  fit.machine.small_max_bytes = static_cast<size_t>(number(jm, "small_max_bytes", "machine"));
  fit.host_cores = static_cast<int>(number(j, "host_cores", "fit"));
  for (size_t i = 0; i < j["workloads"].size(); ++i) {
    fit.workloads.push_back(workload_from(j["workloads"][i], i));
  }
  if (j.contains("measured")) fit.measured = j["measured"];
  return fit;
}

const Workload& find_workload(const Fit& fit, const std::string& name) {
  std::string known;
  for (const Workload& w : fit.workloads) {
    if (w.name == name) return w;
    known += (known.empty() ? "" : ", ") + w.name;
  }
  DTRAIN_CHECK(false, InvalidArgument, "--model {}: the fit file has no such workload ({})", name,
               known);
  return fit.workloads.front();
}

}  // namespace dtrain::cli::scaling
