// TensorDataset and DataLoader; see loader.h.
#include "dtrain/engine/data/loader.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "dtrain/common/error.h"
#include "dtrain/engine/cuda/runtime.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain::data {

Tensor gather_rows(const Tensor& src, std::span<const int64_t> indices) {
  DTRAIN_CHECK(src.defined() && src.dim() >= 1, ShapeError,
               "gather_rows: need a tensor with at least one dimension");
  DTRAIN_CHECK(src.is_contiguous(), InvalidArgument, "gather_rows: source must be contiguous");
  const int64_t n = src.size(0);
  Shape shape = src.shape();
  shape[0] = static_cast<int64_t>(indices.size());
  Tensor out = empty(shape, src.options());
  const size_t row_bytes = n == 0 ? 0 : src.nbytes() / static_cast<size_t>(n);
  const char* sp = static_cast<const char*>(src.raw_data());
  char* dp = static_cast<char*>(out.raw_data());
  for (size_t i = 0; i < indices.size(); ++i) {
    const int64_t r = indices[i];
    DTRAIN_CHECK(r >= 0 && r < n, InvalidArgument, "gather_rows: index {} is outside [0, {})", r,
                 n);
    std::memcpy(dp + i * row_bytes, sp + static_cast<size_t>(r) * row_bytes, row_bytes);
  }
  return out;
}

TensorDataset::TensorDataset(Tensor inputs, Tensor targets) {
  DTRAIN_CHECK(inputs.defined() && targets.defined(), ShapeError,
               "TensorDataset: inputs and targets must both be defined");
  DTRAIN_CHECK(inputs.dim() >= 1 && targets.dim() >= 1, ShapeError,
               "TensorDataset: inputs {} and targets {} need a sample dimension",
               shape_str(inputs.shape()), shape_str(targets.shape()));
  DTRAIN_CHECK(inputs.size(0) == targets.size(0), ShapeError,
               "TensorDataset: inputs {} and targets {} differ in the number of samples",
               shape_str(inputs.shape()), shape_str(targets.shape()));
  inputs_ = inputs.contiguous();
  targets_ = targets.contiguous();
}

Batch TensorDataset::get_batch(std::span<const int64_t> indices) const {
  return {gather_rows(inputs_, indices), gather_rows(targets_, indices)};
}

DataLoader::DataLoader(std::shared_ptr<const Dataset> dataset, DistributedSampler sampler,
                       int64_t batch_size, DataLoaderOptions options)
    : dataset_(std::move(dataset)),
      sampler_(std::move(sampler)),
      batch_size_(batch_size),
      options_(options) {
  DTRAIN_CHECK(dataset_ != nullptr, InvalidArgument, "DataLoader: dataset is null");
  cuda::require_device(options.device);  // "no CUDA device: ..." before any epoch
  DTRAIN_CHECK(batch_size >= 1, InvalidArgument, "DataLoader: batch_size must be >= 1, got {}",
               batch_size);
  DTRAIN_CHECK(options.prefetch >= 0, InvalidArgument, "DataLoader: prefetch must be >= 0, got {}",
               options.prefetch);
  DTRAIN_CHECK(dataset_->size() == sampler_.dataset_size(), InvalidArgument,
               "DataLoader: the dataset holds {} samples but the sampler was made for {}",
               dataset_->size(), sampler_.dataset_size());
}

DataLoader::~DataLoader() { stop_worker(); }

int64_t DataLoader::num_batches() const {
  const int64_t n = sampler_.num_samples();
  return options_.drop_last ? n / batch_size_ : (n + batch_size_ - 1) / batch_size_;
}

size_t DataLoader::plan_batches() const {
  const size_t n = plan_.size();
  const auto bs = static_cast<size_t>(batch_size_);
  return options_.drop_last ? n / bs : (n + bs - 1) / bs;
}

DataLoader::Item DataLoader::make_item(size_t batch_index) const {
  Item item;
  const size_t begin = batch_index * static_cast<size_t>(batch_size_);
  const size_t count = std::min(static_cast<size_t>(batch_size_), plan_.size() - begin);
  try {
    item.batch = dataset_->get_batch(std::span<const int64_t>(plan_.data() + begin, count));
    item.batch.indices.assign(plan_.begin() + static_cast<std::ptrdiff_t>(begin),
                              plan_.begin() + static_cast<std::ptrdiff_t>(begin + count));
    item.count = static_cast<int64_t>(count);
#ifdef DTRAIN_WITH_CUDA
    if (options_.device.is_cuda()) {
      item.batch.input = cuda::to_device_async(item.batch.input, options_.device);
      item.batch.target = cuda::to_device_async(item.batch.target, options_.device);
    }
#endif
  } catch (...) {
    item.error = std::current_exception();
  }
  return item;
}

void DataLoader::worker_loop() {
  const size_t total = plan_batches();
  for (size_t i = 0; i < total; ++i) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      not_full_.wait(
          lock, [&] { return stop_ || queue_.size() < static_cast<size_t>(options_.prefetch); });
      if (stop_) break;
    }
    Item item = make_item(i);  // built without the lock
    const bool failed = item.error != nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) break;
      queue_.push_back(std::move(item));
    }
    not_empty_.notify_one();
    if (failed) break;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    worker_done_ = true;
  }
  not_empty_.notify_one();
}

void DataLoader::stop_worker() {
  if (worker_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    not_full_.notify_all();
    worker_.join();
  }
  queue_.clear();
  stop_ = false;
  worker_done_ = false;
}

void DataLoader::begin_epoch(int64_t epoch) {
  stop_worker();
  sampler_.set_epoch(epoch);
  plan_ = sampler_.remaining_indices();
  next_batch_ = 0;
  active_ = true;
  started_ = true;
  if (options_.prefetch > 0 && plan_batches() > 0) {
    worker_ = std::thread([this] { worker_loop(); });
  }
}

bool DataLoader::next(Batch& batch) {
  DTRAIN_CHECK(started_, InvalidArgument, "DataLoader::next: call begin_epoch(epoch) first");
  if (!active_) return false;
  Item item;
  if (options_.prefetch == 0) {
    if (next_batch_ >= plan_batches()) {
      active_ = false;
      return false;
    }
    item = make_item(next_batch_);
  } else {
    std::unique_lock<std::mutex> lock(mu_);
    not_empty_.wait(lock, [&] { return !queue_.empty() || worker_done_ || !worker_.joinable(); });
    if (queue_.empty()) {
      lock.unlock();
      active_ = false;
      stop_worker();
      return false;
    }
    item = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    not_full_.notify_one();
  }
  if (item.error) {
    active_ = false;
    stop_worker();
    std::rethrow_exception(item.error);
  }
  sampler_.advance(item.count);
  ++next_batch_;
  batch = std::move(item.batch);
  return true;
}

void DataLoader::load_state(const SamplerState& state) {
  stop_worker();
  active_ = false;
  sampler_.load_state(state);
}

}  // namespace dtrain::data
