// The scaling model: an alpha-beta model of each all-reduce algorithm, plus the
// measured compute time per step, predicting data-parallel step time, weak-scaling
// efficiency and busbw for up to 1,024 ranks (docs/scaling.md).
//
// Each link class is (alpha, beta): seconds per synchronised step and bytes per second
// one rank moves; the memory-bound classes (mem, intra) add a cache knee (Link). One
// all-reduce of S bytes over n ranks costs steps(n) x alpha + wire(n, S) / beta:
//   local  (one host, tcp backend's slots): 2 waits, a copy-in and n-1 peer reads: n S
//   direct (one host, process_vm_readv reads of the peers): 3 barriers, (2n-1)/n S
//   rd     recursive doubling: log2(p) rounds of the whole message (p the largest power
//          of two <= n; n != p adds a fold-in and a hand-back round)
//   ring   2(n-1) steps, 2(n-1)/n S (every edge at once: the slowest link sets the pace)
//   hierarchical  local reduce-scatter + cross-host all-reduce of S/K over H hosts
//          (K rings share the node's NICs) + local all-gather, intra- and inter-node
//          links separately (comm/hierarchical.h)
// `auto` is comm::algorithm_for with AlgoCapabilities describing the predicted machine.
// The data-parallel step is compute + (1 - overlap) x the buckets' all-reduce time.
//
// Fitting: per link class, least absolute relative error over the measured
// (algorithm, ranks, bytes, time) rows, the knee of mem and intra by search over the
// measured sizes; the overlap fraction by least squares from the weak-scaling rows.
//
// Deliberately not here: files, processes, printing (cmd_bench_scaling_model.cc);
// contention between jobs, congestion, tree and NVLS algorithms, GPU compute.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dtrain/comm/algorithm.h"

