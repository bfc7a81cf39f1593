// Scratch bytes on the host from the engine's caching allocator, returned on
// destruction (the oneDNN kernels' reorder targets and scratchpads). Not copyable.
#pragma once

#include <algorithm>
#include <cstddef>

#include "dtrain/engine/allocator.h"

namespace dtrain::cpu {

class HostBuffer {
 public:
  explicit HostBuffer(size_t bytes)
      : bytes_(std::max<size_t>(bytes, 1)),
        ptr_(default_allocator(Device::cpu())->allocate(bytes_)) {}
  ~HostBuffer() { default_allocator(Device::cpu())->deallocate(ptr_, bytes_); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  void* get() const { return ptr_; }

 private:
  size_t bytes_;
  void* ptr_;
};

}  // namespace dtrain::cpu
