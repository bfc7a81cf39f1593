#include "compress_local.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <numeric>
#include <span>

#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/serialize.h"

namespace dtrain::cli {

void add_local_data_options(CLI::App* a, LocalDataOptions& d) {
  a->add_option("--data", d.data, "IDX folder (default: the demo's MNIST subset)");
  a->add_option("--data-cache", d.data_cache, "Where the demo's data step caches its files")
      ->capture_default_str();
  a->add_option("--batch", d.batch, "Batch size")->capture_default_str()->check(kPositive);
  a->add_option("--seed", d.seed, "Seed for initialisation and shuffling")->capture_default_str();
}

LocalMnistSource::LocalMnistSource(const LocalDataOptions& o) {
  std::string dir = o.data;
  source_ = fmt::format("MNIST IDX files from {}", o.data);
  if (dir.empty()) {
    auto prep = data::prepare_mnist_subset(o.data_cache,
                                           [](std::string_view line) { spdlog::info("{}", line); });
    dir = prep.dir;
    source_ = prep.source;
  }
  train_ = std::make_shared<data::MnistDataset>(dir, data::MnistSplit::kTrain);
  test_ = std::make_shared<data::MnistDataset>(dir, data::MnistSplit::kTest);
  loader_ = std::make_unique<data::DataLoader>(
      train_, data::DistributedSampler(train_->size(), 0, 1, o.seed), o.batch);
}

bool LocalMnistSource::next(TrainBatch& batch) {
  data::Batch b;
  if (!loader_->next(b)) return false;
  batch.samples = b.input.size(0);
  batch.tensors = {std::move(b.input), std::move(b.target)};
  return true;
}

bool LocalMnistSource::epoch_done() const {
  return loader_->sampler().position() >= loader_->sampler().num_samples();
}

double LocalMnistSource::accuracy(const std::function<Tensor(const Tensor&)>& logits_of) const {
  NoGradGuard ng;
  const int64_t n = test_->size(), step = 500;
  int64_t correct = 0;
  for (int64_t start = 0; start < n; start += step) {
    std::vector<int64_t> idx(static_cast<size_t>(std::min(step, n - start)));
    std::iota(idx.begin(), idx.end(), start);
    data::Batch b = test_->get_batch(idx);
    Tensor logits = logits_of(b.input).contiguous();
    const float* p = logits.data<float>();
    const int64_t* y = b.target.data<int64_t>();
    const int64_t c = logits.size(1);
    for (int64_t r = 0; r < logits.size(0); ++r) {
      correct += std::max_element(p + r * c, p + (r + 1) * c) - (p + r * c) == y[r];
    }
  }
  return n > 0 ? static_cast<double>(correct) / static_cast<double>(n) : 0.0;
}

Metrics LocalMnistSource::evaluate(nn::Module& model) {
  model.eval();
  double acc = accuracy([&](const Tensor& x) { return model.forward(x); });
  model.train();
  return {{"test_accuracy", acc}};
}

std::vector<Tensor> LocalMnistSource::first_train_inputs(int64_t n, int64_t batch) const {
  std::vector<Tensor> out;
  for (int64_t i = 0; i < n && i * batch < train_->size(); ++i) {
    std::vector<int64_t> idx(static_cast<size_t>(std::min(batch, train_->size() - i * batch)));
    std::iota(idx.begin(), idx.end(), i * batch);
    out.push_back(train_->get_batch(idx).input);
  }
  return out;
}

double MaskedLocalPlan::forward_backward(const TrainBatch& batch, const StepFn& step) {
  DTRAIN_CHECK(model_ != nullptr, InvalidArgument,
               "MaskedLocalPlan: forward_backward before prepare");
  StepLoss loss = step(*model_, batch);
  loss.loss.backward();
  return loss.value;
}

void MaskedLocalPlan::optimizer_step(optim::Optimizer& optimizer) {
  if (masks_ != nullptr) masks_->mask_gradients(*model_);
  optimizer.step();
  if (masks_ != nullptr) masks_->apply(*model_);
}

std::string checkpoint_model(const std::string& path) {
  Archive a = load_archive(path);
  const auto& extra = a.metadata.value("extra", nlohmann::json::object());
  return extra.is_object() ? extra.value("model", std::string()) : std::string();
}

std::shared_ptr<nn::Sequential> load_model(const std::string& path, const std::string& model,
                                           const char* flag, nlohmann::json* extra) {
  std::string held = checkpoint_model(path);
  std::string name = model.empty() ? held : model;
  DTRAIN_CHECK(!name.empty(), InvalidArgument,
               "{} {}: the checkpoint does not say which model it holds; pass the model's name",
               flag, path);
  DTRAIN_CHECK(held.empty() || held == name, InvalidArgument,
               "{} {}: the checkpoint holds model '{}', not '{}'", flag, path, held, name);
  DTRAIN_CHECK(name != "seed-lstm" && name != "gpt", InvalidArgument,
               "{} {}: model '{}' is not an MNIST model (seed-cnn, mlp)", flag, path, name);
  Generator gen(0);
  auto m = nn::make_model(name, gen);
  nlohmann::json e = load_checkpoint(path, *m, nullptr);
  if (extra != nullptr) *extra = e;
  return m;
}

TrainStats train_local(std::shared_ptr<nn::Module> model, const LossFn& loss,
                       LocalMnistSource& data, int64_t steps, double lr,
                       const compress::PruneMasks* masks) {
  optim::SGD opt(model->parameters(), optim::SGDOptions(lr).momentum(0.9));
  MaskedLocalPlan plan(masks);
  TrainerOptions options;
  options.max_steps = steps;
  options.epochs =
      std::max<int64_t>(1, (steps + data.steps_per_epoch() - 1) / data.steps_per_epoch());
  options.log_every = std::max<int64_t>(1, steps);
  Trainer trainer({.model = model, .loss = loss, .optimizer = &opt, .data = &data, .plan = &plan},
                  options);
  return trainer.fit();
}

}  // namespace dtrain::cli
