// Tensor parallelism (Megatron-LM style) as autograd functions over a tp communicator.
//
// The two conjugate operators of Megatron's paper:
//   f = copy_to_tp_region:     forward identity,   backward all-reduce (sum over tp)
//   g = reduce_from_tp_region: forward all-reduce, backward identity
// A column-parallel linear (weight rows split over tp) takes f(x) and yields this
// rank's slice of the output features; a row-parallel linear (weight columns split)
// takes that slice and g() sums the partial products; the bias is added once, after g.
// An MLP is column then row, attention is heads split over tp then row: one all-reduce
// forward and one backward per pair, nothing gathered.
//
//   x ──f──> [X W1_r] ──gelu──> [. W2_r] ──g──> + b2 ──> y      (rank r of tp)
//
// Vocabulary parallelism: rank r holds rows [r V/tp, (r+1) V/tp) of the token embedding.
// The embedding looks up the ids it holds (zero rows for the others) and g() sums;
// the cross-entropy combines each rank's log-sum-exp over its vocab slice (an
// all-gather of one number per row) with the target logit (held by one rank, summed by
// g), so the [N, V] logits are never gathered:
//   loss_n = logsumexp_r(lse_r[n]) - sum_r logit_r[n, t_n]
//
// Every function here is an ordinary op for the engine's autograd, so the backward
// collectives run inside loss.backward(), in the reverse order of the forward ones (the
// same on every rank). The tensors must live where the communicator reads (host memory
// for tcp/mpi, device memory for nccl).
//
// Deliberately not here: the mesh (mesh.h), sequence parallelism (not built yet).
#pragma once

#include <cstdint>
#include <memory>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/random.h"

namespace dtrain::parallel {

Tensor copy_to_tp_region(const Tensor& x, comm::Communicator& tp);      // f
Tensor reduce_from_tp_region(const Tensor& x, comm::Communicator& tp);  // g
// [tp, ...x.shape]: every rank's x stacked; backward keeps this rank's slice.
Tensor gather_stacked(const Tensor& x, comm::Communicator& tp);

// weight_shard [V/tp, D] (rows rank*V/tp...), indices i64 over the full vocab.
Tensor vocab_parallel_embedding(const Tensor& weight_shard, const Tensor& indices,
                                comm::Communicator& tp);
// logits_shard [N, V/tp], target i64 [N] in [0, V): mean cross-entropy over N, the
// same value on every tp rank.
Tensor vocab_parallel_cross_entropy(const Tensor& logits_shard, const Tensor& target,
                                    comm::Communicator& tp);

// The GPT's tensor-parallel seams over a tp communicator (which must outlive it).
class TensorParallel final : public nn::GptParallel {
 public:
  explicit TensorParallel(comm::Communicator& tp) : tp_(tp) {}
  int size() const override { return tp_.size(); }
  int rank() const override { return tp_.rank(); }
  Tensor copy_to_region(const Tensor& x) override { return copy_to_tp_region(x, tp_); }
  Tensor reduce_from_region(const Tensor& x) override { return reduce_from_tp_region(x, tp_); }
  Tensor embedding(const Tensor& w, const Tensor& idx) override {
    return vocab_parallel_embedding(w, idx, tp_);
  }
  Tensor cross_entropy(const Tensor& logits, const Tensor& target) override {
    return vocab_parallel_cross_entropy(logits, target, tp_);
  }

 private:
  comm::Communicator& tp_;
};

// y = x W^T + b with W [out, in] split by rows: this rank holds out/tp output features
// (and their bias); the output is this rank's feature slice [..., out/tp].
class ColumnParallelLinear final : public nn::Module {
 public:
  // Draws the full [out, in] weight from `gen` (the same on every rank) and keeps its rows.
  ColumnParallelLinear(int64_t in, int64_t out, comm::Communicator& tp, Generator& gen,
                       bool bias = true);
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  Tensor weight, bias;

 private:
  int64_t in_, out_;
  comm::Communicator& tp_;
};

// y = x W^T + b with W [out, in] split by columns: the input is the feature slice
// [..., in/tp] a ColumnParallelLinear produced; the output is full and replicated.
class RowParallelLinear final : public nn::Module {
 public:
  RowParallelLinear(int64_t in, int64_t out, comm::Communicator& tp, Generator& gen,
                    bool bias = true);
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  Tensor weight, bias;

 private:
  int64_t in_, out_;
  comm::Communicator& tp_;
};

}  // namespace dtrain::parallel
