// Adam/AdamW::step: a tight loop of fn::AdamUpdate over each parameter's
// contiguous param/grad/exp_avg/exp_avg_sq buffers. Bias corrections are computed
// per parameter (its own step count) in double, then handed to the functor.
#include "dtrain/engine/optim/adam.h"

#include <cmath>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain::optim {

Adam::Adam(std::vector<Tensor> params, const AdamOptions& options)
    : Adam("Adam", std::move(params), options.lr(), options.beta1(), options.beta2(), options.eps(),
           options.weight_decay(), false) {}

AdamW::AdamW(std::vector<Tensor> params, const AdamWOptions& options)
    : Adam("AdamW", std::move(params), options.lr(), options.beta1(), options.beta2(),
           options.eps(), options.weight_decay(), true) {}

Adam::Adam(std::string name, std::vector<Tensor> params, double lr, double beta1, double beta2,
           double eps, double weight_decay, bool decoupled)
    : Optimizer(std::move(name), std::move(params), lr),
      beta1_(beta1),
      beta2_(beta2),
      eps_(eps),
      weight_decay_(weight_decay),
      decoupled_(decoupled) {
  DTRAIN_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, InvalidArgument,
               "{}: betas must be in [0, 1), got ({}, {})", this->name(), beta1, beta2);
  DTRAIN_CHECK(eps >= 0.0 && weight_decay >= 0.0, InvalidArgument,
               "{}: eps {} and weight_decay {} must be >= 0", this->name(), eps, weight_decay);
  exp_avg_slot_ = add_slot("exp_avg");
  exp_avg_sq_slot_ = add_slot("exp_avg_sq");
}

void Adam::step() {
  NoGradGuard no_grad;
  for (size_t i = 0; i < params().size(); ++i) {
    const Tensor& p = params()[i];
    Tensor g = p.grad();
    if (!g.defined()) continue;  // frozen or unused: untouched, step count unchanged
    check_grad(i, g);
    g = g.contiguous();
    const int64_t t = ++steps_[i];
    const double bias_c1 = 1.0 - std::pow(beta1_, static_cast<double>(t));
    const double bias_c2 = 1.0 - std::pow(beta2_, static_cast<double>(t));
    const fn::AdamUpdate update{static_cast<float>(lr()),          static_cast<float>(beta1_),
                                static_cast<float>(beta2_),        static_cast<float>(eps_),
                                static_cast<float>(weight_decay_), static_cast<float>(bias_c1),
                                static_cast<float>(bias_c2),       decoupled_};
    const int64_t n = p.numel();
#ifdef DTRAIN_WITH_CUDA
    if (p.device().is_cuda()) {  // one fused kernel per parameter, same functor
      cuda::adam_update(p, g, slot_tensor(exp_avg_slot_, i), slot_tensor(exp_avg_sq_slot_, i),
                        update);
      continue;
    }
#endif
    DTRAIN_DISPATCH_FLOAT(p.dtype(), name().c_str(), [&] {
      scalar_t* pp = p.data<scalar_t>();
      const scalar_t* gp = g.data<scalar_t>();
      scalar_t* mp = slot_tensor(exp_avg_slot_, i).data<scalar_t>();
      scalar_t* vp = slot_tensor(exp_avg_sq_slot_, i).data<scalar_t>();
      for (int64_t j = 0; j < n; ++j) update(pp[j], gp[j], mp[j], vp[j]);
    });
  }
}

}  // namespace dtrain::optim
