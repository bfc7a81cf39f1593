// DataParallelPlan: the trainer's ParallelPlan for plain data parallelism (DDP).
//
// Every rank holds the whole model. With more than one rank, prepare() wraps it in
// parallel::DistributedDataParallel (which broadcasts rank 0's weights, so it must
// run after a checkpoint was loaded), backward overlaps the gradient all-reduce, and
// sync_gradients() waits for the averages. One rank: no DDP, no collectives.
// The forward calls the module itself (not DDP's forward), so buffers are broadcast
// once, at construction. A checkpoint shard is this rank's share of the replicated
// model and optimizer (rank of world: replicas are written once).
//
// Not here: gradient accumulation (no_sync), ZeRO, tensor or pipeline parallelism.
// Thread-safety: the training thread only.
#pragma once

#include <memory>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/device.h"
#include "dtrain/parallel/ddp.h"
#include "trainer.h"

namespace dtrain::cli {

class DataParallelPlan final : public ParallelPlan {
 public:
  // REQUIRES: comm outlives the plan. device: where the model lives (the logged
  // loss travels through it for a device-memory communicator).
  // options: DDP's (bucket caps, gradient compression).
  DataParallelPlan(comm::Communicator& comm, Device device, parallel::DdpOptions options = {});

  void prepare(std::shared_ptr<nn::Module> model) override;
  double forward_backward(const TrainBatch& batch, const StepFn& step) override;
  void sync_gradients() override;
  void optimizer_step(optim::Optimizer& optimizer) override;
  double reduce_loss(double local_loss) override;
  void checkpoint_state(CheckpointState& state) const override;
  bool is_logging_rank() const override { return comm_.rank() == 0; }
  int rank() const override { return comm_.rank(); }
  // Wall seconds the training thread has waited in sync_gradients (the all-reduce
  // time backward did not hide), summed over every step of this plan; 0 on one rank.
  double sync_seconds() const { return sync_seconds_; }

 private:
  comm::Communicator& comm_;
  Device device_;
  parallel::DdpOptions options_;
  std::shared_ptr<nn::Module> model_;
  std::unique_ptr<parallel::DistributedDataParallel> ddp_;  // world > 1 only
  double sync_seconds_ = 0;
};

}  // namespace dtrain::cli
