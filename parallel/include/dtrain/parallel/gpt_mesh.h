// GptOnMesh: one nn::Gpt trained on a dp x pp x tp ProcessMesh -- the composition of
// the splits, each of which lives in its own file:
//
//   tensor parallel  tensor_parallel.h  the Gpt's GptParallel over mesh.tp()
//   pipeline         pipeline.h         this rank's GptStage (layers [embedding,
//                                       block 0..n-1, head] cut by parameter count, or
//                                       options.stage_starts), run_pipeline_step over
//                                       mesh.pp() with m micro-batches
//   data parallel    ddp.h / zero.h     gradients averaged over mesh.dp(): DDP's
//                                       bucketed all-reduce (pp = 1), one coalesced
//                                       all-reduce (pp > 1), ZeRO-1/2, or ZeRO-3
//                                       (blocks as FSDP units, the embedding, its
//                                       tied copy and ln_f whole with ZeRO-1 state)
//
// A step is forward_backward (zeroes the gradients first), sync_gradients, then
// optimizer_step; train_step does all three. In sync_gradients, when pp > 1, the
// gradient of the tied token embedding is summed over mesh.embedding() (the first
// stage's embedding and the last stage's head hold one logical tensor, two copies).
// Gradient clipping (options.clip) takes the global norm over the whole model: a
// tensor sliced over tp counts on every tp rank, one replicated over tp on tp rank 0
// only, the last stage's copy of the embedding not at all; the squares are summed
// over tp and pp (and over dp under ZeRO, whose shards are disjoint).
// Under ZeRO-3 the blocks' parameter tensors are empty between uses (their storage
// is the dp shard); parameter_state() gathers them.
//
// Every mesh computes the 1-process step up to float summation order
// (tests/test_gpt_mesh.cc).
// Not here: sequence parallelism, interleaved stages. Thread-safety: one training thread.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/parallel/mesh.h"
#include "dtrain/parallel/pipeline.h"

namespace dtrain::parallel {

class DistributedDataParallel;
class FullyShardedDataParallel;
class ShardedAdamW;
class ZeroOptimizer;

struct GptMeshOptions {
  double lr = 3e-3;
  double beta1 = 0.9, beta2 = 0.95;
  double weight_decay = 0.1;  // matrices and embeddings; biases and norms 0
  int zero = 0;               // 0 (replicated optimizer), 1, 2 or 3
  double clip = 0;            // > 0: clip by global norm
  int microbatches = 1;       // pp > 1: micro-batches per step (divides the local batch)
  ScheduleKind schedule = ScheduleKind::k1F1B;
  bool bf16 = false;          // autocast: the linears' GEMMs in bf16 (amp.h)
  std::vector<int64_t> stage_starts = {};  // first layer of each stage; empty: balanced
};

// Parameters of each pipeline layer [embedding, block 0..n-1, head]; the head counts
// its copy of the tied embedding (its matmul is as costly as the embedding's rows).
std::vector<int64_t> gpt_layer_params(const nn::GptConfig& config);
// The layers of stage `stage` of `stages` given each stage's first layer.
nn::GptStage gpt_stage(const nn::GptConfig& config, const std::vector<int64_t>& starts,
                       int stage);
// Parses "0,3" (first layer of each stage) and checks it against the model:
// InvalidArgument naming the spec unless it has `stages` increasing entries from 0 and
// every stage holds at least one of the n_layer + 2 layers.
std::vector<int64_t> parse_stage_starts(const std::string& spec, const nn::GptConfig& config,
                                        int stages);

class GptOnMesh {
 public:
  // Collective over the mesh. InvalidArgument when tp does not divide the model or
  // pp exceeds its layers (both one line with the numbers).
  GptOnMesh(ProcessMesh& mesh, const nn::GptConfig& config, GptMeshOptions options);
  ~GptOnMesh();
  GptOnMesh(const GptOnMesh&) = delete;
  GptOnMesh& operator=(const GptOnMesh&) = delete;

  std::shared_ptr<nn::Gpt> model() const { return gpt_; }
  ProcessMesh& mesh() { return mesh_; }
  const std::vector<int64_t>& stage_starts() const { return starts_; }

  // x, y: this dp rank's rows [B/dp, T] (i64), on every rank of its tp/pp column.
  // Returns the mean loss over those rows (the same on every rank of the column).
  double forward_backward(const Tensor& x, const Tensor& y);
  void sync_gradients();
  // Clips (options.clip > 0) and updates with learning rate `lr`.
  void optimizer_step(double lr);
  // All three; returns the mean loss over the global batch (every rank).
  double train_step(const Tensor& x, const Tensor& y, double lr);
  // No graph: the mean loss over these rows (same on every rank of the column).
  double eval_loss(const Tensor& x, const Tensor& y);

  // Of the last pipelined forward_backward (zeros when pp = 1).
  const PipelineStats& pipeline_stats() const { return stats_; }
  // Bytes of AdamW state this rank holds (exp_avg + exp_avg_sq).
  int64_t optimizer_state_bytes() const;
  // Parameter elements this rank holds (under ZeRO-3 the blocks' shards only).
  int64_t parameter_elements() const;
  // Collective over dp under ZeRO-3: this rank's parameters by global name (tp
  // slices, ZeRO-3 blocks gathered over dp), copies.
  nn::StateDict parameter_state() const;
  // Everything a checkpoint needs, keyed independently of the mesh (collective over
  // dp under ZeRO): parameter_state(), "<param>/exp_avg" and "<param>/exp_avg_sq"
  // shaped like this rank's slice of the parameter (zeros before the first step),
  // and "step" (i64 scalar, the optimizer's step count).
  nn::StateDict train_state() const;
  // The inverse, into this mesh's model and optimizers. ShapeError/DataFormatError
  // naming the key when one is missing or of another shape; nothing is changed then.
  void load_train_state(const nn::StateDict& state);

 private:
  optim::AdamWOptions adam_options() const;
  void make_sharded();
  void add_zero_part(const std::vector<size_t>& which, int stage);
  void zero_grad();
  Tensor run_stage(const Tensor& in);  // embedding (first stage) and this stage's blocks
  double pipelined(const Tensor& x, const Tensor& y);
  std::vector<bool> counted_in_norm(const std::vector<std::string>& names) const;
  double clip_gradients();
  // An optimizer in use, its parameters' names in its order, and its state.
  struct NamedOptimizer {
    std::vector<std::string> names;
    std::function<optim::StateDict()> save;
    std::function<void(const optim::StateDict&)> load;
  };
  std::vector<NamedOptimizer> named_optimizers() const;
  void check_train_state(const nn::StateDict& state) const;

  ProcessMesh& mesh_;
  GptMeshOptions options_;
  std::vector<int64_t> starts_;
  std::shared_ptr<nn::Gpt> gpt_;
  std::vector<std::string> names_;  // parameter names, in the order of params_
  std::vector<Tensor> params_;
  std::unique_ptr<DistributedDataParallel> ddp_;
  std::unique_ptr<optim::AdamW> decay_, no_decay_;
  // Under ZeRO: the sharded optimizers, each with its parameters' names in its order
  // (ZeRO-1/2 over the parameters, a ZeRO-1 one for the tied embedding under ZeRO-2
  // with pp > 1, the FSDP units of ZeRO-3 last).
  struct ShardedPart {
    std::shared_ptr<ShardedAdamW> opt;
    std::vector<std::string> names;
  };
  std::vector<ShardedPart> parts_;
  FullyShardedDataParallel* fsdp_ = nullptr;  // ZeRO-3: the blocks (in parts_)
  PipelineStats stats_;
};

}  // namespace dtrain::parallel
