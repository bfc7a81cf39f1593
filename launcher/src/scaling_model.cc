// The scaling model's formulas, fits and fit-file schema (scaling_model.h).
#include "scaling_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>

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

const Link& link_of(const Machine& m, LinkClass c) {
  return c == LinkClass::kMem ? m.mem : c == LinkClass::kIntra ? m.intra : m.inter;
}

namespace {

int floor_log2(int n) {
  int r = 0;
  while ((2 << r) <= n) ++r;
  return r;
}

// Seconds per byte of `l` for a working set of `working` bytes (Link's knee).
double inv_beta(const Link& l, double working) {
  if (l.knee_bytes <= 0 || working <= l.knee_bytes) return 1.0 / l.beta_Bps;
  const double f = l.knee_bytes / working;
  return f / l.beta_Bps + (1.0 - f) / l.beta_mem_Bps;
}

// The slower of two links at one working set, step by step (a ring step waits for its
// slowest edge).
Link slowest(const Link& a, const Link& b, double working) {
  return {std::max(a.alpha_s, b.alpha_s),
          1.0 / std::max(inv_beta(a, working), inv_beta(b, working)),
          0,
          0,
          0,
          a.shaped || b.shaped};
}

}  // namespace

double Cost::seconds(const Link& l) const {
  const double latency = steps * l.alpha_s;
  const double transfer = wire_bytes > 0 ? wire_bytes * inv_beta(l, working_bytes) : 0.0;
  return l.shaped ? std::max(latency, transfer) : latency + transfer;
}

Cost ring_cost(int n, double bytes) {
  if (n <= 1) return {};
  return {2.0 * (n - 1), 2.0 * (n - 1) / n * bytes, n * bytes};
}

Cost ring_half_cost(int n, double bytes) {
  if (n <= 1) return {};
  return {static_cast<double>(n - 1), static_cast<double>(n - 1) / n * bytes, n * bytes};
}

Cost rd_cost(int n, double bytes) {
  if (n <= 1) return {};
  const int p = 1 << floor_log2(n);
  const double rounds = floor_log2(n) + (n != p ? 2 : 0);
  return {rounds, rounds * bytes, n * bytes};
}

Cost local_cost(int n, double bytes) {
  if (n <= 1) return {};
  return {2.0, n * bytes, n * bytes};  // two waits; the copy-in and the n-1 peers' reads
}

Cost direct_cost(int n, double bytes) {
  if (n <= 1) return {};
  // Two waits (header, final barrier). Reduce: (n-1)/n S of the peers' blocks + its
  // own S/n; push: (n-1)/n S into the peers' buffers.
  return {2.0, bytes + static_cast<double>(n - 1) / n * bytes, n * bytes};
}

comm::AlgoOptions algo_options(const Machine& m) {
  comm::AlgoOptions o;
  o.local_max_bytes = m.local_max_bytes;
  o.small_max_bytes = m.small_max_bytes;
  o.direct_min_bytes = m.direct_min_bytes;
  o.allreduce_direct_min_bytes = m.allreduce_direct_min_bytes;
  o.allreduce_direct_max_bytes = m.allreduce_direct_max_bytes;
  return o;
}

comm::AlgoCapabilities algo_capabilities(const Machine& m, int ranks) {
  const bool one_node = ranks <= m.ranks_per_node;
  comm::AlgoCapabilities c;
  c.local = m.slots && one_node && m.local_max_bytes > 0;
  c.local_capacity = c.local ? m.local_max_bytes : 0;
  c.direct = m.direct && one_node;
  return c;
}

comm::Algo auto_algo(const Machine& m, int ranks, size_t bytes) {
  return comm::algorithm_for(algo_options(m), comm::Collective::kAllreduce, bytes,
                             algo_capabilities(m, ranks));
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
  const double fold = all.steps - rounds, working = per_node * bytes;
  const Link fold_link = per_node >= 2 ? m.intra : m.inter;
  return Cost{double(inside), inside * bytes, working}.seconds(m.intra) +
         Cost{double(rounds - inside), (rounds - inside) * bytes, working}.seconds(m.inter) +
         Cost{fold, fold * bytes, working}.seconds(fold_link);
}

// One of hierarchical's local stages: reduce-scatter of `bytes` (or all-gather to
// `bytes`) over K ranks; `placed` is the buffer one rank places (what algorithm_for
// sees). The slot forms copy in what a rank places and read the peers' blocks; the
// direct forms read the peers' blocks (and, reducing, its own).
double local_stage(const Machine& m, int k, double bytes, double placed, comm::Collective c) {
  if (k <= 1) return 0;
  const double theirs = (k - 1) * bytes / k;
  switch (comm::algorithm_for(algo_options(m), c, static_cast<size_t>(placed),
                              algo_capabilities(m, k))) {
    case comm::Algo::kLocal:
      return Cost{2.0, placed + theirs, k * bytes}.seconds(m.mem);
    case comm::Algo::kDirect:
      return Cost{2.0, c == comm::Collective::kReduceScatter ? bytes : theirs, k * bytes}.seconds(
          m.mem);
    default:
      return ring_half_cost(k, bytes).seconds(m.intra);
  }
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
  return local_stage(m, per_node, bytes, bytes, comm::Collective::kReduceScatter) + cross +
         local_stage(m, per_node, bytes, shard, comm::Collective::kAllgather);
}

