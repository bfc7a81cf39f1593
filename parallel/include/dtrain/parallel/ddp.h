// DistributedDataParallel: data-parallel training over a comm::Communicator.
//
// Every rank holds a full replica of the model and feeds it its own slice of the
// global batch; DDP keeps the replicas identical by averaging gradients:
//
//   DistributedDataParallel ddp(model, comm);   // broadcasts rank 0's weights
//   optim::SGD opt(model->parameters(), optim::SGDOptions(0.1).momentum(0.9));
//   for (...) {
//     opt.zero_grad();
//     Tensor loss = cross_entropy(ddp(x_local), y_local);   // mean over the local slice
//     loss.backward();                // buckets start all-reducing while backward runs
//     ddp.finish_gradient_sync();     // waits, copies the averages back into grad()
//     opt.step();
//   }
//
// How (after torch.nn.parallel.DistributedDataParallel's Reducer):
// - Construction broadcasts every parameter and buffer from rank 0 (coalesced into
//   flat buffers per dtype), so the replicas start equal whatever their seeds.
// - The parameters that require grad are packed into buckets in REVERSE
//   registration order, the order in which backward produces their gradients: a
//   small first bucket (first_bucket_bytes, about 1 MiB) so that communication starts
//   early, then buckets of about bucket_bytes (25 MiB). A bucket holds one dtype and
//   owns one flat buffer, allocated once.
// - A post-accumulate-grad hook on every such parameter copies its gradient into the
//   bucket's buffer; when a bucket is complete its allreduce_async(kAvg) starts at
//   once, from inside backward, so communication overlaps the rest of backward.
//   Buckets are always launched in index order (bucket k+1 waits for bucket k), so
//   every rank issues the collectives in the same order even when gradients arrive
//   in a different order.
// - finish_gradient_sync() (after backward, before the optimizer step) completes and
//   launches the buckets still open, waits for all of them and copies the averages
//   back into each parameter's grad().
// - Inside a no_sync() scope the hooks do nothing: gradients accumulate locally
//   (gradient accumulation), and the next synchronised step all-reduces the sum.
//
// Parameters without a gradient in a synchronised step (a branch not taken, a
// frozen layer, a parameter the loss does not reach): with find_unused_parameters
// false (the default) finish_gradient_sync throws InvalidArgument naming them after
// keeping the collectives in step with the other ranks (zeros are sent); with it
// true they contribute zeros, and one extra small all-reduce finds the parameters no
// rank used, whose grad() stays undefined (as in a single-process run). Parameters
// with requires_grad false at construction are broadcast but never bucketed.
//
// Errors: a lost peer or a timeout surfaces as the communicator's CommError or
// TimeoutError from finish_gradient_sync() (never from inside backward, never a
// hang beyond the communicator's timeout); the gradients of that step are then
// unusable. All ranks must construct DDP over the same architecture with the same
// options.
//
// GPU: buckets live on the parameters' device (all parameters on one device, checked
// at construction), so a CUDA model needs a communicator that reduces device memory
// (the nccl backend). Bucket packing and unpacking are engine copies, queued on the
// device's compute stream; the nccl backend orders its stream after them with events.
//
// Compression (DdpOptions::compression, grad_compression.h): each bucket's average
// can travel as bf16/fp16 (summed in 16 bits, averaged in f32) or as PowerSGD's
// low-rank factors with error feedback; the buckets still launch from the hooks.
//
// Not here: parameters registered after construction, models whose used-parameter
// set differs between ranks without find_unused_parameters.
//
// DDP is deliberately not an nn::Module: the wrapped module keeps its own parameter
// names, so checkpoints of a DDP run and of a single-process run are interchangeable.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/tensor.h"
#include "dtrain/parallel/grad_compression.h"
#include "dtrain/parallel/trace.h"

