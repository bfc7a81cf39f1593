#include "dtrain/engine/allocator.h"

#include <cstdlib>
#include <new>

#include "dtrain/common/error.h"
#include "dtrain/engine/cuda/runtime.h"
#ifdef DTRAIN_WITH_CUDA
#include "dtrain/engine/cuda/allocator.h"
#endif

namespace dtrain {

CachingHostAllocator::CachingHostAllocator(size_t max_cached_bytes)
    : max_cached_(max_cached_bytes) {}

CachingHostAllocator::~CachingHostAllocator() { empty_cache(); }

size_t CachingHostAllocator::size_class(size_t nbytes) {
  if (nbytes <= 64) return 64;
  size_t p = 64;
  while (p < nbytes) {
    size_t mid = p + p / 2;
    if (mid >= nbytes) return mid % 64 == 0 ? mid : p * 2;
    p *= 2;
  }
  return p;
}

void* CachingHostAllocator::allocate(size_t nbytes) {
  size_t cls = size_class(nbytes);
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
    ++stats_.system_allocs;
    stats_.bytes_in_use += cls;
  }
  void* p = std::aligned_alloc(64, cls);
  if (p == nullptr) {
    empty_cache();
    p = std::aligned_alloc(64, cls);
  }
  if (p == nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.bytes_in_use -= cls;
    DTRAIN_THROW(InvalidArgument, "out of host memory allocating {} bytes", nbytes);
  }
  return p;
}

void CachingHostAllocator::deallocate(void* ptr, size_t nbytes) {
  if (ptr == nullptr) return;
  size_t cls = size_class(nbytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.bytes_in_use -= cls;
    if (stats_.bytes_cached + cls <= max_cached_) {
      free_[cls].push_back(ptr);
      stats_.bytes_cached += cls;
      return;
    }
  }
  std::free(ptr);
}

void CachingHostAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [cls, blocks] : free_) {
    for (void* p : blocks) std::free(p);
  }
  free_.clear();
  stats_.bytes_cached = 0;
}

AllocatorStats CachingHostAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
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
