// SGD::step: a tight loop of fn::SgdUpdate over each parameter's contiguous
// param/grad/momentum buffers.
#include "dtrain/engine/optim/sgd.h"

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain::optim {

SGD::SGD(std::vector<Tensor> params, const SGDOptions& options)
    : Optimizer("SGD", std::move(params), options.lr()), options_(options) {
  DTRAIN_CHECK(
      options.momentum() >= 0.0 && options.dampening() >= 0.0 && options.weight_decay() >= 0.0,
      InvalidArgument, "SGD: momentum {}, dampening {}, weight_decay {} must be >= 0",
      options.momentum(), options.dampening(), options.weight_decay());
  DTRAIN_CHECK(!options.nesterov() || (options.momentum() > 0.0 && options.dampening() == 0.0),
               InvalidArgument,
               "SGD: nesterov momentum needs momentum > 0 and dampening 0 (got momentum {}, "
               "dampening {})",
               options.momentum(), options.dampening());
  momentum_slot_ = add_slot("momentum_buffer");
}

void SGD::step() {
  NoGradGuard no_grad;
  const fn::SgdUpdate base{static_cast<float>(lr()),
                           static_cast<float>(options_.momentum()),
                           static_cast<float>(options_.dampening()),
                           static_cast<float>(options_.weight_decay()),
                           options_.nesterov(),
                           false};
  const bool use_momentum = options_.momentum() != 0.0;
  for (size_t i = 0; i < params().size(); ++i) {
    const Tensor& p = params()[i];
    Tensor g = p.grad();
    if (!g.defined()) continue;  // frozen or unused: untouched
    check_grad(i, g);
    g = g.contiguous();
    fn::SgdUpdate update = base;
    update.first_step = !has_slot_tensor(momentum_slot_, i);
    const int64_t n = p.numel();
#ifdef DTRAIN_WITH_CUDA
    if (p.device().is_cuda()) {  // one fused kernel per parameter, same functor
      cuda::sgd_update(p, g, use_momentum ? slot_tensor(momentum_slot_, i) : Tensor(), update);
      ++steps_[i];
      continue;
    }
#endif
    DTRAIN_DISPATCH_FLOAT(p.dtype(), "SGD", [&] {
      scalar_t* pp = p.data<scalar_t>();
      const scalar_t* gp = g.data<scalar_t>();
      if (use_momentum) {
        scalar_t* bp = slot_tensor(momentum_slot_, i).data<scalar_t>();
        for (int64_t j = 0; j < n; ++j) update(pp[j], gp[j], bp[j]);
      } else {
        scalar_t unused = 0;  // the functor does not touch buf without momentum
        for (int64_t j = 0; j < n; ++j) update(pp[j], gp[j], unused);
      }
    });
    ++steps_[i];
  }
}

}  // namespace dtrain::optim
