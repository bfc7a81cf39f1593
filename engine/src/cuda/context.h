// Per-device state of the CUDA backend and the error-check macros its sources use.
//
// DeviceContext holds what every op on a device shares: the compute stream (created
// non-blocking, so it never synchronises with the legacy default stream), the cuBLAS
// and cuDNN handles bound to that stream and cuBLAS's workspace. context(index)
// creates it on first use; like the caching allocator it is one of the few
// process-wide objects, fixed after creation and safe to use from any thread (the
// handles are only used on the compute stream, whose order is the program order of
// the thread that enqueues; the engine does not drive one device from two threads).
//
// Included by .cc files only (kernels in .cu files include kernels.h instead).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include "dtrain/common/error.h"

namespace dtrain::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file,
                                     int line);

#define DTRAIN_CUDA_CHECK(expr)                                                      \
  do {                                                                               \
    cudaError_t dtrain_cuda_err_ = (expr);                                           \
    if (dtrain_cuda_err_ != cudaSuccess) {                                           \
      ::dtrain::cuda::throw_cuda_error(dtrain_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)

#define DTRAIN_CUBLAS_CHECK(expr)                                                       \
  do {                                                                                  \
    cublasStatus_t dtrain_cublas_st_ = (expr);                                          \
    if (dtrain_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                   \
      ::dtrain::cuda::throw_cublas_error(dtrain_cublas_st_, #expr, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)

struct DeviceContext {
  int index = 0;
  cudaStream_t stream = nullptr;       // compute: every kernel and cuBLAS call
  cudaStream_t copy_stream = nullptr;  // host-to-device batch copies (DataLoader)
  cublasHandle_t cublas = nullptr;
  cudnnHandle_t cudnn = nullptr;  // bound to the compute stream
  void* workspace = nullptr;      // cuBLAS workspace, workspace_bytes on this device
  size_t workspace_bytes = 0;
};

// The context of device `index` (created on first use); throws UnsupportedError
// "no CUDA device: ..." when there is no such device. Also makes `index` the calling
// thread's current device.
DeviceContext& context(int index);

}  // namespace dtrain::cuda
