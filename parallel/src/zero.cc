// ZeRO stages 1-2 (see zero.h): the flat layout, the shard-local AdamW, the full-state
// gather/load and the stage-2 bucket hooks (stage 3: fsdp.cc; flat buffers: flat.h).
//
// Coordinates: a "flat" index addresses the padded flat buffer of one layout; bucket b
// covers [bucket_begin[b], +bucket_numel[b]) and rank r owns its piece
// [bucket_begin[b] + r * chunk(b), +chunk(b)), stored at shard_offset(b) of the shard.
#include "dtrain/parallel/zero.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <string>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#include "dtrain/parallel/clip.h"
#include "flat.h"

namespace dtrain::parallel {

namespace {

using namespace flat;

Tensor i64_scalar(int64_t v) { return from_vector<int64_t>({v}, {}); }

}  // namespace

std::vector<double> decay_matrices_only(const std::vector<Tensor>& params, double weight_decay) {
  std::vector<double> out;
  for (const Tensor& p : params) out.push_back(p.dim() >= 2 ? weight_decay : 0.0);
  return out;
}

FlatLayout make_flat_layout(const std::vector<Shape>& shapes, int world, int64_t bucket_numel) {
  DTRAIN_CHECK(world >= 1 && bucket_numel >= 1, InvalidArgument,
               "make_flat_layout: world {} and bucket_numel {} must be >= 1", world, bucket_numel);
  FlatLayout l;
  l.world = world;
  l.shapes = shapes;
  l.offsets.assign(shapes.size(), 0);
  int64_t cur = 0, begin = -1;
  auto close = [&] {
    const int64_t len = (cur - begin + world - 1) / world * world;  // padded
    l.bucket_begin.push_back(begin);
    l.bucket_numel.push_back(len);
    cur = begin + len;
    begin = -1;
  };
  for (size_t k = shapes.size(); k-- > 0;) {
    if (begin < 0) begin = cur;
    l.offsets[k] = cur;
    cur += shape_numel(shapes[k]);
    if (cur - begin >= bucket_numel) close();
  }
  if (begin >= 0) close();
  l.total = cur;
  return l;
}

// ---- ShardedAdamW ----

ShardedAdamW::ShardedAdamW(comm::Communicator& comm, const optim::AdamWOptions& o)
    : comm_(comm), lr_(0.0), beta1_(o.beta1()), beta2_(o.beta2()), eps_(o.eps()) {
  DTRAIN_CHECK(beta1_ >= 0.0 && beta1_ < 1.0 && beta2_ >= 0.0 && beta2_ < 1.0 && eps_ >= 0.0,
               InvalidArgument, "ZeRO AdamW: betas ({}, {}) must be in [0, 1) and eps {} >= 0",
               beta1_, beta2_, eps_);
  set_lr(o.lr());
}

void ShardedAdamW::set_lr(double lr) {
  DTRAIN_CHECK(std::isfinite(lr) && lr >= 0.0, InvalidArgument,
               "ZeRO AdamW: learning rate must be finite and >= 0, got {}", lr);
  lr_ = lr;
}

int64_t ShardedAdamW::shard_offset(const FlatLayout& l, size_t b) {
  int64_t s = 0;
  for (size_t k = 0; k < b; ++k) s += l.chunk(k);
  return s;
}

void ShardedAdamW::init_shard(Flat& f) const {
  const int64_t n = f.layout.shard_numel();
  f.grad = zeros({n});
  f.exp_avg = zeros({n});
  f.exp_avg_sq = zeros({n});
}

std::vector<FlatLayout> ShardedAdamW::layouts() const {
  std::vector<FlatLayout> out;
  for (const Flat& f : flats_) out.push_back(f.layout);
  return out;
}

ShardMemory ShardedAdamW::memory() const {
  ShardMemory m;
  for (const Flat& f : flats_) {
    m.param_bytes += f.param.nbytes();
    m.grad_bytes += f.grad.nbytes();
    m.optimizer_state_bytes += f.exp_avg.nbytes() + f.exp_avg_sq.nbytes();
  }
  if (full_grad_.defined()) m.grad_bytes += full_grad_.nbytes();
  return m;
}

double ShardedAdamW::clip_grad_norm(double max_norm) {
  if (!reduced_) reduce_gradients();
  reduced_ = true;
  std::vector<Tensor> grads;
  for (const Flat& f : flats_) grads.push_back(f.grad);
  return clip_grad_norm_sharded(grads, max_norm, {&comm_});
}

double ShardedAdamW::clip_grad_norm(double max_norm,
                                    const std::vector<comm::Communicator*>& more_groups,
                                    const std::vector<bool>& counted) {
  std::vector<Tensor> pieces;
  std::vector<bool> flags;
  owned_gradients(counted, &pieces, &flags);
  std::vector<comm::Communicator*> groups{&comm_};
  groups.insert(groups.end(), more_groups.begin(), more_groups.end());
  return clip_grad_norm_sharded(pieces, max_norm, groups, flags);
}

void ShardedAdamW::owned_gradients(const std::vector<bool>& counted, std::vector<Tensor>* pieces,
                                   std::vector<bool>* flags) {
  DTRAIN_CHECK(counted.empty() || counted.size() == num_params_, InvalidArgument,
               "clip_grad_norm: {} counted flags for {} parameters", counted.size(), num_params_);
  if (!reduced_) reduce_gradients();
  reduced_ = true;
  const int64_t r = comm_.rank();
  for (const Flat& f : flats_) {
    const FlatLayout& l = f.layout;
    int64_t s0 = 0;
    for (size_t b = 0; b < l.bucket_numel.size(); s0 += l.chunk(b), ++b) {
      const int64_t f0 = l.bucket_begin[b] + r * l.chunk(b), f1 = f0 + l.chunk(b);
      for (size_t i = 0; i < l.shapes.size(); ++i) {
        const int64_t a = std::max(f0, l.offsets[i]);
        const int64_t e = std::min(f1, l.offsets[i] + shape_numel(l.shapes[i]));
        if (a >= e) continue;
        pieces->push_back(f.grad.narrow(0, s0 + a - f0, e - a));
        flags->push_back(counted.empty() || counted[f.first_index + i]);
      }
    }
  }
}

void ShardedAdamW::step() {
  NoGradGuard no_grad;
  if (!reduced_) reduce_gradients();
  const int64_t t = ++step_;
  const double c1 = 1.0 - std::pow(beta1_, static_cast<double>(t));
  const double c2 = 1.0 - std::pow(beta2_, static_cast<double>(t));
  for (Flat& f : flats_) update(f, c1, c2);
  after_update();
  reduced_ = false;
}

// AdamW on this rank's pieces: for every parameter overlapping a piece, fn::AdamUpdate
// with that parameter's weight decay over the overlap. Padding is never touched.
void ShardedAdamW::update(Flat& f, double c1, double c2) const {
  const FlatLayout& l = f.layout;
  const int64_t r = comm_.rank();
  float* g = f.grad.data<float>();
  float* m = f.exp_avg.data<float>();
  float* v = f.exp_avg_sq.data<float>();
  int64_t s0 = 0;
  for (size_t b = 0; b < l.bucket_numel.size(); s0 += l.chunk(b), ++b) {
    const int64_t f0 = l.bucket_begin[b] + r * l.chunk(b), f1 = f0 + l.chunk(b);
    float* p = f.param.data<float>() + (param_is_full_ ? f0 : s0) - f0;  // p[flat index]
    for (size_t i = 0; i < l.shapes.size(); ++i) {
      const int64_t a = std::max(f0, l.offsets[i]);
      const int64_t e = std::min(f1, l.offsets[i] + shape_numel(l.shapes[i]));
      const fn::AdamUpdate u{static_cast<float>(lr_),
                             static_cast<float>(beta1_),
                             static_cast<float>(beta2_),
                             static_cast<float>(eps_),
                             static_cast<float>(f.weight_decay[i]),
                             static_cast<float>(c1),
                             static_cast<float>(c2),
                             true};
      for (int64_t j = a; j < e; ++j) {
        const int64_t k = s0 + j - f0;
        u(p[j], g[k], m[k], v[k]);
      }
    }
  }
}

optim::StateDict ShardedAdamW::gather_full_state() const {
  optim::StateDict out;
  out.emplace("lr", from_vector<double>({lr_}, {}));
  out.emplace("num_params", i64_scalar(static_cast<int64_t>(num_params_)));
  if (step_ == 0) return out;  // AdamW creates its state on the first step
  for (const Flat& f : flats_) {
    for (const auto& [name, shard] :
         {std::pair{"exp_avg", f.exp_avg}, {"exp_avg_sq", f.exp_avg_sq}}) {
      Tensor full = gather_flat(comm_, f.layout, shard);
      for (size_t i = 0; i < f.layout.shapes.size(); ++i) {
        out.emplace(fmt::format("state.{}.{}", f.first_index + i, name),
                    flat_view(full, f.layout.shapes[i], f.layout.offsets[i]).clone());
      }
    }
    for (size_t i = 0; i < f.layout.shapes.size(); ++i) {
      out.emplace(fmt::format("state.{}.step", f.first_index + i), i64_scalar(step_));
    }
  }
  return out;
}

void ShardedAdamW::load_full_state(const optim::StateDict& dict) {
  auto get = [&](const std::string& key) -> const Tensor* {
    auto it = dict.find(key);
    return it == dict.end() || !it->second.defined() ? nullptr : &it->second;
  };
  const Tensor* lr = get("lr");
  const Tensor* n = get("num_params");
  DTRAIN_CHECK(lr && n && lr->numel() == 1 && n->numel() == 1, DataFormatError,
               "ZeRO load_full_state: 'lr' and 'num_params' must be one-element tensors");
  DTRAIN_CHECK(static_cast<size_t>(n->item()) == num_params_, DataFormatError,
               "ZeRO load_full_state: the state is for {} parameters, this optimizer has {}",
               n->item(), num_params_);
  const Tensor* first_step = get("state.0.step");
  const int64_t step = first_step ? static_cast<int64_t>(first_step->item()) : 0;
  std::set<std::string> known = {"lr", "num_params"};
  for (const Flat& f : flats_) {
    for (size_t i = 0; i < f.layout.shapes.size(); ++i) {
      const std::string key = fmt::format("state.{}.", f.first_index + i);
      const Tensor* s = get(key + "step");
      DTRAIN_CHECK((s ? static_cast<int64_t>(s->item()) : 0) == step, DataFormatError,
                   "ZeRO load_full_state: '{}step' differs from 'state.0.step' ({}); a sharded "
                   "optimizer keeps one step count",
                   key, step);
      for (const char* slot : {"step", "exp_avg", "exp_avg_sq"}) known.insert(key + slot);
      for (const char* slot : {"exp_avg", "exp_avg_sq"}) {
        const Tensor* t = get(key + slot);
        DTRAIN_CHECK(
            step == 0 || (t && t->shape() == f.layout.shapes[i] && t->dtype() == DType::f32),
            DataFormatError, "ZeRO load_full_state: '{}{}' is missing or not f32 {}", key, slot,
            shape_str(f.layout.shapes[i]));
      }
    }
  }
  for (const auto& [key, t] : dict) {
    DTRAIN_CHECK(known.count(key) != 0, DataFormatError,
                 "ZeRO load_full_state: unexpected key '{}'", key);
  }
  set_lr(lr->item());
  step_ = step;
  const int64_t r = comm_.rank();
  for (Flat& f : flats_) {
    for (const auto& [slot, shard] :
         {std::pair{"exp_avg", f.exp_avg}, {"exp_avg_sq", f.exp_avg_sq}}) {
      Tensor full = zeros({f.layout.total});
      for (size_t i = 0; step > 0 && i < f.layout.shapes.size(); ++i) {
        const Tensor* t = get(fmt::format("state.{}.{}", f.first_index + i, slot));
        flat_view(full, f.layout.shapes[i], f.layout.offsets[i]).copy_(*t);
      }
      int64_t s = 0;
      for (size_t b = 0; b < f.layout.bucket_numel.size(); s += f.layout.chunk(b), ++b) {
        std::memcpy(shard.data<float>() + s,
                    full.data<float>() + f.layout.bucket_begin[b] + r * f.layout.chunk(b),
                    static_cast<size_t>(f.layout.chunk(b)) * sizeof(float));
      }
    }
  }
}

// ---- ZeRO stages 1 and 2 ----

// Stage 2's per-step bucket state. Hooks never throw: errors wait for reduce_gradients.
struct ZeroOptimizer::Buckets {
  comm::Communicator& comm;
  FlatLayout layout;
  Tensor grad_shard;
  std::vector<size_t> bucket_of;                  // per parameter
  std::vector<Tensor> full;                       // per bucket, alive while filling/in flight
  std::vector<std::shared_ptr<comm::Work>> work;  // per bucket, while in flight
  std::vector<size_t> pending;                    // per bucket: parameters not yet in
  std::vector<bool> ready;                        // per parameter
  size_t next = 0;                                // the next bucket to launch
  std::exception_ptr error;
  bool twice = false;
  // Micro-batches: round k > 0 of one step (backward k) reduce-scatters into scratch
  // and finish() adds it to the shard, so the shard sums the rounds.
  int round = 0;
  std::vector<Tensor> scratch;  // per bucket, rounds > 0

