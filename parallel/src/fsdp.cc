// ZeRO-3 / FullyShardedDataParallel (see zero.h): per-unit flat shards, the unit
// function that gathers, runs, re-gathers in backward and reduce-scatters.
#include <fmt/format.h>

#include <limits>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/parallel/zero.h"
#include "flat.h"

namespace dtrain::parallel {

using namespace flat;

// ---- ZeRO-3 ----

namespace {

// Re-enables autograd inside a backward function (the engine runs backward under
// NoGradGuard).
class EnableGradGuard {
 public:
  EnableGradGuard() : prev_(GradMode::is_enabled()) { GradMode::set_enabled(true); }
  ~EnableGradGuard() { GradMode::set_enabled(prev_); }
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool prev_;
};

}  // namespace

FullyShardedDataParallel::FullyShardedDataParallel(std::vector<std::shared_ptr<nn::Module>> units,
                                                   std::vector<double> weight_decay,
                                                   comm::Communicator& comm,
                                                   const optim::AdamWOptions& options)
    : ShardedAdamW(comm, options), empty_(empty({0})) {
  param_is_full_ = false;
  std::vector<Tensor> all;
  for (const auto& m : units) {
    DTRAIN_CHECK(m != nullptr, InvalidArgument, "FullyShardedDataParallel: a unit is null");
    for (const Tensor& p : m->parameters()) all.push_back(p);
  }
  check_params(all, weight_decay, "FullyShardedDataParallel");
  const int64_t r = comm.rank();
  for (const auto& m : units) {
    Unit u{m, m->parameters(), Tensor()};
    Flat f;
    std::vector<Shape> shapes;
    for (const Tensor& p : u.params) shapes.push_back(p.shape());
    f.layout = make_flat_layout(shapes, comm.size(), std::numeric_limits<int64_t>::max());
    f.first_index = num_params_;
    f.weight_decay.assign(weight_decay.begin() + static_cast<int64_t>(num_params_),
                          weight_decay.begin() + static_cast<int64_t>(num_params_ + shapes.size()));
    num_params_ += shapes.size();
    const int64_t s = f.layout.shard_numel();
    Tensor full = pack_broadcast(comm, f.layout, u.params);
    u.shard = full.narrow(0, r * s, s).clone();
    u.shard.set_requires_grad(true);
    f.param = u.shard;
    init_shard(f);
    for (Tensor& p : u.params) p.set_grad(Tensor());
    units_.push_back(std::move(u));
    flats_.push_back(std::move(f));
    release(units_.size() - 1);
  }
  zero_grad();
}

Tensor FullyShardedDataParallel::gather(size_t u) const {
  const FlatLayout& l = flats_[u].layout;
  Tensor full = gather_flat(comm_, l, units_[u].shard);
  for (size_t i = 0; i < l.shapes.size(); ++i) {
    point_into(units_[u].params[i], full, l.shapes[i], l.offsets[i]);
  }
  return full;
}

void FullyShardedDataParallel::release(size_t u) const {
  for (const Tensor& p : units_[u].params) point_into(p, empty_, {0}, 0);
}

Tensor FullyShardedDataParallel::forward(const Tensor& x) {
  Tensor h = x;
  for (size_t u = 0; u < units_.size(); ++u) h = unit_forward(u, h);
  return h;
}

Tensor FullyShardedDataParallel::unit_forward(size_t u, const Tensor& x) {
  struct Gathered {  // releases the unit's full parameters on every path out
    const FullyShardedDataParallel* self;
    size_t u;
    Tensor full;
    ~Gathered() { self->release(u); }
  };
  Tensor y;
  {
    NoGradGuard no_grad;
    Gathered g{this, u, gather(u)};
    y = units_[u].module->forward(x);
  }
  const bool need_dx = x.requires_grad();
  auto backward = [this, u, xd = x.detach(), need_dx](const std::vector<Tensor>& gy) {
    Gathered g{this, u, gather(u)};
    const Unit& unit = units_[u];
    const FlatLayout& l = flats_[u].layout;
    std::vector<Tensor> inputs = unit.params;
    Tensor xi = xd.detach();
    if (need_dx) inputs.push_back(xi.set_requires_grad(true));
    std::vector<Tensor> grads;
    {
      EnableGradGuard grad_mode;
      Tensor y2 = unit.module->forward(xi);
      grads = dtrain::grad({y2}, inputs, {gy[0].defined() ? gy[0] : zeros_like(y2)});
    }
    Tensor flat = zeros({l.total});
    for (size_t i = 0; i < l.shapes.size(); ++i) {
      flat_view(flat, l.shapes[i], l.offsets[i]).copy_(grads[i]);
    }
    Tensor shard_grad = empty({l.shard_numel()});
    comm_.reduce_scatter(flat.raw_data(), shard_grad.raw_data(),
                         static_cast<size_t>(l.shard_numel()), DType::f32, comm::ReduceOp::kAvg);
    return std::vector<Tensor>{need_dx ? grads.back() : Tensor(), shard_grad};
  };
  return make_function("fsdp_unit", {x, units_[u].shard}, {y}, backward)[0];
}

void FullyShardedDataParallel::zero_grad() {
  reduced_ = false;
  for (size_t u = 0; u < units_.size(); ++u) {
    flats_[u].grad.zero_();
    units_[u].shard.set_grad(flats_[u].grad);
  }
}

std::vector<Tensor> FullyShardedDataParallel::gather_full_parameters() const {
  std::vector<Tensor> out;
  for (size_t u = 0; u < units_.size(); ++u) {
    Tensor full = gather(u);
    for (const Tensor& p : units_[u].params) out.push_back(p.clone());
    release(u);
  }
  return out;
}

void FullyShardedDataParallel::load_full_parameters(const std::vector<Tensor>& full) {
  DTRAIN_CHECK(full.size() == num_params_, ShapeError,
               "FullyShardedDataParallel: {} parameters to load, the units hold {}", full.size(),
               num_params_);
  NoGradGuard no_grad;
  size_t k = 0;
  for (size_t u = 0; u < units_.size(); ++u) {
    const FlatLayout& l = flats_[u].layout;
    Tensor flat = zeros({l.total});
    for (size_t i = 0; i < l.shapes.size(); ++i, ++k) {
      DTRAIN_CHECK(full[k].shape() == l.shapes[i], ShapeError,
                   "FullyShardedDataParallel: parameter {} is {}, the unit's is {}", k,
                   shape_str(full[k].shape()), shape_str(l.shapes[i]));
      flat_view(flat, l.shapes[i], l.offsets[i]).copy_(full[k]);
    }
    const int64_t s = l.shard_numel();
    units_[u].shard.copy_(flat.narrow(0, comm_.rank() * s, s));
  }
}

}  // namespace dtrain::parallel
