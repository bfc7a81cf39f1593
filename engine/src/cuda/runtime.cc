// The CUDA runtime layer: device queries, versions, per-device contexts (compute
// stream, cuBLAS handle) and the error functions every CUDA source uses.
#include "dtrain/engine/cuda/runtime.h"

#include <cudnn.h>
#include <fmt/format.h>
#include <nccl.h>

#include <array>
#include <memory>
#include <mutex>

#include "cuda/context.h"
#include "cuda/kernels.h"
#include "dtrain/engine/cuda/allocator.h"

namespace dtrain::cuda {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw UnsupportedError(fmt::format("CUDA error {} ({}): {} in {}", static_cast<int>(err),
                                     cudaGetErrorName(err), cudaGetErrorString(err), expr),
                         file, line);
}

void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line) {
  throw UnsupportedError(fmt::format("cuBLAS error {} ({}): {}", static_cast<int>(st),
                                     cublasGetStatusString(st), expr),
                         file, line);
}

void throw_unsupported_dtype(const char* op, DType dt) {
  DTRAIN_THROW(UnsupportedError, "{} on CUDA: dtype {} is not supported", op, dtype_name(dt));
}

void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  DTRAIN_CHECK(err == cudaSuccess, UnsupportedError, "CUDA kernel launch failed in {}: {} ({})", op,
               cudaGetErrorString(err), cudaGetErrorName(err));
}

bool built_with_cuda() { return true; }

namespace {

struct Query {
  int count = 0;
  cudaError_t err = cudaSuccess;
};

Query query() {
  Query q;
  q.err = cudaGetDeviceCount(&q.count);
  if (q.err != cudaSuccess) {
    q.count = 0;
    (void)cudaGetLastError();  // clear it: the query's failure is reported, not sticky
  }
  return q;
}

std::string version_str(int v, int major_div, int minor_div) {
  return fmt::format("{}.{}", v / major_div, (v % major_div) / minor_div);
}

}  // namespace

int device_count() { return query().count; }

std::string device_error() {
  Query q = query();
  if (q.err != cudaSuccess) return cudaGetErrorString(q.err);
  if (q.count == 0) return "no CUDA-capable device is detected";
  return "";
}

void require_device(const Device& device) {
  if (device.is_cpu()) return;
  Query q = query();
  DTRAIN_CHECK(
      q.count > 0, UnsupportedError, "no CUDA device: {}",
      q.err != cudaSuccess ? cudaGetErrorString(q.err) : "no CUDA-capable device is detected");
  DTRAIN_CHECK(device.index >= 0 && device.index < q.count, UnsupportedError,
               "no CUDA device: {} requested but {} device(s) are visible (CUDA_VISIBLE_DEVICES)",
               device.str(), q.count);
}

std::vector<DeviceInfo> devices() {
  std::vector<DeviceInfo> out;
  int n = device_count();
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    DTRAIN_CUDA_CHECK(cudaGetDeviceProperties(&p, i));
    out.push_back(DeviceInfo{i, p.name, p.major, p.minor, p.totalGlobalMem, p.multiProcessorCount});
  }
  return out;
}

Versions versions() {
  Versions v;
  int d = 0;
  v.driver = cudaDriverGetVersion(&d) == cudaSuccess && d > 0 ? version_str(d, 1000, 10) : "none";
  int r = 0;
  v.runtime = cudaRuntimeGetVersion(&r) == cudaSuccess ? version_str(r, 1000, 10) : "unknown";
  int maj = 0, min = 0, pat = 0;
  cublasGetProperty(MAJOR_VERSION, &maj);
  cublasGetProperty(MINOR_VERSION, &min);
  cublasGetProperty(PATCH_LEVEL, &pat);
  v.cublas = fmt::format("{}.{}.{}", maj, min, pat);
  size_t dn = cudnnGetVersion();  // major * 10000 + minor * 100 + patch (cuDNN 9)
  v.cudnn = fmt::format("{}.{}.{}", dn / 10000, (dn % 10000) / 100, dn % 100);
  int nv = 0;
  v.nccl = ncclGetVersion(&nv) == ncclSuccess
               ? fmt::format("{}.{}.{}", nv / 10000, (nv % 10000) / 100, nv % 100)
               : "unknown";
  return v;
}