double ring_seconds(const Machine& m, int ranks, int per_node, double bytes) {
  Cost c = ring_cost(ranks, bytes);
  if (ranks == per_node) return c.seconds(m.intra);
  c.working_bytes = per_node * bytes;
  return c.seconds(slowest(m.intra, m.inter, c.working_bytes));
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
    case comm::Algo::kDirect:
      DTRAIN_CHECK(nodes == 1, InvalidArgument,
                   "scaling model: the direct algorithm needs every rank on one host");
      return {algo, direct_cost(ranks, s).seconds(m.mem)};
    case comm::Algo::kRecursiveDoubling:
      return {algo, rd_seconds(m, ranks, k, s)};
    case comm::Algo::kRing:
      return {algo, ring_seconds(m, ranks, k, s)};
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

constexpr int kVars = 4;
using Vec = std::array<double, kVars>;  // (alpha, 1/beta, 1/beta_mem, alpha_oversub)

// One sample's coefficients of Vec under a knee.
Vec features(const Sample& s, double knee) {
  const double f = knee > 0 && s.cost.working_bytes > knee ? knee / s.cost.working_bytes : 1.0;
  return {s.cost.steps, s.cost.wire_bytes * f, s.cost.wire_bytes * (1.0 - f),
          s.cost.steps * s.oversub_ranks};
}

double dot(const Vec& x, const Vec& a) {
  double sum = 0;
  for (int j = 0; j < kVars; ++j) sum += x[j] * a[j];
  return sum;
}

// Weighted least squares of x . a_i = t_i over the variables in `mask` (bits 0-3; the
// others 0), by Gaussian elimination on the normal equations; nullopt when singular.
std::optional<Vec> solve(const std::vector<Vec>& a, const std::vector<double>& t,
                         const std::vector<double>& w, unsigned mask) {
  std::vector<int> vars;
  for (int j = 0; j < kVars; ++j) {
    if (mask & (1u << j)) vars.push_back(j);
  }
  const size_t k = vars.size();
  std::vector<std::vector<double>> m(k, std::vector<double>(k + 1, 0.0));
  for (size_t i = 0; i < a.size(); ++i) {
    for (size_t r = 0; r < k; ++r) {
      for (size_t c = 0; c < k; ++c) m[r][c] += w[i] * a[i][vars[r]] * a[i][vars[c]];
      m[r][k] += w[i] * a[i][vars[r]] * t[i];
    }
  }
  for (size_t p = 0; p < k; ++p) {
    size_t best = p;
    for (size_t r = p + 1; r < k; ++r) best = std::abs(m[r][p]) > std::abs(m[best][p]) ? r : best;
    std::swap(m[p], m[best]);
    if (std::abs(m[p][p]) < 1e-300) return std::nullopt;
    for (size_t r = 0; r < k; ++r) {
      if (r == p) continue;
      const double f = m[r][p] / m[p][p];
      for (size_t c = p; c <= k; ++c) m[r][c] -= f * m[p][c];
    }
  }
  Vec x{0, 0, 0, 0};
  for (size_t r = 0; r < k; ++r) x[vars[r]] = m[r][k] / m[r][r];
  return x;
}

// The non-negative solution of least weighted squares: every variable subset that
// holds 1/beta (and 1/beta_mem exactly when `knee`, no faster than 1/beta), the
// feasible one with the least residual.
std::optional<Vec> solve_nonnegative(const std::vector<Vec>& a, const std::vector<double>& t,
                                     const std::vector<double>& w, bool knee) {
  std::optional<Vec> best;
  double best_sse = 0;
  for (unsigned mask = 0; mask < (1u << kVars); ++mask) {
    if (!(mask & 2u) || static_cast<bool>(mask & 4u) != knee) continue;
    auto x = solve(a, t, w, mask);
    // Memory beyond the cache is not faster than the cache: 1/beta_mem >= 1/beta.
    if (!x || (*x)[1] <= 0 || (knee && (*x)[2] < (*x)[1]) || (*x)[0] < 0 || (*x)[3] < 0) continue;
    double sse = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      const double r = dot(*x, a[i]) - t[i];
      sse += w[i] * r * r;
    }
    if (!best || sse < best_sse) best = x, best_sse = sse;
  }
  return best;
}