namespace dtrain::cli::scaling {

// A cache knee (memory-bound classes: mem, intra): while the host's working set is at
// most knee_bytes it moves at beta_Bps; of a larger working set W the first knee_bytes
// still do and the rest, W - knee, at beta_mem_Bps. The time is continuous in W:
//   wire x (f / beta + (1 - f) / beta_mem), f = min(1, knee / W).
// knee_bytes 0: one bandwidth at every size (the network class).
struct Link {
  double alpha_s = 0;       // seconds per step
  double beta_Bps = 0;      // bytes per second (in cache, or everywhere without a knee)
  double knee_bytes = 0;    // working set where the cache runs out; 0: no knee
  double beta_mem_Bps = 0;  // beyond the knee (used only when knee_bytes > 0)
  // Seconds per step per rank beyond the measuring machine's cores (its ranks wait for
  // a core at every step): a fact of that machine, added to alpha for the rows it
  // measured (cmd_bench_scaling_model.cc), never to a prediction.
  double alpha_oversub_s = 0;
  // A rate-shaped link (tbf's token bucket): its bucket refills during a step's
  // latency, so back-to-back operations cost max(steps x alpha, wire / beta) a call,
  // not the sum: small messages leave at the veth's speed, a stream at the rate.
  bool shaped = false;
};

// The machine a prediction is for. Ranks fill a node before the next (as launchers do).
struct Machine {
  Link mem;    // one-host slot algorithm (tcp backend): a wait, memory copy bandwidth
  Link intra;  // point-to-point inside a node (shared-memory rings, NVLink)
  Link inter;  // between nodes, per NIC (veth + tbf, InfiniBand)
  int ranks_per_node = 1;
  int nics_per_node = 1;
  bool slots = true;    // the slot algorithm exists (tcp backend); false for GPUs
  bool direct = false;  // the single-copy algorithm exists (tcp backend, process_vm_readv)
  // Thresholds (comm::AlgoOptions defaults).
  size_t local_max_bytes = comm::AlgoOptions{}.local_max_bytes;
  size_t small_max_bytes = comm::AlgoOptions{}.small_max_bytes;
  size_t direct_min_bytes = comm::AlgoOptions{}.direct_min_bytes;
  size_t allreduce_direct_min_bytes = comm::AlgoOptions{}.allreduce_direct_min_bytes;
  size_t allreduce_direct_max_bytes = comm::AlgoOptions{}.allreduce_direct_max_bytes;
};

// One term of the model: an algorithm over one link class.
enum class LinkClass { kMem, kIntra, kInter };
const char* link_class_name(LinkClass c);
const Link& link_of(const Machine& m, LinkClass c);

// Steps and bytes on the wire of one all-reduce of `bytes` over n ranks; n >= 1.
// working_bytes: what the ranks of one host touch (n x bytes for the one-host forms),
// which decides a knee's cache or memory bandwidth.
struct Cost {
  double steps = 0;
  double wire_bytes = 0;
  double working_bytes = 0;
  double seconds(const Link& l) const;
};
Cost ring_cost(int n, double bytes);
Cost rd_cost(int n, double bytes);
Cost local_cost(int n, double bytes);
// direct (one host, each rank reads its peers' buffers): 3 barriers; the reduce-scatter
// reads (n-1)/n S of the peers' data plus its own block, the all-gather (n-1)/n S.
Cost direct_cost(int n, double bytes);
// The ring's reduce-scatter (or all-gather) half: n-1 steps, (n-1)/n x bytes.
Cost ring_half_cost(int n, double bytes);

struct Prediction {
  comm::Algo algo = comm::Algo::kRing;
  double seconds = 0;
};

// What comm::algorithm_for sees on `m` for a communicator of `ranks` (the tcp
// backend's capabilities: slots and direct when every rank shares one node).
comm::AlgoOptions algo_options(const Machine& m);
comm::AlgoCapabilities algo_capabilities(const Machine& m, int ranks);
// The algorithm `auto` picks for an all-reduce of `bytes` over `ranks` on `m`:
// comm::algorithm_for itself (flat: hierarchical is chosen per job, never by auto).
comm::Algo auto_algo(const Machine& m, int ranks, size_t bytes);
// The all-reduce time with `algo` (kAuto: auto_algo; kHierarchical: the two levels).
// InvalidArgument for ranks < 1, or ranks spanning nodes unevenly.
Prediction allreduce_time(const Machine& m, int ranks, size_t bytes, comm::Algo algo);

// busbw as nccl-tests defines it for all-reduce: bytes / t x 2(n-1)/n (0 for n = 1).
double busbw_Bps(int ranks, double bytes, double seconds);

// A data-parallel model: the measured compute per step and its gradient buckets.
struct Workload {
  std::string name;
  double compute_s = 0;              // one step on one rank without communication
  std::vector<double> bucket_bytes;  // DDP's buckets, in launch order
  double overlap = 0;                // fraction of the all-reduce hidden by backward
};
// Buckets as DDP cuts `grad_bytes`: a first bucket of first_bytes, then bucket_bytes.
std::vector<double> ddp_buckets(double grad_bytes, double first_bytes = 1 << 20,
                                double bucket_bytes = 25 << 20);

struct StepPrediction {
  int ranks = 1;
  comm::Algo algo = comm::Algo::kRing;  // of the largest bucket
  double comm_s = 0;                    // every bucket's all-reduce, back to back
  double exposed_s = 0;                 // (1 - overlap) x comm_s
  double step_s = 0;                    // compute + exposed
  double efficiency = 1;                // t(1) / t(n), weak scaling
};
StepPrediction predict_step(const Machine& m, const Workload& w, int ranks, comm::Algo algo);

// ---- fitting ----

// One measured all-reduce (or the term it was fitted as).
struct Sample {
  LinkClass link = LinkClass::kInter;
  Cost cost;
  double seconds = 0;
  double oversub_ranks = 0;  // ranks beyond the measuring machine's cores (alpha_oversub_s)
};
// Cost::seconds = seconds in relative error: least absolute relative deviation (the
// error --validate counts; robust to a stray row), by iteratively reweighted least
// squares over (alpha, 1/beta, 1/beta_mem, alpha_oversub) >= 0. With `knee`, every working-set size
// of the samples is tried as the knee and the best kept; without, one bandwidth.
// InvalidArgument for fewer than 3 samples or samples that fix no bandwidth.
// `shaped`: the max form of Link::shaped, fitted by assigning each row to its binding
// term and refitting until the assignment holds.
Link fit_link(const std::vector<Sample>& samples, bool knee = false, bool shaped = false);
// The mean absolute relative error of `l` over `samples` (what fit_link minimises).
double relative_error(const Link& l, const std::vector<Sample>& samples);
// The overlap in [0, 1] that best fits step = compute x slowdown + (1 - overlap) x comm:
// each row is (measured step, compute x slowdown, comm).
struct StepSample {
  double step_s = 0, compute_s = 0, comm_s = 0;
};
double fit_overlap(const std::vector<StepSample>& rows);

// ---- the fit file (bench/scaling_fit.json) ----

// The fitted machine, the workloads and the measured rows they came from. Throws
// DataFormatError naming the missing or malformed field.
struct Fit {
  Machine machine;
  std::vector<Workload> workloads;
  int host_cores = 1;  // cores of the machine that measured the rows
  nlohmann::json measured = nlohmann::json::object();  // raw rows, for --validate
};
nlohmann::json fit_to_json(const Fit& fit);
Fit fit_from_json(const nlohmann::json& j);
const Workload& find_workload(const Fit& fit, const std::string& name);

// Ranks to print: 1, 2, 4, ..., max_ranks. InvalidArgument unless max_ranks is a
// power of two in [1, 1024].
std::vector<int> predict_ranks(int max_ranks);

}  // namespace dtrain::cli::scaling
