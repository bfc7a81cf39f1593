#include "ddp_plan.h"

#include <chrono>

#include "dtrain/common/error.h"
#include "host_values.h"

namespace dtrain::cli {

DataParallelPlan::DataParallelPlan(comm::Communicator& comm, Device device,
                                   parallel::DdpOptions options)
    : comm_(comm), device_(device), options_(options) {}

void DataParallelPlan::prepare(std::shared_ptr<nn::Module> model) {
  DTRAIN_CHECK(model != nullptr, InvalidArgument, "DataParallelPlan::prepare: no model");
  model_ = std::move(model);
  ddp_.reset();  // a new fit() over the same plan builds a new DDP
  if (comm_.size() > 1) {
    ddp_ = std::make_unique<parallel::DistributedDataParallel>(model_, comm_, options_);
  }
}

double DataParallelPlan::forward_backward(const TrainBatch& batch, const StepFn& step) {
  DTRAIN_CHECK(model_ != nullptr, InvalidArgument,
               "DataParallelPlan: forward_backward before prepare");
  StepLoss loss = step(*model_, batch);
  loss.loss.backward();  // DDP's hooks start the bucket all-reduces from in here
  return loss.value;
}

void DataParallelPlan::sync_gradients() {
  if (!ddp_) return;
  const auto start = std::chrono::steady_clock::now();
  ddp_->finish_gradient_sync();
  sync_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void DataParallelPlan::optimizer_step(optim::Optimizer& optimizer) { optimizer.step(); }

double DataParallelPlan::reduce_loss(double local_loss) {
  double mean = local_loss;
  if (comm_.size() > 1) {  // the average over every rank's batch
    on_host_values(device_, &mean, 1, DType::f64,
                   [&](void* p) { comm_.allreduce(p, 1, DType::f64, comm::ReduceOp::kAvg); });
  }
  return mean;
}

void DataParallelPlan::checkpoint_state(CheckpointState& state) const {
  state.shard = comm_.rank();
  state.num_shards = comm_.size();
}

}  // namespace dtrain::cli
