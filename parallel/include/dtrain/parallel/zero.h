// ZeRO: sharded data parallelism with AdamW (Rajbhandari et al., "ZeRO", 2020).
//
// Data parallel over N ranks like DDP (each rank feeds its own slice of the batch and
// the gradient is averaged over the ranks), but what DDP replicates is split:
//
//   stage   params   grads    Adam state   per rank, P parameters in f32
//   DDP     4P       4P       8P
//   1       4P       4P       8P / N       ZeroOptimizer, ZeroOptions::stage = 1
//   2       4P       4P / N   8P / N       ZeroOptimizer, ZeroOptions::stage = 2
//   3       4P / N   4P / N   8P / N       FullyShardedDataParallel
//
//   ZeroOptimizer opt(model->parameters(), decay_matrices_only(model->parameters(), 0.1),
//                     comm, optim::AdamWOptions(3e-4), ZeroOptions{.stage = 2});
//   for (...) {
//     opt.zero_grad();
//     cross_entropy(model->forward(x_local), y_local).backward();   // NOT wrapped in DDP
//     opt.clip_grad_norm(1.0);                                       // optional
//     opt.step();
//   }
//
// The flat layout (FlatLayout): the parameters are packed, in reverse registration
// order (the order backward produces their gradients), into one flat f32 buffer cut
// into buckets; each bucket is zero-padded to a multiple of N, and rank r owns the
// r-th N-th of every bucket. Its shard is the concatenation of those pieces:
// sum_b ceil(bucket_b / N) elements, which is ceil(P / N) for one bucket (stage 1 and
// stage 3 units always use one). Uneven sizes are padded, never replicated.
//
// Stage 1: the parameters become views into the flat buffer (the module keeps its
// tensors; only their storage moves, as with Module::to), and so do their grad()s, so
// backward accumulates straight into the flat gradient. step() reduce-scatters it
// (kAvg) into the rank's gradient shard, runs AdamW on the shard (the rank's exp_avg
// and exp_avg_sq cover only its shard) and all-gathers the updated parameters back
// into the flat buffer (in place).
// Stage 2: the same, but no full flat gradient exists: a post-accumulate-grad hook
// copies each gradient into its bucket's buffer (allocated when the bucket's first
// gradient arrives) and drops grad(); a complete bucket is reduce-scattered at once,
// from inside backward, in bucket order, and its buffer is freed once that
// reduce-scatter is done (at most two buckets are alive at a time).
// Stage 3: see FullyShardedDataParallel.
//
// The arithmetic equals DDP + optim::AdamW on the full model (fn::AdamUpdate, the same
// bias corrections) -- per-parameter weight decay included -- up to the float
// summation order of the reductions. Differences from optim::AdamW: there is one step
// count for all parameters, and a parameter that got no gradient this step is updated
// with a zero gradient (AdamW would skip it); every rank steps every step.
//
// Checkpoints: gather_full_state() (collective) returns the optimizer state exactly as
// optim::AdamW::state_dict() of the unsharded model names it ("lr", "num_params",
// "state.<i>.exp_avg", "state.<i>.exp_avg_sq", "state.<i>.step", i indexing the
// parameter list), so it can be saved once and loaded at another dp size (or into a
// plain AdamW) with load_full_state().
//
// Requirements: f32 parameters on the CPU (the Adam loop runs on the host; CUDA
// shards are not done yet and are refused with UnsupportedError), contiguous, each
// passed once. Every rank constructs with the same model and options; construction
// broadcasts rank 0's parameters. Collectives are issued from the training thread,
// in the same order on every rank. Errors of the communicator (CommError,
// TimeoutError) surface from step()/clip_grad_norm()/zero_grad() of the step.
// Gradient accumulation over several backward passes (micro-batches): stage 1 adds
// into the flat gradient; stage 2 reduce-scatters each backward's buckets and adds
// them into the shard (each backward must deliver every gradient once; a second
// gradient for a parameter within one backward is an InvalidArgument at step()).
// Thread-safety: one thread at a time. Not here: mixed dtypes, parameter groups other
// than the weight decay.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/optim/optimizer.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::parallel {

// nanoGPT's grouping: weight_decay for parameters with dim() >= 2 (matrices), 0 for
// the others (biases, LayerNorm weights). Note nanoGPT does decay its embedding
// matrices; pass your own vector to exempt them.
std::vector<double> decay_matrices_only(const std::vector<Tensor>& params, double weight_decay);

