// A GPT's training state as a sharded checkpoint that loads at any mesh.
//
// The state is a map of this rank's local tensors:
//   "<param name>"         a parameter (its global name, as in Gpt::shard_specs())
//   "<param name>/<slot>"  per-parameter optimizer state shaped like the local slice
//                          ("wte.weight/exp_avg"); it is sliced like the parameter
//   anything else          a replicated tensor ("step"), stored whole
// Each tensor is stored once with its global shape, as the pieces the ranks of one
// data-parallel replica hold (sharded_checkpoint.h), so a state saved at (dp=2, tp=2)
// loads at tp=4, at one process, or at a pipeline of stages.
//
// Who writes (so that every tensor is written exactly once): ranks at dp coordinate 0;
// of those, a tensor replicated over tp (spec.parts == 1) only by tp rank 0; the copy
// of the tied wte that a last pipeline stage without the embedding keeps
// (stage().embedding == false) is left to the first stage; non-parameter keys only by
// world rank 0. Every stage reads what it holds, that copy of wte included.
//
// Deliberately not here: building the state map from an optimizer (the caller names
// its slots), ZeRO-partitioned optimizer state (slots must be shaped like the local
// parameter slice), checking that the replicas over dp agree.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/parallel/mesh.h"

namespace dtrain::parallel {

// Collective over mesh.world(). ShapeError naming the key when a tensor of a parameter
// (or its slot) is not the shape of this rank's slice; otherwise as save_sharded.
void save_gpt_sharded(const std::string& dir, const nn::Gpt& gpt, ProcessMesh& mesh,
                      const TensorMap& state, const nlohmann::json& meta);

// Reads, for every key of `like` (this rank's keys and local shapes at the new mesh,
// typically the state it would save), this rank's slice from the checkpoint; local,
// no communicator. CheckpointError (one line: checkpoint dir, tensor, stored vs expected
// global shape) when a shape does not fit the model, a key is missing or a dtype
// differs; DataFormatError on a corrupt shard.
TensorMap load_gpt_sharded(const std::string& dir, const nn::Gpt& gpt, const TensorMap& like);

}  // namespace dtrain::parallel
