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

// The caching shared by every allocator that keeps freed blocks (host memory here;
// device and pinned memory in cuda/allocator.h): per-size-class free lists up to
// max_cached bytes, statistics, and one retry after emptying the cache when the
// system is out of memory. Subclasses reach the system through raw_allocate and
// raw_free; a subclass that returns its blocks at destruction calls empty_cache()
// in its own destructor (the base cannot: raw_free is gone by then).
class CachingAllocator : public Allocator {
 public:
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  void* allocate(size_t nbytes) final;
  void deallocate(void* ptr, size_t nbytes) final;

  // Returns every cached block to the system.
  void empty_cache();
  AllocatorStats stats() const;
  // Powers of two and 1.5x powers of two, multiples of 64, at least 64.
  static size_t size_class(size_t nbytes);

 protected:
  // Requests below min_block bytes are served from min_block's size class.
  CachingAllocator(size_t max_cached_bytes, size_t min_block)
      : max_cached_(max_cached_bytes), min_block_(min_block) {}
  ~CachingAllocator() override = default;
  // A block of exactly nbytes (a size class); nullptr when out of memory, throws on
  // other errors.
  virtual void* raw_allocate(size_t nbytes) = 0;
  virtual void raw_free(void* ptr) = 0;
  // Throws the error for `nbytes` that could not be had even with the cache emptied.
  [[noreturn]] virtual void out_of_memory(size_t nbytes) const = 0;

 private:
  size_t block_class(size_t nbytes) const {
    return size_class(nbytes < min_block_ ? min_block_ : nbytes);
  }
  size_t max_cached_;
  size_t min_block_;
  mutable std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // GUARDED_BY(mu_)
  AllocatorStats stats_;                                 // GUARDED_BY(mu_)
};

class CachingHostAllocator final : public CachingAllocator {
 public:
  // Free blocks beyond max_cached_bytes are returned to the system.
  explicit CachingHostAllocator(size_t max_cached_bytes = size_t{1} << 31)
      : CachingAllocator(max_cached_bytes, 64) {}
  ~CachingHostAllocator() override { empty_cache(); }
  Device device() const override { return Device::cpu(); }

 private:
  void* raw_allocate(size_t nbytes) override;  // 64-byte aligned
  void raw_free(void* ptr) override;
  [[noreturn]] void out_of_memory(size_t nbytes) const override;
};

Allocator* default_allocator(Device device);

}  // namespace dtrain
