// Data augmentation on the CPU, and the dispatch to the CUDA kernels (augment.h).
#include "dtrain/engine/data/augment.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <numbers>
#include <thread>

#include "augment_device.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/random.h"

namespace dtrain::data {

namespace {

constexpr const char* kKnown = "crop:PAD, flip[:P], rotate:DEGREES, normalize:MEAN:STD";

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end - start));
    if (end == std::string::npos) return out;
    start = end + 1;
  }
}

double number(const std::string& item, const std::string& text) {
  double v = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  DTRAIN_CHECK(ec == std::errc() && ptr == text.data() + text.size() && std::isfinite(v),
               InvalidArgument, "--augment item '{}': '{}' is not a number", item, text);
  return v;
}

Transform parse_item(const std::string& item) {
  std::vector<std::string> f = split(item, ':');
  const std::string& name = f[0];
  size_t args = f.size() - 1;
  Transform t;
  if (name == "crop" && args == 1) {
    double pad = number(item, f[1]);
    DTRAIN_CHECK(pad >= 0 && pad <= 64 && pad == std::floor(pad), InvalidArgument,
                 "--augment item '{}': the padding must be an integer in [0, 64]", item);
    t.kind = fn::kAugCrop;
    t.pad = static_cast<int32_t>(pad);
  } else if (name == "flip" && args <= 1) {
    t.kind = fn::kAugFlip;
    if (args == 1) t.p = number(item, f[1]);
    DTRAIN_CHECK(t.p >= 0 && t.p <= 1, InvalidArgument,
                 "--augment item '{}': the probability must be in [0, 1]", item);
  } else if (name == "rotate" && args == 1) {
    t.kind = fn::kAugAffine;
    t.degrees = number(item, f[1]);
    DTRAIN_CHECK(t.degrees >= 0 && t.degrees <= 180, InvalidArgument,
                 "--augment item '{}': the angle must be in [0, 180] degrees", item);
  } else if (name == "normalize" && args == 2) {
    t.kind = fn::kAugNormalize;
    t.mean = static_cast<float>(number(item, f[1]));
    t.std = static_cast<float>(number(item, f[2]));
    DTRAIN_CHECK(t.std > 0, InvalidArgument, "--augment item '{}': std must be > 0", item);
  } else {
    DTRAIN_THROW(InvalidArgument, "--augment: unknown or malformed item '{}'; known: {}", item,
                 kKnown);
  }
  return t;
}

// splitmix64: a well-mixed 64-bit key from (seed, epoch, index).
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The inverse map of a counter-clockwise rotation by `degrees` about the image
// centre (torchvision's sense, y pointing down): output pixel -> source pixel,
// src = R(a) (p - centre) + centre.
void rotation_matrix(double degrees, int64_t h, int64_t w, float* m) {
  double a = degrees * std::numbers::pi / 180.0;
  double c = std::cos(a), s = std::sin(a);
  double cx = (static_cast<double>(w) - 1) / 2, cy = (static_cast<double>(h) - 1) / 2;
  m[0] = static_cast<float>(c);
  m[1] = static_cast<float>(-s);
  m[2] = static_cast<float>(cx - c * cx + s * cy);
  m[3] = static_cast<float>(s);
  m[4] = static_cast<float>(c);
  m[5] = static_cast<float>(cy - s * cx - c * cy);
}

}  // namespace

std::string AugmentPipeline::str() const {
  std::vector<std::string> items;
  for (const Transform& t : transforms) {
    switch (t.kind) {
      case fn::kAugCrop:
        items.push_back(fmt::format("crop:{}", t.pad));
        break;
      case fn::kAugFlip:
        items.push_back(t.p == 0.5 ? "flip" : fmt::format("flip:{}", t.p));
        break;
      case fn::kAugAffine:
        items.push_back(fmt::format("rotate:{}", t.degrees));
        break;
      default:
        items.push_back(fmt::format("normalize:{}:{}", t.mean, t.std));
    }
  }
  return fmt::format("{}", fmt::join(items, ","));
}

AugmentPipeline parse_augment(const std::string& spec) {
  AugmentPipeline p;
  if (spec.empty() || spec == "none") return p;
  for (const std::string& item : split(spec, ',')) p.transforms.push_back(parse_item(item));
  return p;
}

fn::AugStage rotation_stage(double degrees, int64_t height, int64_t width) {
  fn::AugStage s;
  s.kind = fn::kAugAffine;
  rotation_matrix(degrees, height, width, s.m);
  return s;
}