// Least absolute relative deviation at one knee (0: none): reweighted least squares,
// weights 1 / (t^2 max(|relative residual|, 0.1%)).
std::optional<Link> fit_at_knee(const std::vector<Sample>& samples, double knee) {
  std::vector<Vec> a;
  std::vector<double> t, w;
  for (const Sample& s : samples) {
    a.push_back(features(s, knee));
    t.push_back(s.seconds);
    w.push_back(1.0 / (s.seconds * s.seconds));
  }
  std::optional<Vec> x;
  for (int round = 0; round < 12; ++round) {
    auto next = solve_nonnegative(a, t, w, knee > 0);
    if (!next) break;
    x = next;
    for (size_t i = 0; i < a.size(); ++i) {
      const double r = (dot(*x, a[i]) - t[i]) / t[i];
      w[i] = 1.0 / (t[i] * t[i] * std::max(std::abs(r), 1e-3));
    }
  }
  if (!x) return std::nullopt;
  return Link{(*x)[0], 1.0 / (*x)[1], knee, knee > 0 ? 1.0 / (*x)[2] : 0.0, (*x)[3]};
}

}  // namespace

namespace {

// The model's time of one sample: alpha plus the sample's ranks beyond the cores.
double sample_seconds(const Link& l, const Sample& s) {
  Link at = l;
  at.alpha_s += s.oversub_ranks * l.alpha_oversub_s;
  return s.cost.seconds(at);
}

// Link::shaped: from the additive fit, each row keeps only its binding term (latency
// or transfer) and the linear fit is redone, until the assignment settles.
std::optional<Link> fit_shaped(const std::vector<Sample>& samples) {
  std::optional<Link> l = fit_at_knee(samples, 0);
  for (int round = 0; round < 10 && l; ++round) {
    std::vector<Sample> binding = samples;
    for (Sample& s : binding) {
      Link latency_only = *l;
      latency_only.beta_Bps = std::numeric_limits<double>::infinity();
      if (sample_seconds(latency_only, s) >= s.cost.wire_bytes / l->beta_Bps) {
        s.cost.wire_bytes = 0;
      } else {
        s.cost.steps = 0;
      }
    }
    auto next = fit_at_knee(binding, 0);
    if (!next) break;
    l = next;
  }
  if (l) l->shaped = true;
  return l;
}

}  // namespace

double relative_error(const Link& l, const std::vector<Sample>& samples) {
  double sum = 0;
  for (const Sample& s : samples) sum += std::abs(sample_seconds(l, s) - s.seconds) / s.seconds;
  return samples.empty() ? 0 : sum / static_cast<double>(samples.size());
}

Link fit_link(const std::vector<Sample>& samples, bool knee, bool shaped) {
  if (shaped) {
    DTRAIN_CHECK(samples.size() >= 3, InvalidArgument,
                 "scaling fit: {} sample(s); alpha and beta need at least 3", samples.size());
    auto l = fit_shaped(samples);
    DTRAIN_CHECK(l.has_value(), InvalidArgument, "scaling fit: the samples fix no bandwidth");
    return *l;
  }
  DTRAIN_CHECK(samples.size() >= 3, InvalidArgument,
               "scaling fit: {} sample(s); alpha and beta need at least 3", samples.size());
  std::vector<double> knees{0};
  if (knee) {
    for (const Sample& s : samples) knees.push_back(s.cost.working_bytes);
    std::sort(knees.begin(), knees.end());
    knees.erase(std::unique(knees.begin(), knees.end()), knees.end());
    knees.pop_back();  // a knee above every sample is no knee (0)
  }
  std::optional<Link> best;
  for (double k : knees) {
    auto l = fit_at_knee(samples, k);
    if (l && (!best || relative_error(*l, samples) < relative_error(*best, samples))) best = l;
  }
  DTRAIN_CHECK(best.has_value(), InvalidArgument,
               "scaling fit: the samples fix no bandwidth (sizes too small or too alike)");
  return *best;
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
  nlohmann::json j = {{"alpha_us", l.alpha_s * 1e6}, {"beta_GBps", l.beta_Bps / 1e9}};
  if (l.knee_bytes > 0) j["knee_bytes"] = l.knee_bytes, j["beta_mem_GBps"] = l.beta_mem_Bps / 1e9;
  if (l.alpha_oversub_s > 0) j["alpha_oversub_us"] = l.alpha_oversub_s * 1e6;
  if (l.shaped) j["shaped"] = true;
  return j;
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
  Link l{number(j[key], "alpha_us", where, true) * 1e-6, number(j[key], "beta_GBps", where) * 1e9,
         0, 0, 0};
  if (j[key].contains("knee_bytes")) {
    l.knee_bytes = number(j[key], "knee_bytes", where);
    l.beta_mem_Bps = number(j[key], "beta_mem_GBps", where) * 1e9;
  }
  DTRAIN_CHECK(!j[key].contains("shaped") || j[key]["shaped"].is_boolean(), DataFormatError,
               "fit file: {}.shaped must be true or false", where);
  l.shaped = j[key].value("shaped", false);
  if (j[key].contains("alpha_oversub_us")) {
    l.alpha_oversub_s = number(j[key], "alpha_oversub_us", where, true) * 1e-6;
  }
  return l;
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
            {"direct", m.direct},
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
  DTRAIN_CHECK(!jm.contains("direct") || jm["direct"].is_boolean(), DataFormatError,
               "fit file: machine.direct must be true or false");
  fit.machine.direct = jm.value("direct", false);
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
