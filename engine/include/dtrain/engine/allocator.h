// Memory for tensor storage.
//
// CachingHostAllocator keeps freed blocks in per-size-class free lists and hands
// them out again, so a training step that allocates the same shapes every
// iteration stops calling malloc after the first step. Sizes are rounded up to
// size classes (powers of two and 1.5x powers of two, at least 64 bytes) so that
// slightly different requests share blocks. Blocks are 64-byte aligned for SIMD.
//
// Thread-safety: allocate/deallocate are safe to call from any thread (the
// DataLoader's prefetch thread allocates batches).
//
// default_allocator(device) returns the process-wide allocator for a device. It is
// the one deliberate process-wide object in the engine, like a CUDA context: its
// configuration is fixed and its cache is internally synchronised.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "dtrain/engine/device.h"

namespace dtrain {

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t nbytes) = 0;
  // REQUIRES: ptr came from allocate(nbytes) on this allocator.
  virtual void deallocate(void* ptr, size_t nbytes) = 0;
  virtual Device device() const = 0;
};

struct AllocatorStats {
  uint64_t allocations = 0;    // calls to allocate
  uint64_t cache_hits = 0;     // served from the free lists
  uint64_t system_allocs = 0;  // went to the system allocator
  size_t bytes_in_use = 0;
  size_t bytes_cached = 0;
};

class CachingHostAllocator final : public Allocator {
 public:
  // Free blocks beyond max_cached_bytes are returned to the system.
  explicit CachingHostAllocator(size_t max_cached_bytes = size_t{1} << 31);
  ~CachingHostAllocator() override;
  CachingHostAllocator(const CachingHostAllocator&) = delete;
  CachingHostAllocator& operator=(const CachingHostAllocator&) = delete;

  void* allocate(size_t nbytes) override;
  void deallocate(void* ptr, size_t nbytes) override;
  Device device() const override { return Device::cpu(); }

  // Returns every cached block to the system.
  void empty_cache();
  AllocatorStats stats() const;
  static size_t size_class(size_t nbytes);

 private:
  size_t max_cached_;
  mutable std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // GUARDED_BY(mu_)
  AllocatorStats stats_;                                 // GUARDED_BY(mu_)
};

Allocator* default_allocator(Device device);

}  // namespace dtrain
