// The nccl backend (nccl.h): NCCL collectives on a communication stream, ordered with
// events against the compute stream, polled against the timeout, aborted on failure.
// split() is ncclCommSplit (NCCL >= 2.18) on a non-blocking config, polled like creation;
// the child gets its own communication stream on the same device.
#include "dtrain/comm/nccl.h"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "split.h"

namespace dtrain::comm {

namespace {

using Clock = std::chrono::steady_clock;

#define DTRAIN_NCCL_CUDA(expr)                                                      \
  do {                                                                              \
    cudaError_t e_ = (expr);                                                        \
    DTRAIN_CHECK(e_ == cudaSuccess, CommError, "nccl: CUDA error in {}: {}", #expr, \
                 cudaGetErrorString(e_));                                           \
  } while (0)

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::f32:
      return ncclFloat32;
    case DType::f64:
      return ncclFloat64;
    case DType::f16:
      return ncclFloat16;
    case DType::bf16:
      return ncclBfloat16;
    case DType::i32:
      return ncclInt32;
    case DType::i64:
      return ncclInt64;
    case DType::u8:
      return ncclUint8;
  }
  DTRAIN_THROW(InvalidArgument, "nccl: unknown dtype");
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  DTRAIN_THROW(InvalidArgument, "nccl: unknown reduce op");
}

class NcclCommunicator;

class NcclWork final : public Work {
 public:
  NcclWork(NcclCommunicator* comm, cudaEvent_t done, std::string what)
      : comm_(comm), done_(done), what_(std::move(what)) {}
  ~NcclWork() override { cudaEventDestroy(done_); }
  void wait() override;
  bool is_completed() const override { return cudaEventQuery(done_) == cudaSuccess; }

 private:
  NcclCommunicator* comm_;
  cudaEvent_t done_;
  std::string what_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(int rank, int size, const NcclOptions& o)
      : rank_(rank), size_(size), options_(o), timeout_(o.comm.timeout) {}

