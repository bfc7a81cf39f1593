// `dtrain infer`: batch inference with a trained model, in eval mode.
//
//   dtrain infer --ckpt FILE | --weights FILE.safetensors [--name-map MAP.json]
//                [--model seed-cnn] [--input IMAGES.idx [--labels LABELS.idx]]
//                [--data DIR] [--batch 256] [--warmup 2] [--threads 1]
//                [--int8 [--calib-batches 4]]
//
// The weights: a `dtrain train --save` checkpoint (--ckpt) or a safetensors file
// (--weights, names mapped as for train --init-from). The samples: an IDX image file
// (--input, with its labels when --labels is given), else the test split of --data or
// of the demo's MNIST subset. Pixels are scaled and normalised exactly as in training.
// Every layer runs in eval mode (dropout off) under NoGradGuard. Prints the accuracy
// (when labels are known), the per-batch latency p50/p90/p99 and the throughput; the
// first --warmup batches run untimed first. An image file whose images are not the
// model's size fails naming the file and both shapes. --int8 quantizes the model first
// (engine/compress/quant.h: the int8 graph), calibrated on --calib-batches batches of the
// MNIST training split of --data or the demo subset (of the --input images with --input).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/compress/quant.h"
#include "dtrain/engine/data/idx.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/engine/threading.h"
#include "transfer.h"

