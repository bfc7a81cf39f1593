// nn::Gpt: a GPT-2-style decoder-only transformer (nanoGPT's shape), ready to be split.
//
//   idx [B,T] -> wte(idx) + wpe(0..T-1) -> n_layer x Block -> ln_f -> x wte^T -> logits
//   Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))          (pre-LayerNorm)
//   attn:   causal self-attention, n_head heads, q/k/v/proj linears (no key bias:
//           softmax is invariant to it, so it could only learn rounding noise)
//   mlp:    fc (C -> 4C), GELU (tanh), proj (4C -> C)
// The output head is tied to the token embedding (one tensor, "wte.weight").
//
// Splits. The model is written once, with the two splits of model parallelism as seams:
//  * Tensor parallelism enters through a GptParallel (Megatron-LM's scheme): q/k/v and
//    fc are column-parallel (each tp rank holds n_head/tp heads and 4C/tp hidden units,
//    input passed through f = identity forward / all-reduce backward); attention proj
//    and mlp proj are row-parallel (their outputs go through g = all-reduce forward /
//    identity backward, then the full bias is added); wte is vocab-parallel (each rank
//    holds vocab/tp rows, the embedding and the cross-entropy reduce over tp and never
//    gather the logits). The default GptParallel is one device: identities, plain ops.
//  * Pipeline parallelism cuts the model into layers: [embedding, block 0..n-1, head]
//    (the head is ln_f + the tied projection + the loss). A GptStage says which of them
//    this rank holds; embed(), run_blocks() and head_loss() are the stage pieces. A last
//    stage without the embedding keeps its own copy of wte (the trainer all-reduces its
//    gradient with the first stage's over the mesh's embedding group).
//
// Initialisation does not depend on the split: every parameter is drawn in full from a
// Generator seeded by (config seed, the parameter's global name) and each rank keeps
// its slice, so any mesh starts from the 1-process model's exact weights (GPT-2's
// scheme: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 n_layer)), biases 0,
// LayerNorm 1/0). shard_specs() records, per parameter, its global shape and the slice
// this rank holds, which is what sharded checkpoints store to load at another mesh.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/nn/module.h"

namespace dtrain::nn {

struct GptConfig {
  int64_t vocab_size = 256;  // the tokenizer's vocabulary padded by the caller if needed
  int64_t block_size = 64;   // context length T
  int64_t n_layer = 2;
  int64_t n_head = 4;
  int64_t n_embd = 64;
  uint64_t seed = 1337;

  std::string str() const;  // "GPT 2 layers, 4 heads, 64 dims, vocab 96, context 64"
  // InvalidArgument, one line naming the numbers, when the shape is impossible or the
  // tensor-parallel size tp does not divide the heads, the hidden size or the vocab.
  void check(int tp = 1) const;
  // Parameters of the whole model (embedding counted once).
  int64_t num_parameters() const;
  // Training FLOPs per token (forward + backward), PaLM's 6N + 12 L T C.
  double flops_per_token() const;
};

// The seams of tensor parallelism (see the file comment). Thread-safety: as the model.
class GptParallel {
 public:
  virtual ~GptParallel() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  virtual Tensor copy_to_region(const Tensor& x) = 0;      // f
  virtual Tensor reduce_from_region(const Tensor& x) = 0;  // g
  // weight_shard [V/size, C] holds rows rank*V/size...; indices i64 of the full vocab.
  virtual Tensor embedding(const Tensor& weight_shard, const Tensor& indices) = 0;
  // logits_shard [N, V/size], target i64 [N] over the full vocab; mean loss (replicated).
  virtual Tensor cross_entropy(const Tensor& logits_shard, const Tensor& target) = 0;
};

// tp = 1: identities and the plain embedding / cross_entropy ops.
std::shared_ptr<GptParallel> single_device_parallel();

// Layers held by one pipeline stage. Blocks [first_block, end_block).
struct GptStage {
  bool embedding = true;
  int64_t first_block = 0;
  int64_t end_block = -1;  // -1: to the last block
  bool head = true;
};

// One parameter's place in the full model.
struct ShardSpec {
  Shape global_shape;
  int dim = -1;  // the dimension split over tp; -1: replicated
  int rank = 0;
  int parts = 1;
};

class GptBlock;

class Gpt : public Module {
 public:
  explicit Gpt(const GptConfig& config, std::shared_ptr<GptParallel> parallel = nullptr,
               GptStage stage = {});

  // Whole model on this rank: logits [B, T, V/tp] (this rank's vocab slice).
  Tensor forward(const Tensor& idx) override;
  // Whole model on this rank: mean next-token cross-entropy.
  Tensor loss(const Tensor& idx, const Tensor& targets);

  // Stage pieces (pipeline parallelism).
  Tensor embed(const Tensor& idx);
  Tensor run_blocks(const Tensor& x);
  Tensor head_loss(const Tensor& x, const Tensor& targets);
  Tensor head_logits(const Tensor& x);

  const GptConfig& config() const { return config_; }
  const GptStage& stage() const { return stage_; }
  std::string extra_repr() const override { return config_.str(); }
  // Global name -> spec, for every parameter of this rank.
  const std::map<std::string, ShardSpec>& shard_specs() const { return specs_; }
  // nanoGPT's weight-decay groups: matrices and embeddings decay, biases and norms not.
  std::vector<Tensor> decay_parameters() const;
  std::vector<Tensor> no_decay_parameters() const;
  // The tied token embedding on this rank (undefined on stages with neither end).
  Tensor wte() const { return wte_; }
  // This stage's blocks (x [B,T,C] -> x), first_block first: what ZeRO-3 wraps as units.
  std::vector<std::shared_ptr<Module>> block_modules() const;

  // Registers a parameter of `owner` named `local`, global name `global`, drawn in
  // full (normal with `std`, or the constant `fill` when std == 0) and sliced along
  // `dim` over the tensor-parallel group. Used by the blocks.
  Tensor add_param(Module& owner, const std::string& local, const std::string& global,
                   const Shape& full, int dim, double std, double fill = 0.0);
  GptParallel& parallel() { return *parallel_; }

 private:
  void check_input(const Tensor& idx, const char* what) const;

  GptConfig config_;
  std::shared_ptr<GptParallel> parallel_;
  GptStage stage_;
  std::map<std::string, ShardSpec> specs_;
  Tensor wte_, wpe_;
  std::vector<std::shared_ptr<GptBlock>> blocks_;
  std::shared_ptr<LayerNorm> ln_f_;
};

}  // namespace dtrain::nn
