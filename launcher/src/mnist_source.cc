#include "mnist_source.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "host_values.h"
#include "transfer.h"

namespace dtrain::cli {

namespace {

// --classes: both splits restricted to those digits (labels kept; transfer.h).
ImageSplits filtered(ImageSplits s, const std::vector<int64_t>& classes) {
  s.train = filter_classes(s.train, classes, "train");
  s.test = filter_classes(s.test, classes, "test");
  return s;
}

ImageDataOptions image_options(const MnistSourceOptions& o) {
  return {.data = o.data,
          .data_cache = o.data_cache,
          .normalize = o.normalize,
          .raw_train = !o.augment.empty() && o.augment != "none"};
}

// The augmented train split, or null without options.augment. The pipeline ends
// with the data set's normalisation (MNIST's mean/std) when it has one.
std::shared_ptr<data::AugmentedDataset> augmented(const MnistSourceOptions& o,
                                                  const ImageSplits& splits) {
  if (o.augment.empty() || o.augment == "none") return nullptr;
  data::AugmentPipeline p = data::parse_augment(o.augment);
  if (splits.has_stats) {
    data::Transform norm;
    norm.kind = fn::kAugNormalize;
    norm.mean = splits.mean;
    norm.std = splits.std;
    p.transforms.push_back(norm);
  }
  return std::make_shared<data::AugmentedDataset>(splits.train, std::move(p),
                                                  o.seed ^ 0x6175676dULL, o.augment_threads);
}

data::DataLoaderOptions loader_options(const MnistSourceOptions& o) {
  data::DataLoaderOptions l;
  l.device = o.device;  // cuda: batches staged in pinned memory, copied ahead
  return l;
}

// Correct argmax predictions among the rows of logits [B,C] (on the CPU).
int64_t count_correct(const Tensor& logits, const Tensor& labels) {
  const float* p = logits.data<float>();
  const int64_t* y = labels.data<int64_t>();
  const int64_t c = logits.size(1);
  int64_t correct = 0;
  for (int64_t r = 0; r < logits.size(0); ++r) {
    int64_t best = 0;
    for (int64_t j = 1; j < c; ++j) {
      if (p[r * c + j] > p[r * c + best]) best = j;
    }
    correct += best == y[r];
  }
  return correct;
}

// The summed cross-entropy of the rows (log-sum-exp with the row's max taken out).
double sum_cross_entropy(const Tensor& logits, const Tensor& labels) {
  const float* p = logits.data<float>();
  const int64_t* y = labels.data<int64_t>();
  const int64_t c = logits.size(1);
  double sum = 0;
  for (int64_t r = 0; r < logits.size(0); ++r) {
    const float* row = p + r * c;
    double top = row[0], total = 0;
    for (int64_t j = 1; j < c; ++j) top = std::max<double>(top, row[j]);
    for (int64_t j = 0; j < c; ++j) total += std::exp(double(row[j]) - top);
    sum += top + std::log(total) - double(row[y[r]]);
  }
  return sum;
}

}  // namespace

MnistBatchSource::MnistBatchSource(const MnistSourceOptions& options, comm::Communicator& comm)
    : comm_(comm),
      options_(options),
      splits_(filtered(load_image_splits(image_options(options), comm), options.classes)),
      origin_{splits_.dir, splits_.source, splits_.generated},
      aug_(augmented(options, splits_)),
      augment_on_device_(aug_ && options.device.is_cuda()),
      train_(aug_ && !augment_on_device_ ? aug_ : splits_.train),
      test_(splits_.test),
      loader_(train_,
              data::DistributedSampler(train_->size(), comm.rank(), comm.size(), options.seed),
              options.local_batch, loader_options(options)) {}

bool MnistBatchSource::next(TrainBatch& batch) {
  data::Batch b;
  if (!loader_.next(b)) return false;
  if (augment_on_device_) b.input = aug_->augment(b.input, b.indices);  // CUDA kernels
  batch.samples = b.input.size(0) * comm_.size();
  batch.tensors = {std::move(b.input), std::move(b.target)};
  return true;
}

bool MnistBatchSource::epoch_done() const {
  return loader_.sampler().position() >= loader_.sampler().num_samples();
}

// Every rank its share (rows rank, rank + size, ...); the counts are summed over the
// ranks, so every rank returns the global fraction (and the mean test loss).
Metrics MnistBatchSource::evaluate(nn::Module& model) {
  NoGradGuard ng;
  model.eval();
  int64_t counts[2] = {0, 0};  // correct, seen
  double loss_sum = 0;
  std::vector<int64_t> mine;
  for (int64_t i = comm_.rank(); i < test_->size(); i += comm_.size()) mine.push_back(i);
  const size_t batch = static_cast<size_t>(options_.eval_batch);
  const auto batches = static_cast<int64_t>((mine.size() + batch - 1) / batch);
  eval_progress(0, batches);  // the bar's clock starts before the first batch
  for (size_t start = 0; start < mine.size(); start += batch) {
    size_t end = std::min(mine.size(), start + batch);
    data::Batch b = test_->get_batch(std::span<const int64_t>(mine.data() + start, end - start));
    Tensor logits = model.forward(b.input.to(options_.device)).to(Device::cpu()).contiguous();
    counts[0] += count_correct(logits, b.target);
    counts[1] += logits.size(0);
    loss_sum += sum_cross_entropy(logits, b.target);
    eval_progress(static_cast<int64_t>(start / batch) + 1, batches);
  }
  on_host_values(options_.device, counts, 2, DType::i64,
                 [&](void* p) { comm_.allreduce(p, 2, DType::i64, comm::ReduceOp::kSum); });
  on_host_values(options_.device, &loss_sum, 1, DType::f64,
                 [&](void* p) { comm_.allreduce(p, 1, DType::f64, comm::ReduceOp::kSum); });
  model.train();
  double accuracy =
      counts[1] > 0 ? static_cast<double>(counts[0]) / static_cast<double>(counts[1]) : 0.0;
  const double loss = counts[1] > 0 ? loss_sum / static_cast<double>(counts[1]) : 0.0;
  return {{"test_accuracy", accuracy}, {"test_loss", loss}};
}

Tensor mnist_loss(nn::Module& model, const TrainBatch& batch) {
  DTRAIN_CHECK(batch.tensors.size() == 2, InvalidArgument,
               "mnist_loss: expected a batch {{images, labels}}, got {} tensors",
               batch.tensors.size());
  return cross_entropy(model.forward(batch.tensors[0]), batch.tensors[1]);
}

}  // namespace dtrain::cli