namespace dtrain::cli {

namespace {

struct InferConfig {
  std::string ckpt, weights, name_map, name_prefix;
  std::string model = "seed-cnn";
  std::string input, labels, data, data_cache = "data";
  int64_t batch = 256;
  int64_t warmup = 2;
  int threads = 1;
  bool normalize = true;
  bool int8 = false;
  int64_t calib_batches = 4;
};

struct Samples {
  data::TensorDataset set;
  std::string source;
  bool labelled;
};

// The image size a model takes: [1,H,W] models, or 28x28 for the 784-wide mlp.
Shape image_size(const nn::ModelInfo& info) {
  if (info.input_shape.size() == 3) return {info.input_shape[1], info.input_shape[2]};
  return {28, 28};
}

// --input IDX images (u8 [N,H,W]) -> f32 [N,1,H,W], scaled (and normalised) as MnistDataset.
Tensor images_from_idx(const std::string& path, const nn::ModelInfo& info, bool normalize) {
  data::IdxArray a = data::read_idx_images(path);
  const Shape want = image_size(info);
  DTRAIN_CHECK(a.shape[1] == want[0] && a.shape[2] == want[1], ShapeError,
               "{}: images of {}x{} (file shape {}), but {} expects {}x{} images (input {})", path,
               a.shape[1], a.shape[2], shape_str(a.shape), info.name, want[0], want[1], info.input);
  Tensor x = empty({a.shape[0], 1, a.shape[1], a.shape[2]});
  const uint8_t* src = a.data.data<uint8_t>();
  float* dst = x.data<float>();
  const data::MnistOptions m;
  for (int64_t i = 0; i < x.numel(); ++i) {
    float v = static_cast<float>(src[i]) / 255.0f;
    dst[i] = normalize ? (v - m.mean) / m.std : v;
  }
  return x;
}

Samples load_samples(const InferConfig& c, const nn::ModelInfo& info) {
  DTRAIN_CHECK(info.input_dtype == DType::f32 && shape_numel(info.input_shape) == 784,
               UnsupportedError,
               "dtrain infer: --model {} takes {}; infer reads images (seed-cnn, mlp)", info.name,
               info.input);
  if (!c.input.empty()) {
    Tensor x = images_from_idx(c.input, info, c.normalize);
    if (c.labels.empty())
      return {data::TensorDataset(x, zeros({x.size(0)}, {.dtype = DType::i64})), c.input, false};
    data::IdxArray y = data::read_idx_labels(c.labels);
    DTRAIN_CHECK(y.shape[0] == x.size(0), ShapeError, "{} holds {} labels, but {} holds {} images",
                 c.labels, y.shape[0], c.input, x.size(0));
    Tensor labels = empty({y.shape[0]}, {.dtype = DType::i64});
    for (int64_t i = 0; i < y.shape[0]; ++i) labels.data<int64_t>()[i] = y.data.data<uint8_t>()[i];
    return {data::TensorDataset(x, labels), c.input, true};
  }
  DTRAIN_CHECK(c.labels.empty(), InvalidArgument, "--labels needs --input (the images)");
  std::string dir = c.data, source = "MNIST IDX files from " + c.data;
  if (dir.empty()) {
    data::MnistSubsetResult r = data::prepare_mnist_subset(c.data_cache);
    dir = r.dir;
    source = r.source;
  }
  data::MnistOptions mo;
  mo.normalize = c.normalize;
  data::MnistDataset test(dir, data::MnistSplit::kTest, mo);
  return {data::TensorDataset(test.images(), test.labels()), source + ", test split", true};
}

std::shared_ptr<nn::Module> load_model(const InferConfig& c) {
  DTRAIN_CHECK(c.ckpt.empty() != c.weights.empty(), InvalidArgument,
               "dtrain infer: give exactly one of --ckpt FILE (dtrain train --save) and "
               "--weights FILE.safetensors");
  Generator gen(1);
  std::shared_ptr<nn::Module> model = nn::make_model(c.model, gen);
  if (!c.ckpt.empty()) {
    load_checkpoint(c.ckpt, *model, nullptr);
  } else {
    TransferOptions t{.init_from = c.weights, .name_map = c.name_map, .name_prefix = c.name_prefix};
    nn::load_safetensors(*model, c.weights, import_options(t, *model));
  }
  model->eval();
  return model;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];  // nearest rank
}

int64_t argmax_hits(const Tensor& logits, const Tensor& labels) {
  const float* p = logits.data<float>();
  const int64_t* y = labels.data<int64_t>();
  const int64_t k = logits.size(1);
  int64_t hits = 0;
  for (int64_t r = 0; r < logits.size(0); ++r) {
    hits += std::max_element(p + r * k, p + (r + 1) * k) - (p + r * k) == y[r];
  }
  return hits;
}

// --int8: the calibration batches (training split, or the first samples with --input).
std::vector<Tensor> calibration(const InferConfig& c, const Samples& s, std::string* from) {
  DTRAIN_CHECK(c.calib_batches >= 1, InvalidArgument, "--calib-batches must be >= 1, got {}",
               c.calib_batches);
  std::unique_ptr<data::MnistDataset> train;
  const data::Dataset* set = &s.set;
  *from = "the first samples of " + s.source;
  if (c.input.empty()) {
    std::string dir = c.data.empty() ? data::prepare_mnist_subset(c.data_cache).dir : c.data;
    data::MnistOptions mo;
    mo.normalize = c.normalize;
    train = std::make_unique<data::MnistDataset>(dir, data::MnistSplit::kTrain, mo);
    set = train.get();
    *from = "the training split of " + dir;
  }
  std::vector<Tensor> out;
  for (int64_t b = 0; b < c.calib_batches && b * c.batch < set->size(); ++b) {
    std::vector<int64_t> idx;
    for (int64_t i = b * c.batch; i < std::min(set->size(), (b + 1) * c.batch); ++i) {
      idx.push_back(i);
    }
    out.push_back(set->get_batch(idx).input);
  }
  return out;
}

int run_infer(const InferConfig& c) {
  DTRAIN_CHECK(c.batch >= 1 && c.warmup >= 0, InvalidArgument,
               "--batch must be >= 1 and --warmup >= 0, got {} and {}", c.batch, c.warmup);
  set_num_threads(c.threads);
  const nn::ModelInfo& info = nn::model_info(c.model);
  Samples s = load_samples(c, info);
  std::shared_ptr<nn::Module> model = load_model(c);
  std::function<Tensor(const Tensor&)> forward = [&](const Tensor& x) { return model->forward(x); };
  std::string kind = "f32";
  std::shared_ptr<compress::QuantizedModel> q;
  if (c.int8) {
    auto seq = std::dynamic_pointer_cast<nn::Sequential>(model);
    DTRAIN_CHECK(seq != nullptr, UnsupportedError, "--int8: {} is not a Sequential", c.model);
    std::string from;
    q = std::make_shared<compress::QuantizedModel>(
        compress::QuantizedModel::build(*seq, calibration(c, s, &from)));
    forward = [q](const Tensor& x) { return q->forward(x); };
    kind = fmt::format("int8 ({}, calibrated on {} batches of {})",
                       q->graph() ? "int8 graph" : "per layer: " + q->graph_unavailable(),
                       c.calib_batches, from);
  }
  NoGradGuard no_grad;
  std::vector<int64_t> all(static_cast<size_t>(s.set.size()));
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  auto batch_at = [&](size_t start) {
    size_t n = std::min(all.size() - start, static_cast<size_t>(c.batch));
    return s.set.get_batch(std::span<const int64_t>(all.data() + start, n));
  };
  for (int64_t w = 0; w < c.warmup && !all.empty(); ++w) forward(batch_at(0).input);
  std::vector<double> ms;
  int64_t hits = 0;
  for (size_t start = 0; start < all.size(); start += static_cast<size_t>(c.batch)) {
    data::Batch b = batch_at(start);
    auto t0 = std::chrono::steady_clock::now();
    Tensor logits = forward(b.input).contiguous();
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    hits += argmax_hits(logits, b.target);
  }
  DTRAIN_CHECK(!ms.empty(), InvalidArgument, "dtrain infer: {} holds no sample", s.source);
  double total_ms = 0;
  for (double v : ms) total_ms += v;
  const std::string acc =
      s.labelled ? fmt::format("accuracy {:.4f} ({}/{}), ",
                               static_cast<double>(hits) / s.set.size(), hits, s.set.size())
                 : "";
  fmt::print(
      "dtrain infer: {} {} from {} on {}: {} samples in {} batches of {} (eval mode, {} "
      "thread(s)), "
      "{}latency per batch p50 {:.3f} ms p90 {:.3f} ms p99 {:.3f} ms, throughput {:.0f} "
      "samples/s\n",
      c.model, kind, c.ckpt.empty() ? c.weights : c.ckpt, s.source, s.set.size(), ms.size(),
      c.batch, c.threads, acc, percentile(ms, 0.5), percentile(ms, 0.9), percentile(ms, 0.99),
      1000.0 * static_cast<double>(s.set.size()) / total_ms);
  return 0;
}

}  // namespace

