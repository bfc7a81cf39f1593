// Every op on a backend against the CPU reference, forward and backward, on random
// odd shapes: the engine of `dtrain doctor` and of the GPU tests (tests/test_cuda.cc).
//
// For a CUDA device the reference is the CPU backend in f32 on the same inputs rounded
// to the checked dtype; for the CPU itself (f32) it is the CPU backend in f64. Errors
// are relative in the max norm: max|got - want| / max|want|, NaN counting as infinite.
// Before each op the device's allocator cache is filled with blocks of NaN, so an
// output element a kernel forgets to write shows up as a failure.
//
// Tolerances (tolerance()): f32 1e-5 (also the CPU's own f32 check against f64), tf32
// 1e-3, f16 5e-3, bf16 1e-2.
//
// Built in every configuration: without CUDA only the CPU backend can be checked.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/engine/tensor.h"

namespace dtrain::check {

// How a backend computes f32 GEMMs in a check: strict f32 or TF32 tensor cores.
enum class Precision { kNative, kTf32 };

struct Result {
  std::string op;       // "softmax(dim=0) [6,3,4]"
  std::string backend;  // "cpu", "cuda:0"
  std::string dtype;    // "f32", "tf32", "bf16", "f16"
  double forward_error = 0;
  double backward_error = 0;
  bool checked_backward = false;  // false: an op without backward (optimizer steps), or TF32
  double tolerance = 0;
  bool passed = false;
  bool skipped = false;  // the op does not exist for this backend/dtype (note says why)
  std::string note;
};

double tolerance(const Device& device, DType dtype, Precision precision);

// max|got - want| / max|want| over all elements (both moved to the CPU in f64); infinity
// when the shapes differ or got has a NaN/inf that want does not.
double max_relative_error(const Tensor& got, const Tensor& want);

// Runs every op of the check list on `device` in `dtype` (Precision::kTf32: the GEMM
// ops only). Never throws for an op: an op that throws is a failed (or, for
// UnsupportedError, a skipped) result carrying the message.
std::vector<Result> run_all(const Device& device, DType dtype, Precision precision,
                            uint64_t seed = 1234);

// Fills the cache of `device`'s allocator with NaN blocks of assorted sizes (a no-op for
// the CPU, whose outputs the CPU kernels always write).
void poison_allocator_cache(const Device& device);

}  // namespace dtrain::check
