// on_host_values: a collective on a few host values, whatever memory the
// communicator reads. A cuda run's communicator (nccl) reads device memory only, so
// there the values travel through a small device tensor; on the CPU the collective
// gets the host pointer. For counters and scalars (a logged loss, a step number),
// never for bulk data.
#pragma once

#include <cstdint>
#include <cstring>

#include "dtrain/engine/device.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::cli {

// Calls collective(p) with p pointing at the n values (of dtype) in the memory of
// `device`, and copies the result back into values.
template <typename F>
void on_host_values(const Device& device, void* values, int64_t n, DType dtype, F&& collective) {
  if (device.is_cpu()) {
    collective(values);
    return;
  }
  Tensor host = empty({n}, TensorOptions{dtype, Device::cpu()});
  std::memcpy(host.raw_data(), values, host.nbytes());
  Tensor dev = host.to(device);
  collective(dev.raw_data());
  Tensor back = dev.to(Device::cpu());  // ordered after the collective on the compute stream
  std::memcpy(values, back.raw_data(), back.nbytes());
}

}  // namespace dtrain::cli