  Buckets(comm::Communicator& c, FlatLayout l, Tensor shard)
      : comm(c), layout(std::move(l)), grad_shard(std::move(shard)) {
    const size_t nb = layout.bucket_numel.size();
    for (size_t i = 0; i < layout.shapes.size(); ++i) {
      size_t b = 0;
      while (b + 1 < nb && layout.bucket_begin[b + 1] <= layout.offsets[i]) ++b;
      bucket_of.push_back(b);
    }
    full.resize(nb);
    work.resize(nb);
    scratch.resize(nb);
    reset();
  }
  void reset() {
    start_round();
    error = nullptr;
    twice = false;
    round = 0;
  }
  void start_round() {
    pending.assign(full.size(), 0);
    for (size_t b : bucket_of) ++pending[b];
    ready.assign(bucket_of.size(), false);
    next = 0;
  }
  float* target(size_t b) {
    if (round == 0) return grad_shard.data<float>() + shard_offset(layout, b);
    if (!scratch[b].defined()) scratch[b] = empty({layout.chunk(b)});
    return scratch[b].data<float>();
  }
  // Puts parameter i's gradient (undefined: zeros) into its bucket; launches what is due.
  void add(size_t i, const Tensor& g) {
    const size_t b = bucket_of[i];
    if (!full[b].defined()) full[b] = zeros({layout.bucket_numel[b]});
    if (g.defined()) {
      NoGradGuard no_grad;
      flat_view(full[b], layout.shapes[i], layout.offsets[i] - layout.bucket_begin[b]).copy_(g);
    }
    ready[i] = true;
    --pending[b];
    while (!error && next < full.size() && pending[next] == 0) {
      try {
        work[next] = comm.reduce_scatter_async(full[next].raw_data(), target(next),
                                               static_cast<size_t>(layout.chunk(next)),
                                               DType::f32, comm::ReduceOp::kAvg);
        if (next > 0) finish(next - 1);  // at most two full buckets alive
      } catch (...) {
        error = std::current_exception();
      }
      ++next;
    }
  }
  void finish(size_t b) {
    if (work[b]) {
      std::shared_ptr<comm::Work> w = std::move(work[b]);
      w->wait();
      if (round > 0) {
        NoGradGuard no_grad;
        Tensor piece = grad_shard.narrow(0, shard_offset(layout, b), layout.chunk(b));
        piece.copy_(piece + scratch[b]);
      }
    }
    full[b] = Tensor();  // the full gradient of this bucket is gone
  }
  // A gradient for a parameter already in: a new backward (micro-batch) when the last
  // one delivered every gradient, an error otherwise.
  void on_grad(size_t i, const Tensor& param) {
    if (ready[i] && next == full.size()) {
      if (std::exception_ptr e = wait_all(); e && !error) error = e;
      start_round();
      ++round;
    } else if (ready[i]) {
      twice = true;
      return;
    }
    Tensor g = param.grad();
    Tensor(param).set_grad(Tensor());
    add(i, g);
  }
  std::exception_ptr wait_all() {
    std::exception_ptr first = error;
    for (size_t b = 0; b < full.size(); ++b) {
      try {
        finish(b);
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
    return first;
  }
};

ZeroOptimizer::ZeroOptimizer(std::vector<Tensor> params, std::vector<double> weight_decay,
                             comm::Communicator& comm, const optim::AdamWOptions& options,
                             ZeroOptions zero)
    : ShardedAdamW(comm, options), stage_(zero.stage), params_(std::move(params)) {
  DTRAIN_CHECK(stage_ == 1 || stage_ == 2, InvalidArgument,
               "ZeroOptimizer: stage must be 1 or 2 (stage 3 is FullyShardedDataParallel), got {}",
               stage_);
  check_params(params_, weight_decay, "ZeroOptimizer");
  std::vector<Shape> shapes;
  for (const Tensor& p : params_) shapes.push_back(p.shape());
  const int64_t bucket = stage_ == 1 ? std::numeric_limits<int64_t>::max()
                                     : std::max<int64_t>(1, zero.bucket_bytes / sizeof(float));
  Flat f;
  f.layout = make_flat_layout(shapes, comm.size(), bucket);
  f.weight_decay = std::move(weight_decay);
  f.param = pack_broadcast(comm, f.layout, params_);
  for (size_t i = 0; i < params_.size(); ++i) {
    point_into(params_[i], f.param, shapes[i], f.layout.offsets[i]);
    params_[i].set_grad(Tensor());
  }
  init_shard(f);
  num_params_ = params_.size();
  flats_.push_back(std::move(f));
  const Flat& fl = flats_.front();
  if (stage_ == 1) {
    full_grad_ = zeros({fl.layout.total});
    for (size_t i = 0; i < params_.size(); ++i) {
      grad_views_.push_back(flat_view(full_grad_, shapes[i], fl.layout.offsets[i]));
    }
  } else {
    buckets_ = std::make_shared<Buckets>(comm, fl.layout, fl.grad);
    std::weak_ptr<Buckets> weak = buckets_;
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].register_post_accumulate_grad_hook([weak, i](const Tensor& p) {
        if (auto b = weak.lock()) b->on_grad(i, p);
      });
    }
  }
  zero_grad();
}

ZeroOptimizer::~ZeroOptimizer() {
  if (buckets_) buckets_->wait_all();
}

void ZeroOptimizer::zero_grad() {
  reduced_ = false;
  if (stage_ == 1) {
    full_grad_.zero_();
    for (size_t i = 0; i < params_.size(); ++i) params_[i].set_grad(grad_views_[i]);
    return;
  }
  buckets_->wait_all();
  buckets_->reset();
  for (Tensor& p : params_) p.set_grad(Tensor());
}

void ZeroOptimizer::reduce_gradients() {
  Flat& f = flats_.front();
  if (stage_ == 1) {
    NoGradGuard no_grad;
    for (size_t i = 0; i < params_.size(); ++i) {  // a grad() someone replaced
      Tensor g = params_[i].grad();
      if (!g.defined()) grad_views_[i].zero_();
      if (g.defined() && g.impl()->storage != full_grad_.impl()->storage) grad_views_[i].copy_(g);
    }
    comm_.reduce_scatter(full_grad_.raw_data(), f.grad.raw_data(),
                         static_cast<size_t>(f.layout.shard_numel()), DType::f32,
                         comm::ReduceOp::kAvg);
    return;
  }
  Buckets& b = *buckets_;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!b.ready[i]) b.add(i, params_[i].grad());
    params_[i].set_grad(Tensor());
  }
  std::exception_ptr error = b.wait_all();
  const bool twice = b.twice;
  b.reset();
  if (error) std::rethrow_exception(error);
  DTRAIN_CHECK(!twice, InvalidArgument,
               "ZeroOptimizer stage 2: a parameter received a second gradient before the "
               "backward pass had delivered all of them (accumulation works per whole "
               "backward pass)");
}

void ZeroOptimizer::after_update() {
  const Flat& f = flats_.front();
  const FlatLayout& l = f.layout;
  for (size_t b = 0; b < l.bucket_numel.size(); ++b) {  // in place: send is recv's own block
    float* bucket = f.param.data<float>() + l.bucket_begin[b];
    comm_.allgather(bucket + comm_.rank() * l.chunk(b), bucket, static_cast<size_t>(l.chunk(b)),
                    DType::f32);
  }
}

}  // namespace dtrain::parallel
