// Gradient compression for DDP's bucket all-reduce (DdpOptions::compression).
//
// A BucketCompressor averages one f32 gradient bucket over a communicator, sending
// less than the f32 values:
// - bf16 / fp16: the bucket is cast to the 16-bit type, all-reduced (kSum) in that
//   dtype -- the communicator combines 16-bit values in float and rounds once per
//   hop, as PyTorch's bf16_compress_hook / fp16_compress_hook do -- then cast back to
//   f32 and divided by the world size in f32. Half the bytes on the wire; works on the
//   CPU and on CUDA (the casts are engine copies, queued like DDP's own packing).
// - powersgd (rank r, after PyTorch's powerSGD_hook with error feedback and warm
//   start): every parameter of 2 or more dims whose rank-r factors are smaller than it
//   is viewed as a matrix M [rows, cols] (cols = the product of the other dims) and
//   approximated as P Q^T: P = M Q is all-reduced, orthonormalised, Q = M^T P is
//   all-reduced and averaged. The rest of the bucket (biases, small matrices) is
//   all-reduced uncompressed. What the approximation drops is kept per rank (the
//   error) and added to the next step's gradient, so nothing is lost for good. Q
//   starts from the same seeded random matrix on every rank. Host memory only.
//
// The first collective starts in launch() (from DDP's gradient hooks, so it overlaps
// backward); PowerSGD's second all-reduce (Q) is issued from Work::wait(). Every rank
// must launch and wait its buckets in the same order (DDP does).
//
// Not here: top-k sparsification, compressing non-f32 buckets.
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::parallel {

enum class GradCompression { kNone, kBf16, kFp16, kPowerSgd };

// "none", "bf16", "fp16", "powersgd".
const char* grad_compression_name(GradCompression kind);
// The inverse of grad_compression_name; InvalidArgument naming the accepted values.
GradCompression parse_grad_compression(std::string_view name);

struct GradCompressionOptions {
  GradCompression kind = GradCompression::kNone;
  int powersgd_rank = 2;       // rank of PowerSGD's approximation (>= 1)
  uint64_t powersgd_seed = 0;  // Q's initial values (must match on every rank)
};

// Thread-safety: one thread at a time (DDP's training thread).
class BucketCompressor {
 public:
  virtual ~BucketCompressor() = default;
  // Starts averaging `flat` (the bucket's contiguous 1-D f32 buffer) over comm. Once
  // the returned Work's wait() has returned, flat holds the (compressed) average.
  // REQUIRES: flat and comm stay alive until then; flat is the same buffer every step.
  virtual std::shared_ptr<comm::Work> launch(comm::Communicator& comm, const Tensor& flat) = 0;
};

// The compressor of one bucket holding parameters of `shapes` (in buffer order) of
// dtype f32 on `device`; nullptr for kNone. Throws InvalidArgument for another dtype
// or a powersgd_rank < 1, UnsupportedError for powersgd on a non-CPU device.
std::unique_ptr<BucketCompressor> make_bucket_compressor(const GradCompressionOptions& options,
                                                         const std::vector<Shape>& shapes,
                                                         DType dtype, Device device);

}  // namespace dtrain::parallel