  ~NcclCommunicator() override {
    if (comm_ != nullptr && !aborted_) {  // an aborted communicator is already torn down
      // Finalize flushes outstanding operations; on a non-blocking communicator it
      // completes asynchronously, polled here for at most the timeout.
      ncclResult_t r = ncclCommFinalize(comm_);
      const auto deadline = Clock::now() + timeout_;
      ncclResult_t state = r;
      while (state == ncclInProgress && Clock::now() < deadline) {
        if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      if (state == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);  // a peer is gone: never block in the destructor
      }
    }
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  void init(const ncclUniqueId& id) {
    setup_device();
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns; wait_ready() polls against the timeout
    check(ncclCommInitRankConfig(&comm_, size_, id, rank_, &config), "ncclCommInitRankConfig");
    wait_ready("communicator creation");
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  std::shared_ptr<Work> allreduce_async(void* data, size_t count, DType dtype,
                                        ReduceOp op) override {
    return enqueue("allreduce", [&] {
      return ncclAllReduce(data, data, count, nccl_type(dtype), nccl_op(op), comm_, stream_);
    });
  }
  std::shared_ptr<Work> broadcast_async(void* data, size_t count, DType dtype, int root) override {
    DTRAIN_CHECK(root >= 0 && root < size_, InvalidArgument,
                 "nccl broadcast: root {} outside [0,{})", root, size_);
    return enqueue("broadcast", [&] {
      return ncclBroadcast(data, data, count, nccl_type(dtype), root, comm_, stream_);
    });
  }
  std::shared_ptr<Work> allgather_async(const void* send, void* recv, size_t count,
                                        DType dtype) override {
    return enqueue("allgather", [&] {
      return ncclAllGather(send, recv, count, nccl_type(dtype), comm_, stream_);
    });
  }
  std::shared_ptr<Work> reduce_scatter_async(const void* send, void* recv, size_t count,
                                             DType dtype, ReduceOp op) override {
    return enqueue("reduce_scatter", [&] {
      return ncclReduceScatter(send, recv, count, nccl_type(dtype), nccl_op(op), comm_, stream_);
    });
  }
  void send(const void* data, size_t count, DType dtype, int peer) override {
    check_peer(peer);
    enqueue("send", [&] {
      return ncclSend(data, count, nccl_type(dtype), peer, comm_, stream_);
    })->wait();
  }
  void recv(void* data, size_t count, DType dtype, int peer) override {
    check_peer(peer);
    enqueue("recv", [&] {
      return ncclRecv(data, count, nccl_type(dtype), peer, comm_, stream_);
    })->wait();
  }
  void barrier() override {
    enqueue("barrier", [&] {
      return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_);
    })->wait();
  }

  void abort(const std::string& reason) override {
    std::lock_guard<std::mutex> lock(abort_mu_);
    if (aborted_) return;
    abort_reason_ = reason;
    aborted_ = true;
    if (comm_ != nullptr) ncclCommAbort(comm_);
  }

  void set_timeout(std::chrono::milliseconds t) override { timeout_ = t; }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  std::unique_ptr<Communicator> split(int color, int key) override {
    split_detail::check_color(color, "nccl");
    throw_if_aborted("split");
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    static_assert(kNoColor == NCCL_SPLIT_NOCOLOR, "kNoColor must be NCCL's no-color value");
    NcclOptions child_options = options_;
    child_options.comm.timeout = timeout_;
    auto child = std::make_unique<NcclCommunicator>(-1, 0, child_options);
    child->setup_device();
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t made = nullptr;
    check(ncclCommSplit(comm_, color, key, &made, &config), "ncclCommSplit");
    child->comm_ = made;  // owned by the child from here (aborted with it on failure)
    try {
      wait_ready("ncclCommSplit");
    } catch (...) {
      child->abort("the parent failed during ncclCommSplit");
      throw;
    }
    if (made == nullptr) return nullptr;  // kNoColor
    child->wait_ready("communicator creation (split)");
    child->check(ncclCommUserRank(made, &child->rank_), "ncclCommUserRank");
    child->check(ncclCommCount(made, &child->size_), "ncclCommCount");
    return child;
#else
    (void)key;
    DTRAIN_THROW(UnsupportedError, "nccl: split needs NCCL >= 2.18 (built against {}.{})",
                 NCCL_MAJOR, NCCL_MINOR);
#endif
  }

  // Polls until `done` (or, without an event, the communicator's pending state) finishes;
  // aborts on timeout or an asynchronous NCCL error.
  void wait_event(cudaEvent_t done, const std::string& what) {
    const auto deadline = Clock::now() + timeout_;
    for (;;) {
      throw_if_aborted(what);
      cudaError_t q = cudaEventQuery(done);
      if (q == cudaSuccess) return;
      DTRAIN_CHECK(q == cudaErrorNotReady, CommError, "nccl {}: CUDA error {}", what,
                   cudaGetErrorString(q));
      poll_async_error(what);
      if (Clock::now() > deadline) {
        abort(fmt::format("nccl {} timed out after {} ms", what, timeout_.count()));
        DTRAIN_THROW(TimeoutError,
                     "nccl {} on rank {}: not finished after {} ms (a peer is "
                     "lost or stuck); the communicator was aborted",
                     what, rank_, timeout_.count());
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  template <typename F>
  std::shared_ptr<Work> enqueue(const char* what, F&& call) {
    throw_if_aborted(what);
    DTRAIN_NCCL_CUDA(cudaSetDevice(options_.device));
    cudaStream_t compute = static_cast<cudaStream_t>(options_.compute_stream);
    cudaEvent_t produced = nullptr, done = nullptr;
    DTRAIN_NCCL_CUDA(cudaEventCreateWithFlags(&produced, cudaEventDisableTiming));
    DTRAIN_NCCL_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    auto work = std::make_shared<NcclWork>(this, done, what);  // owns `done`
    DTRAIN_NCCL_CUDA(cudaEventRecord(produced, compute));
    DTRAIN_NCCL_CUDA(cudaStreamWaitEvent(stream_, produced, 0));
    cudaEventDestroy(produced);  // released once the wait above has been satisfied
    check(call(), what);
    wait_ready(what);  // non-blocking communicator: the call may still be enqueuing
    DTRAIN_NCCL_CUDA(cudaEventRecord(done, stream_));
    DTRAIN_NCCL_CUDA(cudaStreamWaitEvent(compute, done, 0));
    return work;
  }

  // The communication stream and the barrier's scratch on options_.device.
  void setup_device() {
    DTRAIN_NCCL_CUDA(cudaSetDevice(options_.device));
    DTRAIN_NCCL_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    DTRAIN_NCCL_CUDA(cudaMalloc(&scratch_, sizeof(float)));
  }

  void check(ncclResult_t r, const std::string& what) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    std::string msg = fmt::format("nccl {} on rank {}: {} ({})", what, rank_, ncclGetErrorString(r),
                                  comm_ ? ncclGetLastError(comm_) : "no communicator");
    abort(msg);
    DTRAIN_THROW(CommError, "{}", msg);
  }

  void wait_ready(const std::string& what) {
    const auto deadline = Clock::now() + timeout_;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      check(ncclCommGetAsyncError(comm_, &state), what);
      if (state == ncclSuccess) return;
      check(state, what);  // throws unless still in progress
      if (Clock::now() > deadline) {
        abort(fmt::format("nccl {} timed out", what));
        DTRAIN_THROW(TimeoutError, "nccl {} on rank {}: not ready after {} ms; aborted", what,
                     rank_, timeout_.count());
      }
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  void poll_async_error(const std::string& what) {
    ncclResult_t state = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &state), what);
    check(state, what);
  }

  void throw_if_aborted(const std::string& what) {
    if (!aborted_) return;
    std::lock_guard<std::mutex> lock(abort_mu_);
    DTRAIN_THROW(CommError, "nccl {} on rank {}: the communicator was aborted ({})", what, rank_,
                 abort_reason_);
  }

  void check_peer(int peer) const {
    DTRAIN_CHECK(peer >= 0 && peer < size_ && peer != rank_, InvalidArgument,
                 "nccl: peer {} is not another rank of [0,{})", peer, size_);
  }

  int rank_, size_;
  NcclOptions options_;
  std::chrono::milliseconds timeout_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;  // barrier's one-element all-reduce
  std::atomic<bool> aborted_{false};
  std::mutex abort_mu_;
  std::string abort_reason_;  // GUARDED_BY(abort_mu_)
};

void NcclWork::wait() { comm_->wait_event(done_, what_); }

std::string hex(const void* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    unsigned char b = static_cast<const unsigned char*>(p)[i];
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

void unhex(const std::string& s, void* p, size_t n) {
  DTRAIN_CHECK(s.size() == 2 * n, CommError, "nccl: malformed unique id in the store ({} chars)",
               s.size());
  auto val = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < n; ++i) {
    static_cast<unsigned char*>(p)[i] =
        static_cast<unsigned char>(val(s[2 * i]) * 16 + val(s[2 * i + 1]));
  }
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Store& store, int rank, int size,
                                                     const NcclOptions& options) {
  DTRAIN_CHECK(size >= 1 && rank >= 0 && rank < size, InvalidArgument,
               "nccl: rank {} of {} is not a valid rank", rank, size);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) (void)cudaGetLastError();
  DTRAIN_CHECK(err == cudaSuccess && count > 0, UnsupportedError, "nccl: no CUDA device: {}",
               err != cudaSuccess ? cudaGetErrorString(err) : "no CUDA-capable device is detected");
  DTRAIN_CHECK(options.device >= 0 && options.device < count, UnsupportedError,
               "nccl: no CUDA device: cuda:{} requested but {} device(s) are visible",
               options.device, count);
  ncclUniqueId id;
  if (rank == 0) {
    ncclResult_t r = ncclGetUniqueId(&id);
    DTRAIN_CHECK(r == ncclSuccess, CommError, "nccl: ncclGetUniqueId failed: {}",
                 ncclGetErrorString(r));
    store.set("nccl/unique_id", hex(&id, sizeof(id)));
  } else {
    unhex(store.get("nccl/unique_id", options.comm.timeout), &id, sizeof(id));
  }
  auto comm = std::make_unique<NcclCommunicator>(rank, size, options);
  comm->init(id);
  return comm;
}

}  // namespace dtrain::comm
