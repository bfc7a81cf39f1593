// Memory of the CUDA backend: a caching allocator per device (cudaMalloc, never
// managed memory) and a caching allocator of pinned host memory (cudaHostAlloc) for
// the DataLoader's asynchronous host-to-device copies.
//
// Both keep freed blocks in per-size-class free lists (the size classes of
// CachingHostAllocator) and hand them out again, so a training step that allocates the
// same shapes every iteration stops calling cudaMalloc/cudaFree after the first step.
// When cudaMalloc fails, the cache is emptied and the allocation retried once; a
// second failure throws UnsupportedError naming the size and the device.
//
// Stream safety of the device cache: every kernel of a device runs on that device's
// compute stream (runtime.h), so a block freed by the host after enqueuing its last
// use may be handed to the next op on the same stream without a sync. Work on another
// stream that writes a recycled block (the DataLoader's copy stream) first waits for
// the compute stream (data/loader.h).
//
// Thread-safety: allocate/deallocate/stats are safe from any thread.
#pragma once

#include <cstddef>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "dtrain/engine/allocator.h"

namespace dtrain::cuda {

// Device and pinned memory on the shared caching (allocator.h), with 512-byte minimum
// blocks. Blocks live until process exit (the driver may be gone by the time static
// destructors run), so no destructor empties the cache.
class CachingCudaAllocator : public CachingAllocator {
 protected:
  explicit CachingCudaAllocator(size_t max_cached_bytes)
      : CachingAllocator(max_cached_bytes, 512) {}
  [[noreturn]] void out_of_memory(size_t nbytes) const override;
};

class CachingDeviceAllocator final : public CachingCudaAllocator {
 public:
  explicit CachingDeviceAllocator(int index, size_t max_cached_bytes = ~size_t{0});
  Device device() const override { return Device::cuda(index_); }

 private:
  void* raw_allocate(size_t nbytes) override;
  void raw_free(void* ptr) override;
  int index_;
};

// cudaHostAlloc (page-locked, portable) host memory; device() is the CPU.
class PinnedHostAllocator final : public CachingCudaAllocator {
 public:
  explicit PinnedHostAllocator(size_t max_cached_bytes = size_t{1} << 30);
  Device device() const override { return Device::cpu(); }

 private:
  void* raw_allocate(size_t nbytes) override;
  void raw_free(void* ptr) override;
};

// The process-wide allocators (see default_allocator in allocator.h). device_allocator
// throws UnsupportedError "no CUDA device: ..." for a device that does not exist.
CachingDeviceAllocator* device_allocator(int index);
PinnedHostAllocator* pinned_allocator();

}  // namespace dtrain::cuda
