// The single-process pieces the compression commands (cmd_compress.cc) train and
// evaluate with: MNIST batches without a communicator, a one-process plan that keeps
// a pruning mask, and checkpoint helpers that know which model a file holds.
//
// LocalMnistSource is MnistBatchSource (mnist_source.h) for one process: the same
// data step, shuffle and batches, evaluation on the whole test split. MaskedLocalPlan
// runs forward + backward on the calling thread and, when given masks, keeps the
// pruned weights at zero (mask the gradients, step, mask the weights: prune.h).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dtrain/engine/compress/prune.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/nn/models.h"
#include "trainer.h"

namespace dtrain::cli {

struct LocalDataOptions {
  std::string data;  // IDX folder; empty: the demo's MNIST subset
  std::string data_cache = "data";
  int64_t batch = 64;
  uint64_t seed = 1;
};

// --data, --data-cache, --batch, --seed.
void add_local_data_options(CLI::App* app, LocalDataOptions& options);

class LocalMnistSource final : public BatchSource {
 public:
  explicit LocalMnistSource(const LocalDataOptions& options);
  int64_t steps_per_epoch() const override { return loader_->num_batches(); }
  void begin_epoch(int64_t epoch) override { loader_->begin_epoch(epoch); }
  bool next(TrainBatch& batch) override;
  bool epoch_done() const override;
  data::DistributedSampler position() const override { return loader_->sampler(); }
  void load_position(const data::SamplerState& state) override { loader_->load_state(state); }
  Metrics evaluate(nn::Module& model) override;  // {"test_accuracy"}

  // Test accuracy of any logits function (the int8 model's, say).
  double accuracy(const std::function<Tensor(const Tensor&)>& logits_of) const;
  // The first `n` training batches' images (calibration), in file order.
  std::vector<Tensor> first_train_inputs(int64_t n, int64_t batch) const;
  const data::MnistDataset& test() const { return *test_; }
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::shared_ptr<data::MnistDataset> train_;
  std::shared_ptr<data::MnistDataset> test_;
  std::unique_ptr<data::DataLoader> loader_;
};

class MaskedLocalPlan final : public ParallelPlan {
 public:
  explicit MaskedLocalPlan(const compress::PruneMasks* masks = nullptr) : masks_(masks) {}
  void prepare(std::shared_ptr<nn::Module> model) override { model_ = std::move(model); }
  double forward_backward(const TrainBatch& batch, const StepFn& step) override;
  void sync_gradients() override {}
  void optimizer_step(optim::Optimizer& optimizer) override;
  double reduce_loss(double local_loss) override { return local_loss; }
  void checkpoint_state(CheckpointState& /*state*/) const override {}
  bool is_logging_rank() const override { return true; }
  int rank() const override { return 0; }

 private:
  const compress::PruneMasks* masks_;
  std::shared_ptr<nn::Module> model_;
};

// The model name a checkpoint written by `dtrain train --save` / `dtrain prune` holds
// (its extra "model"); "" when it does not say.
std::string checkpoint_model(const std::string& path);
// Builds `model` (or the checkpoint's own when `model` is empty) and loads `path`
// into it; throws InvalidArgument when the checkpoint holds another model. `extra`
// receives the checkpoint's extra JSON.
std::shared_ptr<nn::Sequential> load_model(const std::string& path, const std::string& model,
                                           const char* flag, nlohmann::json* extra = nullptr);

// Trains `model` with SGD (momentum 0.9, constant lr) through the Trainer for
// `steps` steps on `data`, keeping `masks` when given. Returns the stats.
TrainStats train_local(std::shared_ptr<nn::Module> model, const LossFn& loss,
                       LocalMnistSource& data, int64_t steps, double lr,
                       const compress::PruneMasks* masks = nullptr);

}  // namespace dtrain::cli
