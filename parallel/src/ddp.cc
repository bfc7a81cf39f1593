// DistributedDataParallel: bucket assignment, the gradient hooks, and the
// per-step bookkeeping (see ddp.h for the design).
//
// Per step, each bucketed parameter is "ready" once its gradient sits in its bucket's
// flat buffer; a bucket is complete when all its parameters are ready, and buckets
// launch strictly in index order. The hooks never throw: a usage error or a failed
// launch is recorded and rethrown by finish_gradient_sync(), so backward always runs
// to its end and the engine's graph is never left half-walked.
#include "dtrain/parallel/ddp.h"

#include <fmt/format.h>

#include <algorithm>
#include <exception>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"

namespace dtrain::parallel {

namespace {

// A contiguous view of `numel` elements of flat, starting at element `offset`,
// shaped like `shape`.
Tensor flat_view(const Tensor& flat, const Shape& shape, int64_t offset) {
  return make_view(flat, shape, contiguous_strides(shape), flat.impl()->offset + offset);
}

// Broadcasts `tensors` from rank 0, coalesced into flat buffers of at most about
// cap_bytes per dtype (one collective per buffer instead of one per tensor).
void broadcast_coalesced(comm::Communicator& comm, const std::vector<Tensor>& tensors,
                         size_t cap_bytes) {
  if (comm.size() == 1 || tensors.empty()) return;
  NoGradGuard no_grad;
  std::map<DType, std::vector<Tensor>> by_dtype;
  for (const Tensor& t : tensors) by_dtype[t.dtype()].push_back(t);
  for (auto& [dtype, group] : by_dtype) {
    size_t begin = 0;
    while (begin < group.size()) {
      size_t end = begin;
      int64_t numel = 0;
      size_t bytes = 0;
      while (end < group.size() && (end == begin || bytes < cap_bytes)) {
        numel += group[end].numel();
        bytes += group[end].nbytes();
        ++end;
      }
      Tensor flat = empty({numel}, TensorOptions{dtype, group[begin].device()});
      int64_t offset = 0;
      for (size_t i = begin; i < end; ++i) {
        flat_view(flat, group[i].shape(), offset).copy_(group[i]);
        offset += group[i].numel();
      }
      comm.broadcast(flat.raw_data(), static_cast<size_t>(numel), dtype, 0);
      if (comm.rank() != 0) {
        offset = 0;
        for (size_t i = begin; i < end; ++i) {
          group[i].copy_(flat_view(flat, group[i].shape(), offset));
          offset += group[i].numel();
        }
      }
      begin = end;
    }
  }
}

// Bucket b's all-reduce span, after its wait: to the backend's completion time, or to
// now where the Work does not record one (a compressed bucket finishes in wait()).
void record_completion(Tracer& tracer, int b, TraceClock::time_point issued,
                       const comm::Work& work) {
  tracer.record(SpanKind::kAllReduce, issued, work.completed_at().value_or(TraceClock::now()), b);
}

std::string param_label(const std::string& name, size_t index) {
  return name.empty() ? fmt::format("#{}", index) : fmt::format("'{}'", name);
}

}  // namespace

std::vector<BucketInfo> assign_buckets(const std::vector<Tensor>& params, size_t first_bucket_bytes,
                                       size_t bucket_bytes) {
  DTRAIN_CHECK(first_bucket_bytes > 0 && bucket_bytes > 0, InvalidArgument,
               "DDP: bucket caps must be positive, got first_bucket_bytes={} bucket_bytes={}",
               first_bucket_bytes, bucket_bytes);
  struct Open {
    BucketInfo info;
    size_t closed = 0;  // buckets of this dtype already closed
    size_t first_pos = 0;
  };
  std::map<DType, Open> open;
  std::vector<std::pair<size_t, BucketInfo>> done;  // (position of first param, bucket)
  size_t pos = 0;
  for (size_t k = params.size(); k-- > 0;) {
    const Tensor& p = params[k];
    if (!p.requires_grad()) continue;
    Open& o = open[p.dtype()];
    if (o.info.params.empty()) {
      o.first_pos = pos;
      o.info.dtype = p.dtype();
    }
    o.info.params.push_back(k);
    o.info.bytes += p.nbytes();
    ++pos;
    size_t cap = o.closed == 0 ? first_bucket_bytes : bucket_bytes;
    if (o.info.bytes >= cap) {
      done.emplace_back(o.first_pos, std::move(o.info));
      o.info = BucketInfo{};
      ++o.closed;
    }
  }
  for (auto& [dtype, o] : open) {
    if (!o.info.params.empty()) done.emplace_back(o.first_pos, std::move(o.info));
  }
  std::sort(done.begin(), done.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<BucketInfo> out;
  out.reserve(done.size());
  for (auto& d : done) out.push_back(std::move(d.second));
  return out;
}

// Everything the hooks touch. Held by shared_ptr in DDP and by weak_ptr in the hooks,
// so parameters never keep a destroyed DDP alive (and never form a cycle with it).
struct DistributedDataParallel::State {
  struct Bucket {
    BucketInfo info;
    Tensor flat;                       // the bucket's buffer, allocated once
    std::vector<Tensor> views;         // per parameter (same order as info.params)
    size_t pending = 0;                // parameters not yet ready this step
    std::shared_ptr<comm::Work> work;  // set once launched this step
    TraceClock::time_point issued;     // when work was launched (traced runs)
  };

  comm::Communicator& comm;
  bool find_unused;
  Tracer* tracer = nullptr;
  std::vector<Tensor> params;
  std::vector<std::string> names;
  std::vector<Bucket> buckets;
  std::vector<BucketInfo> infos;
  std::vector<std::unique_ptr<BucketCompressor>> compressors;  // per bucket; empty: none
  // Per parameter: (bucket, slot) for bucketed ones; bucket = npos otherwise.
  std::vector<std::pair<size_t, size_t>> where;
  std::vector<bool> ready;
  std::vector<bool> twice;  // got a second gradient in one synchronised step
  size_t next_launch = 0;
  bool sync_enabled = true;
  std::exception_ptr launch_error;
  DdpStats stats;

  static constexpr size_t npos = static_cast<size_t>(-1);

  State(comm::Communicator& c, bool find) : comm(c), find_unused(find) {}

  void reset_step() {
    for (Bucket& b : buckets) {
      b.pending = b.info.params.size();
      b.work.reset();
    }
    std::fill(ready.begin(), ready.end(), false);
    std::fill(twice.begin(), twice.end(), false);
    next_launch = 0;
    launch_error = nullptr;
  }

  // Marks parameter i ready with `grad` (undefined: zeros) and launches whatever
  // complete buckets are next in line.
  void mark_ready(size_t i, const Tensor& grad, bool from_hook) {
    auto [b, slot] = where[i];
    Bucket& bucket = buckets[b];
    // The pack span covers the copy, not the launch below.
    if (ScopedSpan span(tracer, SpanKind::kPack, static_cast<int>(b)); grad.defined()) {
      NoGradGuard no_grad;
      bucket.views[slot].copy_(grad);
    } else {
      bucket.views[slot].zero_();
    }
    ready[i] = true;
    --bucket.pending;
    launch_complete_buckets(from_hook);
  }

  void launch_complete_buckets(bool from_hook) {
    while (!launch_error && next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      Bucket& bucket = buckets[next_launch];
      try {
        comm.name_next(fmt::format("bucket {} (grads of {}{})", next_launch,
                                   names[bucket.info.params.front()],
                                   bucket.info.params.size() > 1 ? " .." : ""));
        if (tracer) bucket.issued = TraceClock::now();
        bucket.work = launch_bucket(next_launch);
      } catch (...) {
        launch_error = std::current_exception();
        return;
      }
      ++(from_hook ? stats.buckets_launched_in_backward : stats.buckets_launched_in_finish);
      ++next_launch;
    }
  }

  // Starts bucket b's average: an f32 all-reduce, or through its compressor.
  std::shared_ptr<comm::Work> launch_bucket(size_t b) {
    Bucket& bucket = buckets[b];
    if (!compressors.empty()) return compressors[b]->launch(comm, bucket.flat);
    return comm.allreduce_async(bucket.flat.raw_data(), static_cast<size_t>(bucket.flat.numel()),
                                bucket.info.dtype, comm::ReduceOp::kAvg);
  }

  // One compressor per bucket (none for GradCompression::kNone).
  void make_compressors(const GradCompressionOptions& options) {
    if (options.kind == GradCompression::kNone) return;
    for (const Bucket& bucket : buckets) {
      std::vector<Shape> shapes;
      for (size_t i : bucket.info.params) shapes.push_back(params[i].shape());
      compressors.push_back(
          make_bucket_compressor(options, shapes, bucket.info.dtype, bucket.flat.device()));
    }
  }

  void on_grad_ready(size_t i, const Tensor& param) {
    if (!sync_enabled || where[i].first == npos) return;
    if (ready[i]) {
      twice[i] = true;
      return;
    }
    mark_ready(i, param.grad(), /*from_hook=*/true);
  }

  // Waits for every launched bucket; returns the first error.
  std::exception_ptr wait_all() {
    std::exception_ptr first = launch_error;
    for (size_t k = 0; k < buckets.size(); ++k) {
      Bucket& b = buckets[k];
      if (!b.work) continue;
      try {
        b.work->wait();
      } catch (...) {
        if (!first) first = std::current_exception();
      }
      if (tracer) record_completion(*tracer, static_cast<int>(k), b.issued, *b.work);
    }
    return first;
  }
};

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<nn::Module> module,
                                                 comm::Communicator& comm, DdpOptions options)
    : module_(std::move(module)), options_(options) {
  DTRAIN_CHECK(module_ != nullptr, InvalidArgument, "DDP: module is null");
  auto state = std::make_shared<State>(comm, options_.find_unused_parameters);
  state->tracer = options_.tracer;

  // Deduplicate (a tied weight appears once) and validate.
  std::unordered_map<const TensorImpl*, size_t> seen;
  for (auto& [name, p] : module_->named_parameters()) {
    if (seen.count(p.impl()) != 0) continue;
    DTRAIN_CHECK(p.is_contiguous(), InvalidArgument, "DDP: parameter '{}' {} is not contiguous",
                 name, shape_str(p.shape()));
    DTRAIN_CHECK(
        state->params.empty() || p.device() == state->params.front().device(), InvalidArgument,
        "DDP: parameter '{}' is on {} but '{}' is on {}; move the "
        "whole model to one device (Module::to) first",
        name, p.device().str(), state->names.front(), state->params.front().device().str());
    seen.emplace(p.impl(), state->params.size());
    state->params.push_back(p);
    state->names.push_back(name);
  }
  state->infos = assign_buckets(state->params, options_.first_bucket_bytes, options_.bucket_bytes);

  // Start from rank 0's weights and buffers.
  std::vector<Tensor> sync = state->params;
  for (const Tensor& b : module_->buffers()) sync.push_back(b);
  broadcast_coalesced(comm, sync, options_.bucket_bytes);

  state->where.assign(state->params.size(), {State::npos, 0});
  for (size_t b = 0; b < state->infos.size(); ++b) {
    State::Bucket bucket;
    bucket.info = state->infos[b];
    int64_t numel = 0;
    for (size_t i : bucket.info.params) numel += state->params[i].numel();
    const Tensor& first = state->params[bucket.info.params.front()];
    bucket.flat = zeros({numel}, TensorOptions{bucket.info.dtype, first.device()});
    int64_t offset = 0;
    for (size_t slot = 0; slot < bucket.info.params.size(); ++slot) {
      size_t i = bucket.info.params[slot];
      bucket.views.push_back(flat_view(bucket.flat, state->params[i].shape(), offset));
      offset += state->params[i].numel();
      state->where[i] = {b, slot};
    }
    state->buckets.push_back(std::move(bucket));
  }
  state->make_compressors(options_.compression);
  state->ready.assign(state->params.size(), false);
  state->twice.assign(state->params.size(), false);
  state->reset_step();

  std::weak_ptr<State> weak = state;
  for (size_t i = 0; i < state->params.size(); ++i) {
    if (state->where[i].first == State::npos) continue;
    state->params[i].register_post_accumulate_grad_hook([weak, i](const Tensor& param) {
      if (auto s = weak.lock()) s->on_grad_ready(i, param);
    });
  }
  state_ = std::move(state);
}

DistributedDataParallel::~DistributedDataParallel() {
  if (state_) state_->wait_all();
}

comm::Communicator& DistributedDataParallel::communicator() const { return state_->comm; }
const std::vector<Tensor>& DistributedDataParallel::parameters() const { return state_->params; }
const std::vector<BucketInfo>& DistributedDataParallel::buckets() const { return state_->infos; }
DdpStats DistributedDataParallel::stats() const { return state_->stats; }
bool DistributedDataParallel::sync_enabled() const { return state_->sync_enabled; }

void DistributedDataParallel::broadcast_buffers() {
  std::vector<Tensor> buffers = module_->buffers();
  broadcast_coalesced(state_->comm, buffers, options_.bucket_bytes);
}

Tensor DistributedDataParallel::forward(const Tensor& x) {
  if (options_.broadcast_buffers && module_->is_training()) broadcast_buffers();
  return module_->forward(x);
}

void DistributedDataParallel::finish_gradient_sync() {
  State& s = *state_;
  if (!s.sync_enabled) return;

  // Parameters whose hook did not fire this step: a gradient accumulated under
  // no_sync() is sent as it is; no gradient at all is sent as zeros.
  std::vector<size_t> unused;
  for (size_t i = 0; i < s.params.size(); ++i) {
    if (s.where[i].first == State::npos || s.ready[i]) continue;
    Tensor g = s.params[i].grad();
    if (!g.defined()) unused.push_back(i);
    s.mark_ready(i, g, /*from_hook=*/false);
  }
  s.launch_complete_buckets(/*from_hook=*/false);

  // With find_unused_parameters, learn which parameters some rank used.
  // The flags live where the parameters do (a GPU communicator reduces device memory).
  std::vector<float> used;
  Tensor used_dev;
  std::shared_ptr<comm::Work> used_work;
  if (s.find_unused && !s.launch_error) {
    used.assign(s.params.size(), 1.0f);
    for (size_t i : unused) used[i] = 0.0f;
    try {
      const Device dev = s.params.empty() ? Device::cpu() : s.params.front().device();
      void* flags = used.data();
      if (!dev.is_cpu()) {
        used_dev = from_vector<float>(used, {static_cast<int64_t>(used.size())}).to(dev);
        flags = used_dev.raw_data();
      }
      used_work = s.comm.allreduce_async(flags, used.size(), DType::f32, comm::ReduceOp::kMax);
    } catch (...) {
      s.launch_error = std::current_exception();
    }
  }
  std::exception_ptr error;
  {
    ScopedSpan span(s.tracer, SpanKind::kWait);
    error = s.wait_all();
  }
  if (used_work && !error) {
    try {
      used_work->wait();
      if (used_dev.defined()) {
        Tensor host = used_dev.to(Device::cpu());  // waits for the compute stream
        std::copy(host.data<float>(), host.data<float>() + host.numel(), used.begin());
      }
    } catch (...) {
      error = std::current_exception();
    }
  }

  std::vector<bool> twice = s.twice;
  s.reset_step();
  if (error) std::rethrow_exception(error);

  std::string twice_names;
  for (size_t i = 0; i < twice.size(); ++i) {
    if (twice[i]) twice_names += (twice_names.empty() ? "" : ", ") + param_label(s.names[i], i);
  }
  DTRAIN_CHECK(twice_names.empty(), InvalidArgument,
               "DDP: parameter(s) {} received a gradient twice in one synchronised step; run "
               "backward once per step, and wrap the earlier micro-batches in no_sync()",
               twice_names);
  if (!s.find_unused && !unused.empty()) {
    std::string names;
    for (size_t k = 0; k < unused.size() && k < 8; ++k) {
      names += (k == 0 ? "" : ", ") + param_label(s.names[unused[k]], unused[k]);
    }
    if (unused.size() > 8) names += fmt::format(" and {} more", unused.size() - 8);
    DTRAIN_THROW(InvalidArgument,
                 "DDP: {} parameter(s) received no gradient this step: {}; make the loss depend "
                 "on every parameter that requires grad, freeze the unused ones "
                 "(set_requires_grad(false)) before wrapping the model, or set "
                 "DdpOptions::find_unused_parameters = true",
                 unused.size(), names);
  }

  // Copy the averages back.
  NoGradGuard no_grad;
  ScopedSpan span(s.tracer, SpanKind::kUnpack);
  for (State::Bucket& bucket : s.buckets) {
    for (size_t slot = 0; slot < bucket.info.params.size(); ++slot) {
      size_t i = bucket.info.params[slot];
      Tensor& p = s.params[i];
      Tensor g = p.grad();
      if (g.defined()) {
        g.copy_(bucket.views[slot]);
      } else if (!s.find_unused || used[i] > 0.0f) {
        p.set_grad(bucket.views[slot].clone());
      }
    }
  }
  ++s.stats.synced_steps;
}

DistributedDataParallel::NoSyncGuard DistributedDataParallel::no_sync() {
  bool previous = state_->sync_enabled;
  state_->sync_enabled = false;
  return NoSyncGuard(this, previous);
}

DistributedDataParallel::NoSyncGuard::NoSyncGuard(NoSyncGuard&& other) noexcept
    : ddp_(other.ddp_), previous_(other.previous_) {
  other.ddp_ = nullptr;
}

DistributedDataParallel::NoSyncGuard::~NoSyncGuard() {
  if (ddp_ != nullptr) ddp_->state_->sync_enabled = previous_;
}

}  // namespace dtrain::parallel
