// Sharded training checkpoints: what each rank writes (phase 1) and how a run, with
// the same or a different number of data-parallel ranks, loads them back.
//
// A shard is a DTRN archive (serialize.h). Tensor names are "model.<state_dict key>"
// and "optim.<state_dict key>"; each model/optimizer tensor lives in exactly one shard
// (replicas are written once: the partition is a deterministic, byte-balanced function
// of names, sizes and world size). Every shard's metadata also holds that rank's
// sampler state, named generator states, step, epoch, scheduler position and `extra`.
//
// The manifest, the `latest` pointer, verification and retention belong to
// dtrain/common/checkpoint_store.h (phase 2, done once by the committer).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/optim/optimizer.h"
#include "dtrain/engine/random.h"
#include "dtrain/engine/serialize.h"

namespace dtrain::ckpt {

struct TrainingState {
  nn::Module* model = nullptr;                                 // required
  optim::Optimizer* optimizer = nullptr;                       // optional
  optim::LRScheduler* scheduler = nullptr;                     // optional (its last_epoch is saved)
  data::DistributedSampler* sampler = nullptr;                 // optional
  std::vector<std::pair<std::string, Generator*>> generators;  // named RNG streams
  int64_t step = 0;
  int64_t epoch = 0;
  nlohmann::json extra = nlohmann::json::object();
};

// Phase 1, every rank: writes this rank's shard into store.folder(name) (creating the
// folder) and returns its entry (file, bytes, checksum); `progress` (when set) hears
// the shard's bytes as they are written (save_archive).
ShardEntry write_shard(const CheckpointStore& store, const std::string& name,
                       const TrainingState& s, int rank, int world_size,
                       const WriteProgress& progress = {});

// Loads committed checkpoint m into s as rank `rank` of `world_size`, which may differ
// from m.world_size (N -> M): tensors come from whichever shard holds them; the
// sampler continues at the same global position of the epoch, re-sharded over the new
// world size; generators of ranks that did not exist are derived deterministically.
// Verifies each shard it reads; nothing in s changes unless all of it loaded
// (CheckpointError naming the shard otherwise). Sets s.step, s.epoch, s.extra.
void load(const CheckpointStore& store, const Manifest& m, TrainingState& s, int rank,
          int world_size);

// The model weights of m in the safetensors format (8-byte LE header length, JSON
// header with dtype "F32"/..., shape, data_offsets; names = the model's state_dict
// keys) at path, tmp -> fsync -> rename.
void export_safetensors(const CheckpointStore& store, const Manifest& m, const std::string& path);

}  // namespace dtrain::ckpt
