// Dataset, TensorDataset and DataLoader: batches in sampler order, prefetched.
//
// A Dataset turns a list of sample indices into one Batch (input and target
// tensors whose first dimension is the batch). TensorDataset serves rows of two
// in-memory tensors. The DataLoader walks a DistributedSampler's indices for one
// epoch in order, cuts them into batches and -- with prefetch > 0 -- builds the
// next batches on one background thread into a bounded queue while the trainer
// works on the current one.
//
// With options.device a CUDA device, each batch is staged in pinned host memory and
// copied to the device asynchronously on the device's copy stream (on the prefetch
// thread when prefetch > 0); the compute stream is ordered after the copy with an
// event, so next() hands out device tensors ready to use.
//
// Deliberately not here: multiple worker processes, augmentation (a Dataset can wrap
// another to add it).
//
// Resuming: the loader advances its sampler's position only when next() hands a
// batch to the caller, never when a batch is merely prefetched, so sampler().state()
// is always "what the trainer has consumed" and a checkpoint taken between steps
// resumes exactly.
//
// Thread-safety: a DataLoader is used from one thread. Dataset::get_batch is called
// from the prefetch thread and must be safe to call concurrently with other const
// methods of the same dataset.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::data {

struct Batch {
  Tensor input;   // [B, ...]
  Tensor target;  // [B, ...]
  // The dataset rows of the batch, in order (DataLoader fills it; get_batch need not),
  // so a transform applied later (augmentation on the device batch) can key on them.
  std::vector<int64_t> indices = {};
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  // The samples at `indices`, stacked along a new first dimension, in order.
  // Throws InvalidArgument for an index outside [0, size()).
  virtual Batch get_batch(std::span<const int64_t> indices) const = 0;
};

// Rows of two CPU tensors that share their first dimension (e.g. images [N,1,28,28]
// and labels [N]). get_batch copies the rows with memcpy.
class TensorDataset : public Dataset {
 public:
  // Throws ShapeError unless both are defined, have >= 1 dimension and the same
  // first dimension. Non-contiguous inputs are made contiguous once here.
  TensorDataset(Tensor inputs, Tensor targets);
  int64_t size() const override { return inputs_.size(0); }
  Batch get_batch(std::span<const int64_t> indices) const override;
  const Tensor& inputs() const { return inputs_; }
  const Tensor& targets() const { return targets_; }

 private:
  Tensor inputs_;
  Tensor targets_;
};

// Copies rows `indices` of a contiguous tensor into a new [indices.size(), ...] tensor.
Tensor gather_rows(const Tensor& src, std::span<const int64_t> indices);

struct DataLoaderOptions {
  int64_t prefetch = 2;           // batches built ahead on a background thread; 0 = none, no thread
  bool drop_last = false;         // drop a final batch smaller than batch_size
  Device device = Device::cpu();  // where next() delivers batches (cuda: pinned + async)
};

class DataLoader {
 public:
  // Throws InvalidArgument when batch_size < 1, prefetch < 0, dataset is null or
  // its size differs from the sampler's dataset_size().
  DataLoader(std::shared_ptr<const Dataset> dataset, DistributedSampler sampler, int64_t batch_size,
             DataLoaderOptions options = {});
  ~DataLoader();  // stops and joins the prefetch thread, even mid-epoch
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // Starts an epoch: sampler().set_epoch(epoch), then batches from the sampler's
  // position (0, or a position restored by load_state for this epoch). Abandons an
  // epoch in progress.
  void begin_epoch(int64_t epoch);
  // The next batch of the epoch; false when the epoch is over. An exception thrown
  // while building a batch (on the prefetch thread or not) is rethrown here, once;
  // the epoch then ends. Throws InvalidArgument before the first begin_epoch.
  bool next(Batch& batch);

  // Batches in a whole epoch for this rank (ignores the current position).
  int64_t num_batches() const;
  int64_t batch_size() const { return batch_size_; }

  const DistributedSampler& sampler() const { return sampler_; }
  SamplerState state() const { return sampler_.state(); }
  // Restores the sampler; the next begin_epoch(state.epoch) continues from
  // state.position. Abandons an epoch in progress.
  void load_state(const SamplerState& state);

 private:
  struct Item {
    Batch batch;
    int64_t count = 0;  // samples in the batch
    std::exception_ptr error;
  };
  void stop_worker();
  void worker_loop();
  Item make_item(size_t batch_index) const;  // builds batch i of plan_, catching errors
  size_t plan_batches() const;

  std::shared_ptr<const Dataset> dataset_;
  DistributedSampler sampler_;
  int64_t batch_size_;
  DataLoaderOptions options_;

  // The epoch being served: the remaining indices, cut into batches of batch_size_.
  std::vector<int64_t> plan_;
  size_t next_batch_ = 0;  // consumer side: next batch index to hand out
  bool active_ = false;    // an epoch has begun and not ended
  bool started_ = false;   // begin_epoch has been called at least once

  // Prefetch thread and its queue (guarded by mu_).
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable not_full_;
  std::condition_variable not_empty_;
  std::deque<Item> queue_;
  bool stop_ = false;
  bool worker_done_ = false;
};

}  // namespace dtrain::data
