// Gradient clipping by global norm, correct when the gradient is split over ranks.
//
//   total = sqrt(sum over every element of the model's gradient of g^2)
//   if max_norm / (total + 1e-6) < 1: every gradient *= max_norm / (total + 1e-6)
//
// (torch.nn.utils.clip_grad_norm_'s formula; the total is returned, before clipping.)
// Under a split each rank sums the squares of the elements it OWNS (its ZeRO shard, its
// tensor-parallel slice), and one all-reduce (kSum) per communicator adds the ranks'
// shares. A tensor replicated across a group (a LayerNorm weight under tensor
// parallelism) must be counted by one rank of that group only: pass counted = false on
// the others -- it is still scaled.
//
// The squares are summed in double on the host (a CUDA gradient is copied down; the
// one-element partial sum travels through a tensor on the gradients' device, so a
// nccl communicator can reduce it).
//
// Not here: norms other than L2, clipping by value, skipping non-finite norms.
#pragma once

#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::parallel {

// The split form. grads: the gradient tensors this rank holds (undefined ones are
// skipped); counted: empty (all counted) or one flag per grads entry; groups: the
// communicators over which the owned elements are split (each all-reduces once; empty
// for an unsplit model). Collective over every group. Throws InvalidArgument for a
// max_norm <= 0 or a counted list of the wrong length.
double clip_grad_norm_sharded(const std::vector<Tensor>& grads, double max_norm,
                              const std::vector<comm::Communicator*>& groups,
                              const std::vector<bool>& counted = {});

// Plain DDP (and a single process): every rank holds the same full gradients after
// finish_gradient_sync, so nothing is reduced. Clips the grad() of `params`.
double clip_grad_norm(const std::vector<Tensor>& params, double max_norm);

}  // namespace dtrain::parallel
