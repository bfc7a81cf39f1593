// Flat parameter buffers shared by the ZeRO stages (zero.cc, fsdp.cc): views into a
// flat f32 buffer, moving a parameter's storage into one, packing and gathering.
// Internal to dtrain_parallel.
#pragma once

#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/tensor.h"
#include "dtrain/parallel/zero.h"

namespace dtrain::parallel::flat {

// A contiguous `shape` view of `flat` at element `offset`.
Tensor flat_view(const Tensor& flat, const Shape& shape, int64_t offset);
// Moves p's storage into `flat` at `offset` (p keeps its identity, as in Module::to).
void point_into(const Tensor& p, const Tensor& flat, const Shape& shape, int64_t offset);
// InvalidArgument/DTypeError/UnsupportedError naming `who` and the parameter.
void check_params(const std::vector<Tensor>& params, const std::vector<double>& wd,
                  const char* who);
// The flat buffer of `params` (laid out by l), with rank 0's values on every rank.
Tensor pack_broadcast(comm::Communicator& comm, const FlatLayout& l,
                      const std::vector<Tensor>& params);
// All-gathers a shard (bucket pieces at their shard offsets) into a full flat buffer.
Tensor gather_flat(comm::Communicator& comm, const FlatLayout& l, const Tensor& shard);

}  // namespace dtrain::parallel::flat
