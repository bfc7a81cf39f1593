// Data augmentation: random crop with padding, horizontal flip, small rotation
// (bilinear), normalisation, as a composable pipeline of transforms.
//
// A Transform says what to do ("crop:2" pads by 2 and crops back at a random
// offset, "flip" mirrors half the samples, "rotate:10" turns by a uniform angle in
// [-10, 10] degrees about the image centre, "normalize:0.1307:0.3081"), an
// AugmentPipeline is a list of them applied in order, like torchvision's Compose.
// Every random draw of a sample comes from a Generator seeded by (seed, epoch,
// sample index) alone (draw_augment_params), so a sample gets the same
// augmentation whichever thread, batch or device processes it: the same seed
// gives the same batches for any number of worker threads, and the CUDA path
// (augment_batch on a device tensor) gives the same bytes as the CPU, because both
// run the per-pixel arithmetic of augment_functors.h with the same draws.
//
// AugmentedDataset wraps a Dataset of images f32 [N,C,H,W] and augments each batch
// the DataLoader asks for on `threads` worker threads (the loader's prefetch
// thread splits the batch over them), so augmentation overlaps training. For a CUDA
// run, a loader over base() delivers the raw batch to the device and augment() runs
// the kernels on it (the rows come from Batch::indices): the same bytes.
//
// Deliberately not here: colour jitter, scale/shear (kAugAffine takes any matrix;
// only rotation draws one), per-channel normalisation.
//
// Thread-safety: the functions share no state. AugmentedDataset::get_batch may
// run concurrently with itself; set_epoch is atomic.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/data/augment_functors.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::data {

struct Transform {
  fn::AugKind kind = fn::kAugNormalize;
  int32_t pad = 0;          // crop
  double p = 0.5;           // flip: probability of mirroring
  double degrees = 0;       // rotate: the angle is uniform in [-degrees, degrees]
  float mean = 0, std = 1;  // normalize
};

struct AugmentPipeline {
  std::vector<Transform> transforms;
  bool empty() const { return transforms.empty(); }
  std::string str() const;  // "crop:2,flip,rotate:10"
};

// Parses "crop:2,flip,rotate:10,normalize:0.1307:0.3081" ("flip:0.3" sets p).
// Throws InvalidArgument naming the bad item and listing the known transforms.
AugmentPipeline parse_augment(const std::string& spec);

// The random draws of every transform for one sample, in pipeline order.
std::vector<fn::AugStage> draw_augment_params(const AugmentPipeline& pipeline, int64_t height,
                                              int64_t width, uint64_t seed, int64_t epoch,
                                              int64_t sample_index);

// The stage of a counter-clockwise rotation by `degrees` about the centre of an
// H x W image (what "rotate" draws an angle for).
fn::AugStage rotation_stage(double degrees, int64_t height, int64_t width);

// Augments one sample in place: `image` points to C planes of H x W floats.
// `scratch` must hold H*W floats.
void augment_sample(const std::vector<fn::AugStage>& stages, float* image, int64_t channels,
                    int64_t height, int64_t width, float* scratch);

// Augments a batch f32 [B,C,H,W] (CPU or CUDA) whose rows are the samples
// `sample_indices` (one per row), returning a new tensor on the same device. The CPU
// path splits the rows over `threads` threads. Throws ShapeError/DTypeError for a
// batch that is not f32 [B,C,H,W] with B == sample_indices.size(), UnsupportedError
// for a device tensor in a build without CUDA.
Tensor augment_batch(const Tensor& batch, std::span<const int64_t> sample_indices,
                     const AugmentPipeline& pipeline, uint64_t seed, int64_t epoch,
                     int threads = 1);

class AugmentedDataset : public Dataset {
 public:
  // Throws InvalidArgument when base is null or threads < 1.
  AugmentedDataset(std::shared_ptr<const Dataset> base, AugmentPipeline pipeline, uint64_t seed,
                   int threads = 1);
  int64_t size() const override { return base_->size(); }
  Batch get_batch(std::span<const int64_t> indices) const override;
  // Augments a batch of base() rows `indices` (CPU or CUDA) as get_batch would: what
  // a loader over base() calls on the device batch (the DataLoader's Batch::indices).
  Tensor augment(const Tensor& batch, std::span<const int64_t> indices) const;
  const std::shared_ptr<const Dataset>& base() const { return base_; }
  // The epoch mixed into every draw; call before the loader starts the epoch.
  void set_epoch(int64_t epoch) { epoch_.store(epoch); }
  const AugmentPipeline& pipeline() const { return pipeline_; }

 private:
  std::shared_ptr<const Dataset> base_;
  AugmentPipeline pipeline_;
  uint64_t seed_;
  int threads_;
  std::atomic<int64_t> epoch_{0};
};

}  // namespace dtrain::data
