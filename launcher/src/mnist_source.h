// MnistBatchSource: the trainer's BatchSource for MNIST classification.
//
// The data: a user's IDX folder, or the demo's MNIST subset, which rank 0 prepares
// (fetch + convert) first and the other ranks then read from its cache. Training
// batches are this rank's slice of each global batch (a DistributedSampler over the
// train split, shuffled per epoch) as {images f32 [B,1,28,28], labels i64 [B]};
// evaluation gives every rank its share of the test split (rows rank, rank + size,
// ...) and sums the correct argmax predictions over the ranks: "test_accuracy".
// mnist_loss is the matching LossFn (cross entropy of the model's logits).
//
// With options.augment (e.g. "crop:2,flip,rotate:10") the train split is loaded
// unnormalised, augmented on the loader's prefetch thread (split over
// augment_threads), then normalised with MNIST's mean/std as the pipeline's last
// stage, like torchvision's Compose([..., Normalize]); the test split is not augmented.
// With a CUDA device the loader copies the raw batch to the device and the
// augmentation runs there as CUDA kernels (the same bytes as the CPU path, augment.h).
// The other image data sets of --data come from image_data.h.
// Not here: the model (nn::make_model).
// Thread-safety: the training thread (the DataLoader's prefetch thread is its own).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/data/augment.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/device.h"
#include "image_data.h"
#include "trainer.h"

namespace dtrain::cli {

struct MnistSourceOptions {
  std::string data;  // IDX folder, fashion-mnist, imagefolder:DIR, records:FILE (image_data.h);
                     // empty: the demo's MNIST subset
  std::string data_cache = "data";  // where the demo's data step caches its files
  bool normalize = true;
  int64_t local_batch = 64;       // this rank's share of the global batch
  uint64_t seed = 1;              // the shuffle of every epoch
  Device device = Device::cpu();  // where batches are delivered
  int64_t eval_batch = 500;
  std::string augment;           // training-set augmentation (data/augment.h); empty: none
  int augment_threads = 1;       // worker threads that augment each batch
  std::vector<int64_t> classes;  // --classes: only these digits (labels kept); empty: all
};

// Where the data came from, for the banner and the summary.
struct MnistOrigin {
  std::string dir;
  std::string source;      // "MNIST IDX files from <dir>", or what the demo's data step says
  bool generated = false;  // synthetic digits (the demo's fetch failed)
};

class MnistBatchSource final : public BatchSource {
 public:
  // Collective (a barrier while rank 0 prepares the demo subset). Throws IoError /
  // DataFormatError naming a missing or malformed file. REQUIRES: comm outlives it.
  MnistBatchSource(const MnistSourceOptions& options, comm::Communicator& comm);

  int64_t steps_per_epoch() const override { return loader_.num_batches(); }
  void begin_epoch(int64_t epoch) override {
    if (aug_) aug_->set_epoch(epoch);
    loader_.begin_epoch(epoch);
  }
  bool next(TrainBatch& batch) override;
  bool epoch_done() const override;
  data::DistributedSampler position() const override { return loader_.sampler(); }
  void load_position(const data::SamplerState& state) override { loader_.load_state(state); }
  Metrics evaluate(nn::Module& model) override;  // test_accuracy (fraction), test_loss (mean nats)

  const MnistOrigin& origin() const { return origin_; }
  int world_size() const { return comm_.size(); }  // ranks the batches are split over
  int64_t train_size() const { return train_->size(); }
  int64_t test_size() const { return test_->size(); }

 private:
  comm::Communicator& comm_;
  MnistSourceOptions options_;
  ImageSplits splits_;  // the --data choice (image_data.h)
  MnistOrigin origin_;
  std::shared_ptr<data::AugmentedDataset> aug_;  // null without --augment
  bool augment_on_device_;  // --device cuda: the loader delivers raw rows, aug_ runs on them
  std::shared_ptr<const data::Dataset> train_;  // aug_, or splits_.train
  std::shared_ptr<const data::Dataset> test_;
  data::DataLoader loader_;
};

// cross_entropy(model(images), labels) for a batch of MnistBatchSource.
Tensor mnist_loss(nn::Module& model, const TrainBatch& batch);

}  // namespace dtrain::cli
