// Global-norm gradient clipping (see clip.h): a double sum of squares per rank, one
// kSum all-reduce per group, then one in-place scale of every gradient.
#include "dtrain/parallel/clip.h"

#include <cmath>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"

namespace dtrain::parallel {

namespace {

double sum_of_squares(const Tensor& g) {
  Tensor h = g.to(Device::cpu()).contiguous();
  return DTRAIN_DISPATCH_FLOAT(h.dtype(), "clip_grad_norm", [&] {
    const scalar_t* p = h.data<scalar_t>();
    double s = 0.0;
    for (int64_t i = 0; i < h.numel(); ++i) s += static_cast<double>(p[i]) * p[i];
    return s;
  });
}

// Adds the ranks' shares over one group, through a tensor on `device`.
double allreduce_sum(comm::Communicator& comm, double value, Device device) {
  Tensor t = from_vector<double>({value}, {1}).to(device);
  comm.allreduce(t.raw_data(), 1, DType::f64, comm::ReduceOp::kSum);
  return t.to(Device::cpu()).item();
}

}  // namespace

double clip_grad_norm_sharded(const std::vector<Tensor>& grads, double max_norm,
                              const std::vector<comm::Communicator*>& groups,
                              const std::vector<bool>& counted) {
  DTRAIN_CHECK(max_norm > 0.0, InvalidArgument, "clip_grad_norm: max_norm must be > 0, got {}",
               max_norm);
  DTRAIN_CHECK(counted.empty() || counted.size() == grads.size(), InvalidArgument,
               "clip_grad_norm: {} counted flags for {} gradients", counted.size(), grads.size());
  double sq = 0.0;
  Device device = Device::cpu();
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    device = grads[i].device();
    if (counted.empty() || counted[i]) sq += sum_of_squares(grads[i]);
  }
  for (comm::Communicator* c : groups) {
    DTRAIN_CHECK(c != nullptr, InvalidArgument, "clip_grad_norm: a null communicator");
    sq = allreduce_sum(*c, sq, device);
  }
  const double total = std::sqrt(sq);
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    NoGradGuard no_grad;
    for (Tensor g : grads) {  // a handle: the copy scales the caller's tensor in place
      if (g.defined()) g.copy_(mul_scalar(g, coef));
    }
  }
  return total;
}

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(p.grad());
  return clip_grad_norm_sharded(grads, max_norm, {});
}

}  // namespace dtrain::parallel
