// ShardedCheckpoints: the trainer's checkpoints in a --ckpt-dir, resumable and
// committed in two phases.
//
// Saving (on_checkpoint, every rank): with a coordinator, BeginCheckpoint first (a
// refusal -- the coordinator unreachable or the generation over -- skips this
// checkpoint with one line), then each rank writes its shard
// (dtrain/engine/checkpoint.h) and sends CommitShard; the coordinator commits when
// every shard is in. Without coordinator (one process, or mpirun) the ranks meet at
// a barrier and rank 0 commits the manifest, reading the other shards' entries from
// their files (a shared folder). Retention: the newest `keep` committed ones.
//
// Loading (load, before the first step): --resume auto takes the newest committed
// checkpoint that verifies (rank 0 chooses, naming each one skipped and why, and
// broadcasts its step so every rank loads the same one); a name loads that one. A
// checkpoint of another --model is a CheckpointError.
//
// Test seam: test_commit_delay_ms, a wait between writing the shard and
// CommitShard (a window to kill a worker mid-checkpoint), as long when skipped.
//
// Not here: when a checkpoint is due (the Trainer), the --save file (train.cc).
// Thread-safety: the training thread.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/engine/device.h"
#include "trainer.h"
#include "worker_session.h"

namespace dtrain::cli {

struct CheckpointOptions {
  std::string dir;              // the checkpoints' root folder (made absolute)
  int keep = 3;                 // committed checkpoints kept (0: all)
  std::string resume = "none";  // none | auto | a checkpoint name (step-00000120)
  std::string model;            // the model a checkpoint to resume must hold
  nlohmann::json run_config;    // written into every manifest ("model" among it)
  int64_t test_commit_delay_ms = 0;
  bool progress = false;  // rank 0 draws a bar of its shard's bytes (progress.h)
};

class ShardedCheckpoints final : public CheckpointLoader, public Callback {
 public:
  // REQUIRES: session outlives this object. device: where a broadcast step travels.
  ShardedCheckpoints(CheckpointOptions options, WorkerSession& session, Device device);

  // Collective; false (with a line on rank 0) when there is nothing to resume.
  bool load(CheckpointState& state) override;
  // Collective (the commit); a failed commit is reported in a line, not thrown.
  void on_checkpoint(const CheckpointState& state) override;

  const ckpt::CheckpointStore& store() const { return store_; }

 private:
  std::optional<ckpt::Manifest> choose() const;
  bool begin(const std::string& name, const ckpt::TrainingState& st) const;
  void commit_through_coordinator(const std::string& name, int64_t step,
                                  const ckpt::ShardEntry& entry) const;
  void commit_locally(const std::string& name, const CheckpointState& state,
                      const ckpt::ShardEntry& entry) const;

  CheckpointOptions options_;
  WorkerSession& session_;
  Device device_;
  ckpt::CheckpointStore store_;
};

}  // namespace dtrain::cli