// Where each parameter sits in the padded flat buffer, and how it is cut into buckets.
struct FlatLayout {
  int world = 1;
  std::vector<Shape> shapes;     // per parameter, in the order given
  std::vector<int64_t> offsets;  // per parameter: first element in the flat buffer
  std::vector<int64_t> bucket_begin;
  std::vector<int64_t> bucket_numel;  // each a multiple of world
  int64_t total = 0;                  // flat buffer length (padding included)
  int64_t shard_numel() const { return total / world; }
  int64_t chunk(size_t b) const { return bucket_numel[b] / world; }  // one rank's share
};

// Packs shapes in reverse order; a bucket closes once it holds bucket_numel elements
// (a parameter never straddles buckets). Throws InvalidArgument for world < 1 or
// bucket_numel < 1.
FlatLayout make_flat_layout(const std::vector<Shape>& shapes, int world, int64_t bucket_numel);

// Bytes a rank holds between steps (tensor storage that lives across steps).
struct ShardMemory {
  size_t param_bytes = 0;
  size_t grad_bytes = 0;
  size_t optimizer_state_bytes = 0;  // exp_avg + exp_avg_sq
};

// The sharded AdamW shared by the stages: shard-local update, clipping, full state.
class ShardedAdamW {
 public:
  virtual ~ShardedAdamW() = default;
  ShardedAdamW(const ShardedAdamW&) = delete;
  ShardedAdamW& operator=(const ShardedAdamW&) = delete;

  // Zeroes the gradient (its shard, and the flat buffer at stage 1).
  virtual void zero_grad() = 0;
  // Finishes the gradient reduction (idempotent within a step), then clips the
  // gradient shards by global norm over the dp group (clip.h). Returns the norm.
  double clip_grad_norm(double max_norm);
  // The same inside a larger split (tensor/pipeline parallelism): the squares of the
  // shard are summed over dp, then over each of `more_groups`; counted holds one flag
  // per parameter (state-dict order; empty: all) and an unflagged parameter (one
  // replicated across a tp group, counted by one of its ranks) is scaled, not summed.
  double clip_grad_norm(double max_norm, const std::vector<comm::Communicator*>& more_groups,
                        const std::vector<bool>& counted);
  // Finishes the reduction and appends this rank's gradient shard, one piece per
  // parameter overlapping it, with that parameter's flag from `counted` (one per
  // parameter; empty: all true): what a norm over several sharded optimizers sums.
  void owned_gradients(const std::vector<bool>& counted, std::vector<Tensor>* pieces,
                       std::vector<bool>* flags);
  // Finishes the reduction, updates this rank's shard, re-assembles parameters.
  void step();

  double lr() const { return lr_; }
  void set_lr(double lr);
  int64_t steps() const { return step_; }
  ShardMemory memory() const;
  // One per unit (stage 1 and 2: one).
  std::vector<FlatLayout> layouts() const;

  // Collective. See the file comment for the format.
  optim::StateDict gather_full_state() const;
  // Not collective: every rank loads the same full dict and keeps its shard. Throws
  // DataFormatError (naming the key) for a dict that does not fit, changing nothing.
  void load_full_state(const optim::StateDict& dict);

 protected:
  // One flat parameter space (the model at stage 1/2, one unit at stage 3).
  struct Flat {
    FlatLayout layout;
    Tensor param;  // full [total] (stage 1/2) or this rank's shard (stage 3)
    Tensor grad;   // this rank's gradient shard [shard_numel]
    Tensor exp_avg, exp_avg_sq;
    std::vector<double> weight_decay;  // per parameter
    size_t first_index = 0;            // of its first parameter in the state dict
  };
  ShardedAdamW(comm::Communicator& comm, const optim::AdamWOptions& options);
  // Allocates the shard buffers of `flat` (its layout and param set).
  void init_shard(Flat& flat) const;
  virtual void reduce_gradients() = 0;  // idempotent within a step
  virtual void after_update() = 0;
  // Start of bucket b's piece inside this rank's shard.
  static int64_t shard_offset(const FlatLayout& l, size_t b);

  comm::Communicator& comm_;
  std::vector<Flat> flats_;
  Tensor full_grad_;  // stage 1 only: the full flat gradient the grad()s view
  size_t num_params_ = 0;
  bool param_is_full_ = true;
  bool reduced_ = false;  // reduce_gradients done for this step

 private:
  void update(Flat& flat, double bias_c1, double bias_c2) const;
  double lr_, beta1_, beta2_, eps_;
  int64_t step_ = 0;
};

