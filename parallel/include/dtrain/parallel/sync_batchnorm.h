// SyncBatchNorm: makes every BatchNorm2d of a model compute its batch statistics over
// all data-parallel ranks (torch.nn.SyncBatchNorm.convert_sync_batchnorm).
//
// Each converted layer all-reduces (sum) its per-channel (sum x, sum x^2, count) in
// forward and (sum dy, sum dy * (x - mean)) in backward over `comm`, in f64 (see
// dtrain/engine/batch_norm.h); so N ranks with B samples each see the statistics of
// one batch of N * B. These are blocking collectives issued in layer order, the same
// on every rank, so they interleave safely with DDP's gradient buckets on the same
// communicator. `comm` must outlive the model's use.
#pragma once

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/nn/module.h"

namespace dtrain::parallel {

// Converts every BatchNorm2d in `model` (recursively); returns how many. A world of
// one rank converts nothing (the statistics are already the whole batch's).
int convert_sync_batchnorm(nn::Module& model, comm::Communicator& comm);

}  // namespace dtrain::parallel
