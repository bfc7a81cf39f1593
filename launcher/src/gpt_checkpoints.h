// GptCheckpoints: --ckpt-dir / --resume for `dtrain train --model gpt`. Each
// checkpoint is a folder <ckpt-dir>/step-00000120 in the mesh-independent sharded
// format (parallel/gpt_checkpoint.h: every tensor with its global shape and the
// slices the ranks held, the AdamW moments included), so a run saved at one mesh
// resumes at any other (dp=2,tp=2 + ZeRO-1 -> pp=4, ZeRO-3 -> one process).
//
// Saving (on_checkpoint, collective): GptOnMesh::train_state() written through
// save_gpt_sharded (atomic: a temp folder renamed into place, an earlier checkpoint
// of that name stays until the new one is whole); rank 0 then keeps the newest
// --keep folders. Loading (load, collective, before the first step): --resume auto
// takes the newest step-* folder, a name takes that one; the model's shape must be
// the checkpoint's (CheckpointError, one line naming both, otherwise), every tensor's
// global shape is checked again by load_gpt_sharded, and nothing is changed unless it
// all fits. The step, the schedule's position and the data position (a step index)
// go on from the checkpoint's step.
//
// Departure from the MNIST checkpoints (checkpointing.h): these are not committed
// through the coordinator's two-phase protocol; the rename is the commit.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "dtrain/parallel/gpt_mesh.h"
#include "train.h"
#include "trainer.h"

namespace dtrain::cli {

class GptCheckpoints final : public Callback, public CheckpointLoader {
 public:
  // resume_data(step): the data source continues with step `step`'s batch.
  GptCheckpoints(const TrainConfig& config, parallel::GptOnMesh& run,
                 optim::LRScheduler& schedule, std::function<void(int64_t)> resume_data);
  void on_checkpoint(const CheckpointState& state) override;
  bool load(CheckpointState& state) override;

 private:
  std::string choose() const;  // the folder to resume from, "" for none
  void check_model(const std::string& dir, const nlohmann::json& meta) const;
  void prune() const;

  const TrainConfig& config_;
  parallel::GptOnMesh& run_;
  optim::LRScheduler& schedule_;
  std::function<void(int64_t)> resume_data_;
};

}  // namespace dtrain::cli
