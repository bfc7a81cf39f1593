// Communicator: the collective and point-to-point interface every backend implements.
//
// comm moves typed buffers (pointer, element count, dtrain::DType) and knows nothing
// about tensors or autograd; parallel/ is where tensors meet communicators. Every
// call has a timeout (CommOptions::timeout, changeable with set_timeout): when a peer
// disappears or stops answering, every pending call on every other rank fails with
// CommError (peer lost, naming the rank) or TimeoutError within that timeout, never
// a hang. abort() fails all pending and future calls at once.
//
// Async forms return a Work handle; wait() blocks until the operation is complete
// and rethrows its error. Operations issued by one thread complete in issue order.
// Collectives must be called by every rank in the same order with the same counts
// and dtypes (as in MPI and NCCL).
//
// split() carves sub-communicators out of this one (MPI_Comm_split semantics), for the
// model-parallel grids of parallel/ (tensor x pipeline x data groups).
//
// Thread-safety: a Communicator may be used from one issuing thread at a time
// (DDP issues from the backward thread and waits from the same thread). abort() may
// be called from any thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dtrain/common/dtype.h"
#include "dtrain/common/error.h"

namespace dtrain::comm {

enum class ReduceOp { kSum, kAvg, kMax, kMin };
const char* reduce_op_name(ReduceOp op);

struct CommOptions {
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};
};

class Work {
 public:
  virtual ~Work() = default;
  // Blocks until done; rethrows the operation's CommError/TimeoutError.
  virtual void wait() = 0;
  virtual bool is_completed() const = 0;
  // When the operation finished (for timelines); nullopt while running, or where the
  // backend does not record it.
  virtual std::optional<std::chrono::steady_clock::time_point> completed_at() const {
    return std::nullopt;
  }
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "tcp", "mpi", "nccl"

  // In place: data holds this rank's input and receives the reduced result.
  virtual std::shared_ptr<Work> allreduce_async(void* data, size_t count, DType dtype,
                                                ReduceOp op) = 0;
  // root's data is copied to every rank's data.
  virtual std::shared_ptr<Work> broadcast_async(void* data, size_t count, DType dtype,
                                                int root) = 0;
  // recv holds size() * count elements: rank r's send block lands at r * count.
  virtual std::shared_ptr<Work> allgather_async(const void* send, void* recv, size_t count,
                                                DType dtype) = 0;
  // send holds size() * count elements; rank r receives the reduction of block r.
  virtual std::shared_ptr<Work> reduce_scatter_async(const void* send, void* recv, size_t count,
                                                     DType dtype, ReduceOp op) = 0;
  virtual void send(const void* data, size_t count, DType dtype, int peer) = 0;
  virtual void recv(void* data, size_t count, DType dtype, int peer) = 0;
  virtual void barrier() = 0;
  // Fails every pending and later call with CommError(reason). Idempotent.
  virtual void abort(const std::string& reason) = 0;

  virtual void set_timeout(std::chrono::milliseconds timeout) = 0;
  virtual std::chrono::milliseconds timeout() const = 0;

  static constexpr int kNoColor = -1;
  // Collective over this communicator: ranks passing the same color form a new communicator,
  // ranked by (key, parent rank). color == kNoColor: this rank joins none and gets nullptr.
  // The child inherits the timeout; it is independent of the parent (own queue/connections)
  // and may outlive nothing: destroy children before the parent's Store goes away.
  // Colors are kNoColor or non-negative (InvalidArgument otherwise). Like every collective,
  // it fails with CommError/TimeoutError when a peer is lost during it.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Names the next collective this rank issues ("bucket 3 (grads of fc1.weight ..)"), for
  // the stall and desync reports of an InspectedCommunicator (inspector.h). Backends
  // ignore it; call it on every rank alike (names are compared there).
  virtual void name_next(std::string_view /*name*/) {}

  // Blocking forms. Backends may override them to run the operation on the calling
  // thread when nothing is queued (no hand-off to a worker: the latency of small
  // messages); the result and the ordering are those of async + wait.
  virtual void allreduce(void* data, size_t count, DType dtype, ReduceOp op) {
    allreduce_async(data, count, dtype, op)->wait();
  }
  virtual void broadcast(void* data, size_t count, DType dtype, int root) {
    broadcast_async(data, count, dtype, root)->wait();
  }
  virtual void allgather(const void* send, void* recv, size_t count, DType dtype) {
    allgather_async(send, recv, count, dtype)->wait();
  }
  virtual void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                              ReduceOp op) {
    reduce_scatter_async(send, recv, count, dtype, op)->wait();
  }
};

// Reduces `count` elements of `src` into `dst` (dst = dst op src), for every DType
// including f16/bf16 (combined in float). kAvg reduces as kSum; the caller divides
// once at the end with scale_in_place.
void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op);
void scale_in_place(void* data, size_t count, DType dtype, double factor);

}  // namespace dtrain::comm