struct ZeroOptions {
  int stage = 1;  // 1 or 2
  // Stage 2: about how many bytes of gradient a bucket collects before its
  // reduce-scatter starts. Stage 1 uses one bucket (the shard is exactly ceil(P / N)).
  size_t bucket_bytes = size_t{25} << 20;
};

// ZeRO stages 1 and 2 (see the file comment).
class ZeroOptimizer final : public ShardedAdamW {
 public:
  // weight_decay: one value per parameter (decay_matrices_only for nanoGPT's groups);
  // options.weight_decay() is ignored. REQUIRES: comm outlives this object.
  // Collective. Throws InvalidArgument for a bad stage, a weight_decay list of the
  // wrong length, a repeated or non-contiguous parameter; DTypeError for a non-f32
  // parameter; UnsupportedError for a parameter not on the CPU.
  ZeroOptimizer(std::vector<Tensor> params, std::vector<double> weight_decay,
                comm::Communicator& comm, const optim::AdamWOptions& options,
                ZeroOptions zero = {});
  ~ZeroOptimizer() override;
  void zero_grad() override;
  int stage() const { return stage_; }
  const std::vector<Tensor>& parameters() const { return params_; }

 private:
  struct Buckets;  // stage 2 state touched by the hooks
  void reduce_gradients() override;
  void after_update() override;

  int stage_;
  std::vector<Tensor> params_;
  std::vector<Tensor> grad_views_;    // stage 1: each parameter's slice of full_grad_
  std::shared_ptr<Buckets> buckets_;  // stage 2; the hooks hold weak_ptrs
};

// ZeRO-3 / FSDP over a model that is a chain of units (y = unit_k(...unit_0(x))), each
// unit a sub-module (a transformer block, an embedding, a head). Each unit's
// parameters are flattened (one bucket) and only this rank's shard is kept; the
// unit's own parameter tensors are emptied (shape [0]) except while the unit runs.
//
// Choice for freeing memory (recompute, i.e. activation checkpointing per unit): the
// forward of a unit is one autograd function. Its forward all-gathers the unit's full
// parameters, runs the unit under NoGradGuard (no graph is kept, so the full
// parameters and the unit's inner activations are released at once) and saves only
// the unit's input. Its backward all-gathers again, re-runs the unit's forward under
// autograd, back-propagates through it, packs the unit's parameter gradients into a
// flat buffer, reduce-scatters it (kAvg) into the shard's gradient, and releases the
// full parameters. Cost: one extra forward per unit and two all-gathers per step;
// per-rank memory: the shards plus one unit's full parameters and activations.
// REQUIRES: units are deterministic (no dropout: the re-run must see the same
// masks) and take one tensor. The parameters of different units are distinct.
class FullyShardedDataParallel final : public ShardedAdamW {
 public:
  // weight_decay: one value per parameter of units[0], then units[1], ... (each
  // unit's parameters() order). Collective (broadcasts rank 0's parameters).
  // Throws as ZeroOptimizer's constructor does.
  FullyShardedDataParallel(std::vector<std::shared_ptr<nn::Module>> units,
                           std::vector<double> weight_decay, comm::Communicator& comm,
                           const optim::AdamWOptions& options);
  Tensor forward(const Tensor& x);
  Tensor operator()(const Tensor& x) { return forward(x); }
  // Unit u alone (forward() is every unit in turn), for a caller that runs other
  // layers between units.
  Tensor forward_unit(size_t u, const Tensor& x) { return unit_forward(u, x); }
  size_t num_units() const { return units_.size(); }
  void zero_grad() override;
  // Collective: every unit's full parameters, for a checkpoint or an evaluation copy
  // (same order as the weight_decay list).
  std::vector<Tensor> gather_full_parameters() const;
  // The inverse: every unit's full parameters (gather_full_parameters' order and
  // shapes; ShapeError naming the index otherwise); this rank keeps its shard.
  void load_full_parameters(const std::vector<Tensor>& full);

 private:
  struct Unit {
    std::shared_ptr<nn::Module> module;
    std::vector<Tensor> params;
    Tensor shard;  // leaf [shard_numel] that requires grad; its grad() is Flat::grad
  };
  void reduce_gradients() override {}
  void after_update() override {}
  Tensor gather(size_t u) const;  // the full flat parameters; params point into it
  void release(size_t u) const;   // params emptied again
  Tensor unit_forward(size_t u, const Tensor& x);

  std::vector<Unit> units_;
  Tensor empty_;  // the storage of released parameters
};

}  // namespace dtrain::parallel