std::vector<fn::AugStage> draw_augment_params(const AugmentPipeline& pipeline, int64_t height,
                                              int64_t width, uint64_t seed, int64_t epoch,
                                              int64_t sample_index) {
  Generator gen(mix(seed ^ mix(static_cast<uint64_t>(epoch) ^ mix(sample_index))), 0x41756720);
  std::vector<fn::AugStage> stages;
  for (const Transform& t : pipeline.transforms) {
    fn::AugStage s;
    s.kind = t.kind;
    if (t.kind == fn::kAugCrop) {
      s.pad = t.pad;
      s.dx = static_cast<int32_t>(gen.below(2 * t.pad + 1));
      s.dy = static_cast<int32_t>(gen.below(2 * t.pad + 1));
    } else if (t.kind == fn::kAugFlip) {
      s.flip = gen.uniform() < t.p ? 1 : 0;
    } else if (t.kind == fn::kAugAffine) {
      s = rotation_stage(gen.uniform(-t.degrees, t.degrees), height, width);
    } else {
      s.mean = t.mean;
      s.std = t.std;
    }
    stages.push_back(s);
  }
  return stages;
}

void augment_sample(const std::vector<fn::AugStage>& stages, float* image, int64_t channels,
                    int64_t height, int64_t width, float* scratch) {
  const auto h = static_cast<int32_t>(height), w = static_cast<int32_t>(width);
  for (const fn::AugStage& s : stages) {
    for (int64_t c = 0; c < channels; ++c) {
      float* plane = image + c * height * width;
      std::memcpy(scratch, plane, sizeof(float) * height * width);
      for (int32_t y = 0; y < h; ++y) {
        for (int32_t x = 0; x < w; ++x)
          plane[y * w + x] = fn::augment_pixel(s, scratch, h, w, y, x);
      }
    }
  }
}

namespace {

void check_batch(const Tensor& batch, size_t count) {
  DTRAIN_CHECK(batch.dtype() == DType::f32, DTypeError,
               "augment: expected images f32 [B,C,H,W], got {}", dtype_name(batch.dtype()));
  DTRAIN_CHECK(batch.dim() == 4 && batch.size(0) == static_cast<int64_t>(count), ShapeError,
               "augment: expected images f32 [B,C,H,W] with B = {} sample indices, got {}", count,
               shape_str(batch.shape()));
}

void augment_rows(Tensor& out, std::span<const int64_t> idx, const AugmentPipeline& pipeline,
                  uint64_t seed, int64_t epoch, size_t begin, size_t end) {
  const int64_t c = out.size(1), h = out.size(2), w = out.size(3);
  std::vector<float> scratch(static_cast<size_t>(h * w));
  float* base = out.data<float>();
  for (size_t i = begin; i < end; ++i) {
    auto stages = draw_augment_params(pipeline, h, w, seed, epoch, idx[i]);
    augment_sample(stages, base + static_cast<int64_t>(i) * c * h * w, c, h, w, scratch.data());
  }
}

}  // namespace

Tensor augment_batch(const Tensor& batch, std::span<const int64_t> sample_indices,
                     const AugmentPipeline& pipeline, uint64_t seed, int64_t epoch, int threads) {
  check_batch(batch, sample_indices.size());
  if (!batch.device().is_cpu()) {
    std::vector<fn::AugStage> params;
    for (int64_t idx : sample_indices) {
      auto s = draw_augment_params(pipeline, batch.size(2), batch.size(3), seed, epoch, idx);
      params.insert(params.end(), s.begin(), s.end());
    }
    return augment_on_device(batch, params, pipeline.transforms.size());
  }
  Tensor out = batch.contiguous().clone();
  const size_t n = sample_indices.size();
  const size_t nt =
      std::clamp<size_t>(static_cast<size_t>(std::max(threads, 1)), 1, std::max<size_t>(n, 1));
  std::vector<std::thread> pool;
  for (size_t t = 1; t < nt; ++t) {
    pool.emplace_back(augment_rows, std::ref(out), sample_indices, std::cref(pipeline), seed, epoch,
                      n * t / nt, n * (t + 1) / nt);
  }
  augment_rows(out, sample_indices, pipeline, seed, epoch, 0, n / nt);
  for (std::thread& th : pool) th.join();
  return out;
}

AugmentedDataset::AugmentedDataset(std::shared_ptr<const Dataset> base, AugmentPipeline pipeline,
                                   uint64_t seed, int threads)
    : base_(std::move(base)), pipeline_(std::move(pipeline)), seed_(seed), threads_(threads) {
  DTRAIN_CHECK(base_ != nullptr, InvalidArgument, "AugmentedDataset: the base dataset is null");
  DTRAIN_CHECK(threads_ >= 1, InvalidArgument, "AugmentedDataset: threads must be >= 1, got {}",
               threads_);
}

Batch AugmentedDataset::get_batch(std::span<const int64_t> indices) const {
  Batch b = base_->get_batch(indices);
  b.input = augment(b.input, indices);
  return b;
}

Tensor AugmentedDataset::augment(const Tensor& batch, std::span<const int64_t> indices) const {
  return augment_batch(batch, indices, pipeline_, seed_, epoch_.load(), threads_);
}

}  // namespace dtrain::data
