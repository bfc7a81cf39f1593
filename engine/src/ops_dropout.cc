// dropout: inverted dropout with a mask drawn from an explicit Generator.
//
// When training with p > 0, each element (in row-major order of x) is kept when
// gen.uniform_float() >= p, and kept elements are scaled by 1/(1-p), so the expected
// value of the output equals x and evaluation needs no rescaling. The mask is drawn
// from the caller's Generator, never from global state: the same generator state
// gives the same mask, and a checkpoint that saves the generator resumes exactly.
// The mask is stored as the multiplier itself (0 or 1/(1-p)), so backward is
// dx = dy * mask. In evaluation, or with p == 0, the input is returned unchanged and
// the generator is not advanced. p outside [0,1) is an InvalidArgument in either mode.
// On a CUDA device the mask is counter-based (fn::DropoutMask): one 64-bit draw from
// the Generator seeds it, element i keeps with its own hash, so the GPU draws in any
// order; the keep probability is the same, the bits differ from the CPU's.
#include <tuple>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

template <typename T>
void dropout_kernel(const T* x, T* y, T* mask, int64_t n, double p, Generator& gen) {
  const T scale = static_cast<T>(1.0 / (1.0 - p));
  const float pf = static_cast<float>(p);
  // uniform_float() has 24 bits; comparing in float keeps the keep-probability exact
  // for p representable in float and within 2^-24 otherwise.
  for (int64_t i = 0; i < n; ++i) mask[i] = gen.uniform_float() >= pf ? scale : T(0);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * mask[i];
}

}  // namespace

Tensor dropout(const Tensor& x, double p, bool training, Generator& gen) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "dropout: undefined input");
  DTRAIN_CHECK(p >= 0.0 && p < 1.0, InvalidArgument,
               "dropout: probability must be in [0,1), got {}", p);
  if (!training || p == 0.0) return x;
  Tensor y, mask;
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda()) {
    // Counter-based mask (fn::DropoutMask): one draw from gen seeds the whole tensor.
    fn::DropoutMask m{gen.next_u64(), static_cast<float>(p), static_cast<float>(1.0 / (1.0 - p))};
    std::tie(y, mask) = cuda::dropout(x.detach(), m);
  }
#endif
  if (!y.defined()) {
    Tensor xc = x.detach().contiguous();
    y = empty(x.shape(), x.options());
    mask = empty(x.shape(), x.options());
    DTRAIN_DISPATCH_FLOAT(x.dtype(), "dropout", [&] {
      dropout_kernel<scalar_t>(xc.data<scalar_t>(), y.data<scalar_t>(), mask.data<scalar_t>(),
                               x.numel(), p, gen);
    });
  }
  if (!any_requires_grad({x})) return y;
  return make_function("dropout", {x}, {y}, [mask](const std::vector<Tensor>& g) {
    if (!g[0].defined()) return std::vector<Tensor>{Tensor()};
    return std::vector<Tensor>{mul(g[0], mask)};
  })[0];
}

}  // namespace dtrain