DeviceContext& context(int index) {
  // See context.h: created once per device, then only read.
  static std::mutex mu;
  static std::array<std::unique_ptr<DeviceContext>, 64> contexts;
  DTRAIN_CHECK(index >= 0 && index < static_cast<int>(contexts.size()), UnsupportedError,
               "cuda:{}: dtrain supports devices 0 to {} per process", index, contexts.size() - 1);
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = contexts[static_cast<size_t>(index)];
  if (!slot) require_device(Device::cuda(index));
  DTRAIN_CUDA_CHECK(cudaSetDevice(index));
  if (!slot) {
    auto ctx = std::make_unique<DeviceContext>();
    ctx->index = index;
    DTRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
    DTRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->copy_stream, cudaStreamNonBlocking));
    DTRAIN_CUBLAS_CHECK(cublasCreate(&ctx->cublas));
    DTRAIN_CUBLAS_CHECK(cublasSetStream(ctx->cublas, ctx->stream));
    cudnnStatus_t st = cudnnCreate(&ctx->cudnn);
    DTRAIN_CHECK(st == CUDNN_STATUS_SUCCESS, UnsupportedError, "cuDNN: cudnnCreate failed: {}",
                 cudnnGetErrorString(st));
    st = cudnnSetStream(ctx->cudnn, ctx->stream);
    DTRAIN_CHECK(st == CUDNN_STATUS_SUCCESS, UnsupportedError, "cuDNN: cudnnSetStream failed: {}",
                 cudnnGetErrorString(st));
    ctx->workspace_bytes = size_t{32} << 20;
    ctx->workspace = device_allocator(index)->allocate(ctx->workspace_bytes);
    DTRAIN_CUBLAS_CHECK(cublasSetWorkspace(ctx->cublas, ctx->workspace, ctx->workspace_bytes));
    slot = std::move(ctx);
  }
  return *slot;
}

void synchronize(const Device& device) {
  if (!device.is_cuda()) return;
  DTRAIN_CUDA_CHECK(cudaStreamSynchronize(context(device.index).stream));
}

void* compute_stream(const Device& device) {
  require_device(device);
  DTRAIN_CHECK(device.is_cuda(), UnsupportedError, "no CUDA device: {} has no compute stream",
               device.str());
  return context(device.index).stream;
}

// ---- allocators (allocator.h) ----

void CachingCudaAllocator::out_of_memory(size_t nbytes) const {
  DTRAIN_THROW(UnsupportedError,
               "out of memory on {} allocating {} bytes (after freeing the cache)", device().str(),
               nbytes);
}

CachingDeviceAllocator::CachingDeviceAllocator(int index, size_t max_cached_bytes)
    : CachingCudaAllocator(max_cached_bytes), index_(index) {}

void* CachingDeviceAllocator::raw_allocate(size_t nbytes) {
  DTRAIN_CUDA_CHECK(cudaSetDevice(index_));
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, nbytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return nullptr;
  }
  DTRAIN_CUDA_CHECK(err);
  return p;
}

void CachingDeviceAllocator::raw_free(void* ptr) {
  // Frees run after the work that used the block: cudaFree synchronises the device.
  cudaError_t err = cudaFree(ptr);
  (void)err;  // at process exit the driver may already be gone; nothing to report then
}

PinnedHostAllocator::PinnedHostAllocator(size_t max_cached_bytes)
    : CachingCudaAllocator(max_cached_bytes) {}

void* PinnedHostAllocator::raw_allocate(size_t nbytes) {
  void* p = nullptr;
  cudaError_t err = cudaHostAlloc(&p, nbytes, cudaHostAllocPortable);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return nullptr;
  }
  DTRAIN_CUDA_CHECK(err);
  return p;
}

void PinnedHostAllocator::raw_free(void* ptr) {
  cudaError_t err = cudaFreeHost(ptr);
  (void)err;
}

CachingDeviceAllocator* device_allocator(int index) {
  // The process-wide device caches (allocator.h explains why these exist).
  static std::mutex mu;
  static std::array<std::unique_ptr<CachingDeviceAllocator>, 64> allocators;
  DTRAIN_CHECK(index >= 0 && index < static_cast<int>(allocators.size()), UnsupportedError,
               "cuda:{}: dtrain supports devices 0 to {} per process", index,
               allocators.size() - 1);
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = allocators[static_cast<size_t>(index)];
  if (!slot) {
    require_device(Device::cuda(index));
    slot = std::make_unique<CachingDeviceAllocator>(index);
  }
  return slot.get();
}

PinnedHostAllocator* pinned_allocator() {
  static PinnedHostAllocator pinned;
  return &pinned;
}

}  // namespace dtrain::cuda
