// augment_on_device without the CUDA backend: a clear error (augment_device.h).
#include "augment_device.h"

#include "dtrain/common/error.h"

#if !defined(DTRAIN_WITH_CUDA)
namespace dtrain::data {

Tensor augment_on_device(const Tensor& batch, const std::vector<fn::AugStage>&, size_t) {
  DTRAIN_THROW(UnsupportedError,
               "augment: the batch is on {}, but this build has no CUDA backend (augment on the "
               "CPU, before the copy)",
               batch.device().str());
}

}  // namespace dtrain::data
#endif