Command add_infer_command(CLI::App& app) {
  auto c = std::make_shared<InferConfig>();
  CLI::App* t = app.add_subcommand("infer", "Batch inference: accuracy, latency, throughput");
  t->add_option("--ckpt", c->ckpt, "A checkpoint written by dtrain train --save");
  t->add_option("--weights", c->weights, "A safetensors file (e.g. dtrain ckpt export)");
  t->add_option("--name-map", c->name_map, "With --weights: JSON {\"their.name\": \"our.name\"}");
  t->add_option("--name-prefix", c->name_prefix, "With --weights: prefix rewrites (features.=0.)");
  t->add_option("--model", c->model, "seed-cnn | mlp")->capture_default_str();
  t->add_option("--input", c->input, "IDX image file (u8 [N,28,28]); default: the MNIST test set");
  t->add_option("--labels", c->labels, "IDX label file for --input (prints the accuracy)");
  t->add_option("--data", c->data, "Folder with MNIST IDX files (its test split)");
  t->add_option("--data-cache", c->data_cache, "The demo subset's cache")->capture_default_str();
  t->add_option("--batch", c->batch, "Batch size")->capture_default_str()->check(kPositive);
  t->add_option("--warmup", c->warmup, "Untimed batches first")->capture_default_str();
  t->add_option("--threads", c->threads, "CPU threads")->capture_default_str()->check(kPositive);
  t->add_flag("!--no-normalize", c->normalize, "Raw [0,1] pixels (as train --no-normalize)");
  t->add_flag("--int8", c->int8, "Quantize to int8 first (post-training, calibrated)");
  t->add_option("--calib-batches", c->calib_batches, "With --int8: calibration batches")
      ->capture_default_str();
  return {t, [c] { return run_infer(*c); }};
}

}  // namespace dtrain::cli
