#include "dtrain/engine/allocator.h"

#include <cstdlib>
#include <new>

#include "dtrain/common/error.h"
#include "dtrain/engine/cuda/runtime.h"
#ifdef DTRAIN_WITH_CUDA
#include "dtrain/engine/cuda/allocator.h"
#endif

namespace dtrain {

size_t CachingAllocator::size_class(size_t nbytes) {
  if (nbytes <= 64) return 64;
  size_t p = 64;
  while (p < nbytes) {
    size_t mid = p + p / 2;
    if (mid >= nbytes) return mid % 64 == 0 ? mid : p * 2;
    p *= 2;
  }
  return p;
}

void* CachingAllocator::allocate(size_t nbytes) {
  const size_t cls = block_class(nbytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.allocations;
    auto it = free_.find(cls);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      ++stats_.cache_hits;
      stats_.bytes_cached -= cls;
      stats_.bytes_in_use += cls;
      return p;
    }
  }
  void* p = raw_allocate(cls);
  if (p == nullptr) {
    empty_cache();
    p = raw_allocate(cls);
  }
  if (p == nullptr) out_of_memory(nbytes);
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.system_allocs;
  stats_.bytes_in_use += cls;
  return p;
}

void CachingAllocator::deallocate(void* ptr, size_t nbytes) {
  if (ptr == nullptr) return;
  const size_t cls = block_class(nbytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.bytes_in_use -= cls;
    if (stats_.bytes_cached + cls <= max_cached_) {
      free_[cls].push_back(ptr);
      stats_.bytes_cached += cls;
      return;
    }
  }
  raw_free(ptr);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [cls, blocks] : free_) {
    for (void* p : blocks) raw_free(p);
  }
  free_.clear();
  stats_.bytes_cached = 0;
}

AllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void* CachingHostAllocator::raw_allocate(size_t nbytes) {
  return std::aligned_alloc(64, nbytes);  // size classes are multiples of 64
}

void CachingHostAllocator::raw_free(void* ptr) { std::free(ptr); }

void CachingHostAllocator::out_of_memory(size_t nbytes) const {
  DTRAIN_THROW(InvalidArgument, "out of host memory allocating {} bytes", nbytes);
}

Allocator* default_allocator(Device device) {
#ifdef DTRAIN_WITH_CUDA
  if (device.is_cuda()) return cuda::device_allocator(device.index);
#endif
  cuda::require_device(device);      // "no CUDA device: ..." in a build without CUDA
  static CachingHostAllocator host;  // see allocator.h: the one process-wide allocator
  return &host;
}

}  // namespace dtrain