namespace dtrain::parallel {

struct DdpOptions {
  // Cap of the first bucket of each dtype (the last layers' gradients, ready first).
  size_t first_bucket_bytes = size_t{1} << 20;
  // Cap of every later bucket. A bucket closes once it reaches its cap, so a
  // parameter larger than the cap gets a bucket of its own.
  size_t bucket_bytes = size_t{25} << 20;
  // Also broadcast the buffers from rank 0 before every forward() in training mode,
  // as torch does (they are always broadcast at construction).
  bool broadcast_buffers = true;
  // See the file comment: false = a parameter without a gradient is an error.
  bool find_unused_parameters = false;
  // How each f32 bucket is averaged (kNone: an f32 all-reduce).
  GradCompressionOptions compression;
  // Records pack, all-reduce, wait and unpack spans (trace.h); null: off. Not owned:
  // it must outlive the DDP.
  Tracer* tracer = nullptr;
};

// Which parameters share a bucket. `params` index the module's parameters() list
// (deduplicated), in the order their gradients are expected.
struct BucketInfo {
  std::vector<size_t> params;
  size_t bytes = 0;
  DType dtype = DType::f32;
};

// Groups params (those with requires_grad) into buckets as described above.
// Exposed for tests and tools. Throws InvalidArgument when a cap is 0.
std::vector<BucketInfo> assign_buckets(const std::vector<Tensor>& params, size_t first_bucket_bytes,
                                       size_t bucket_bytes);

struct DdpStats {
  int64_t synced_steps = 0;                  // finish_gradient_sync calls that reduced
  int64_t buckets_launched_in_backward = 0;  // started from a gradient hook (overlap)
  int64_t buckets_launched_in_finish = 0;    // started by finish_gradient_sync
};

// Thread-safety: one thread at a time -- the training thread, which runs forward,
// backward (the hooks run on it) and finish_gradient_sync.
class DistributedDataParallel {
 public:
  // REQUIRES: comm outlives this object and is used by no one else while a step's
  // buckets are in flight. Collective: every rank constructs at the same point.
  // Throws InvalidArgument for a null module, a zero bucket cap, or a parameter that
  // is not contiguous; comm errors from the initial broadcast propagate.
  DistributedDataParallel(std::shared_ptr<nn::Module> module, comm::Communicator& comm,
                          DdpOptions options = {});
  // Waits for buckets still in flight (bounded by the communicator's timeout) and
  // ignores their errors. The hooks stay on the parameters as no-ops, so a new DDP
  // (for example over a new communicator after a failure) can wrap the same module.
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  // The module's forward (after the buffer broadcast, see DdpOptions).
  Tensor forward(const Tensor& x);
  Tensor operator()(const Tensor& x) { return forward(x); }

  // Call after loss.backward() and before optimizer.step(): launches the buckets not
  // yet launched, waits for every bucket, and writes the averaged gradients into
  // grad(). A no-op inside no_sync(). Throws the communicator's CommError or
  // TimeoutError, or InvalidArgument for unused parameters (see the file comment) or
  // a parameter that received two gradients in one synchronised step.
  void finish_gradient_sync();

  // RAII scope for gradient accumulation: while alive, backward only accumulates
  // locally. Scopes nest; the state is restored on destruction. REQUIRES: the guard
  // does not outlive this DDP.
  class NoSyncGuard {
   public:
    ~NoSyncGuard();
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;
    NoSyncGuard(NoSyncGuard&& other) noexcept;
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;

   private:
    friend class DistributedDataParallel;
    NoSyncGuard(DistributedDataParallel* ddp, bool previous) : ddp_(ddp), previous_(previous) {}
    DistributedDataParallel* ddp_;
    bool previous_;
  };
  [[nodiscard]] NoSyncGuard no_sync();
  bool sync_enabled() const;

  const std::shared_ptr<nn::Module>& module() const { return module_; }
  comm::Communicator& communicator() const;
  const DdpOptions& options() const { return options_; }
  // The deduplicated parameters that BucketInfo::params index.
  const std::vector<Tensor>& parameters() const;
  const std::vector<BucketInfo>& buckets() const;
  DdpStats stats() const;

 private:
  struct State;
  void broadcast_buffers();

  std::shared_ptr<nn::Module> module_;
  DdpOptions options_;
  std::shared_ptr<State> state_;  // the hooks hold weak_ptrs to it
};

}  // namespace dtrain::parallel
