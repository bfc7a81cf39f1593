// augment_on_device in a CUDA build (augment_device.h): the per-sample draws go to the
// device as a u8 tensor, then one kernel per stage ping-pongs between two buffers on
// the device's compute stream.
#include <cstring>

#include "cuda/augment_kernels.h"
#include "cuda/context.h"
#include "data/augment_device.h"

namespace dtrain::data {

Tensor augment_on_device(const Tensor& batch, const std::vector<fn::AugStage>& params,
                         size_t stages_per_sample) {
  Tensor cur = batch.contiguous().clone();
  if (stages_per_sample == 0 || batch.numel() == 0) return cur;
  const auto bytes = static_cast<int64_t>(params.size() * sizeof(fn::AugStage));
  Tensor host = empty({bytes}, TensorOptions{}.with_dtype(DType::u8));
  std::memcpy(host.raw_data(), params.data(), static_cast<size_t>(bytes));
  Tensor dev = host.to(batch.device());
  Tensor next = empty_like(cur);
  void* stream = cuda::context(batch.device().index).stream;
  for (size_t s = 0; s < stages_per_sample; ++s) {
    cuda::augment_stage(cur.data<float>(), next.data<float>(), cur.size(0), cur.size(1),
                        cur.size(2), cur.size(3), static_cast<const fn::AugStage*>(dev.raw_data()),
                        static_cast<int64_t>(stages_per_sample), static_cast<int64_t>(s), stream);
    std::swap(cur, next);
  }
  return cur;
}

}  // namespace dtrain::data
