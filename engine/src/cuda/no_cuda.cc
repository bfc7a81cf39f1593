// The CUDA runtime queries of a build without the CUDA backend (DTRAIN_CUDA=OFF or no
// toolkit): there is no device, and every query says why instead of failing to link.
#include "dtrain/common/error.h"
#include "dtrain/engine/cuda/runtime.h"

namespace dtrain::cuda {

namespace {
constexpr const char* kNotBuilt =
    "dtrain was built without the CUDA backend (configure with -DDTRAIN_CUDA=ON)";
}

bool built_with_cuda() { return false; }
int device_count() { return 0; }
std::string device_error() { return kNotBuilt; }

void require_device(const Device& device) {
  DTRAIN_CHECK(device.is_cpu(), UnsupportedError, "no CUDA device: {}", kNotBuilt);
}

std::vector<DeviceInfo> devices() { return {}; }

Versions versions() {
  return Versions{"not built", "not built", "not built", "not built", "not built"};
}

void synchronize(const Device& device) { require_device(device); }

void* compute_stream(const Device& device) {
  require_device(device);
  DTRAIN_THROW(UnsupportedError, "no CUDA device: {} has no compute stream", device.str());
}

}  // namespace dtrain::cuda
