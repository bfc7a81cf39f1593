#include "mnist_source.h"

#include <fmt/format.h>

#include <algorithm>
#include <span>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "host_values.h"
#include "transfer.h"

namespace dtrain::cli {

namespace {

// Rank 0 prepares (fetch + convert) the demo subset first, the others then read the cache.
MnistOrigin prepare(const MnistSourceOptions& o, comm::Communicator& comm) {
  if (!o.data.empty()) return {o.data, fmt::format("MNIST IDX files from {}", o.data), false};
  const bool lead = comm.rank() == 0;
  auto log_line = [lead](std::string_view line) {
    if (lead) fmt::print(stderr, "{}\n", line);
  };
  data::MnistSubsetResult prep;
  if (lead) prep = data::prepare_mnist_subset(o.data_cache, log_line);
  comm.barrier();
  if (!lead) prep = data::prepare_mnist_subset(o.data_cache, log_line);
  return {prep.dir, prep.source, prep.generated};
}

data::MnistOptions mnist_options(const MnistSourceOptions& o) {
  data::MnistOptions m;
  m.normalize = o.normalize;
  return m;
}

data::DataLoaderOptions loader_options(const MnistSourceOptions& o) {
  data::DataLoaderOptions l;
  l.device = o.device;  // cuda: batches staged in pinned memory, copied ahead
  return l;
}

// One split, restricted to options.classes (labels kept).
data::TensorDataset load_split(const std::string& dir, data::MnistSplit split,
                               const MnistSourceOptions& o) {
  data::MnistDataset d(dir, split, mnist_options(o));
  return filter_classes(data::TensorDataset(d.images(), d.labels()), o.classes,
                        split == data::MnistSplit::kTrain ? "train" : "test");
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

}  // namespace

MnistBatchSource::MnistBatchSource(const MnistSourceOptions& options, comm::Communicator& comm)
    : comm_(comm),
      options_(options),
      origin_(prepare(options, comm)),
      train_(std::make_shared<data::TensorDataset>(
          load_split(origin_.dir, data::MnistSplit::kTrain, options))),
      test_(load_split(origin_.dir, data::MnistSplit::kTest, options)),
      loader_(train_,
              data::DistributedSampler(train_->size(), comm.rank(), comm.size(), options.seed),
              options.local_batch, loader_options(options)) {}

bool MnistBatchSource::next(TrainBatch& batch) {
  data::Batch b;
  if (!loader_.next(b)) return false;
  batch.samples = b.input.size(0) * comm_.size();
  batch.tensors = {std::move(b.input), std::move(b.target)};
  return true;
}

bool MnistBatchSource::epoch_done() const {
  return loader_.sampler().position() >= loader_.sampler().num_samples();
}

// Every rank its share (rows rank, rank + size, ...); the counts are summed over the
// ranks, so every rank returns the global fraction.
Metrics MnistBatchSource::evaluate(nn::Module& model) {
  NoGradGuard ng;
  model.eval();
  int64_t counts[2] = {0, 0};  // correct, seen
  std::vector<int64_t> mine;
  for (int64_t i = comm_.rank(); i < test_.size(); i += comm_.size()) mine.push_back(i);
  const size_t batch = static_cast<size_t>(options_.eval_batch);
  for (size_t start = 0; start < mine.size(); start += batch) {
    size_t end = std::min(mine.size(), start + batch);
    data::Batch b = test_.get_batch(std::span<const int64_t>(mine.data() + start, end - start));
    Tensor logits = model.forward(b.input.to(options_.device)).to(Device::cpu()).contiguous();
    counts[0] += count_correct(logits, b.target);
    counts[1] += logits.size(0);
  }
  on_host_values(options_.device, counts, 2, DType::i64,
                 [&](void* p) { comm_.allreduce(p, 2, DType::i64, comm::ReduceOp::kSum); });
  model.train();
  double accuracy =
      counts[1] > 0 ? static_cast<double>(counts[0]) / static_cast<double>(counts[1]) : 0.0;
  return {{"test_accuracy", accuracy}};
}

Tensor mnist_loss(nn::Module& model, const TrainBatch& batch) {
  DTRAIN_CHECK(batch.tensors.size() == 2, InvalidArgument,
               "mnist_loss: expected a batch {{images, labels}}, got {} tensors",
               batch.tensors.size());
  return cross_entropy(model.forward(batch.tensors[0]), batch.tensors[1]);
}

}  // namespace dtrain::cli
