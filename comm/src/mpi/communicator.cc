// MpiCommunicator: the Communicator interface over MPI (see dtrain/comm/mpi.h for the
// contract: algorithms, timeouts, threading, lifetime).
//
// Shape:
//   - One duplicated MPI communicator per MpiCommunicator (MPI_Comm_idup of
//     MPI_COMM_WORLD, error handler MPI_ERRORS_RETURN so MPI failures become CommError
//     instead of killing the job).
//   - One worker thread runs the queued operations in issue order; every async call
//     returns an MpiWork that the worker completes. Blocking calls (send, recv,
//     barrier) go through the same queue, so they are ordered after earlier async calls.
//   - MpiPointToPoint implements comm::PointToPoint over MPI_Isend/MPI_Irecv on one tag:
//     the ring collectives (Ring, the same code the tcp backend runs) use tag kRingTag,
//     the user's send/recv use tag kUserTag, so the two never match each other's
//     messages. MPI's non-overtaking rule (per source, tag and communicator) gives the
//     in-order delivery PointToPoint promises.
//   - kNative runs MPI's non-blocking collectives on the same communicator (their
//     traffic is kept apart from point-to-point traffic by MPI itself).
//   - Every wait polls MPI_Test against the operation's deadline and the abort flag
//     (Poll): MPI only progresses inside MPI calls, so the poll spins for the first
//     microseconds, then yields the CPU between tests (ranks may be oversubscribed), and
//     once a wait has lasted a second sleeps 100 us between tests (a stuck peer should
//     not burn a core for the whole timeout; a live transfer keeps progressing).
//   - Any failure of an operation aborts the communicator: the ring cannot resume from a
//     half-finished step, and a timed-out MPI collective cannot be cancelled.
//   - split() is a queued operation: the ring first all-gathers every rank's (color, key)
//     (bounded by the timeout, so a rank that never joins gives TimeoutError instead of
//     a hang), then every rank calls MPI_Comm_split on this communicator's MPI_Comm. The
//     child owns the resulting MPI_Comm (freed on destruction), shares the MpiRuntime and
//     the options, and checks that MPI ranked it as the gathered pairs say.
//
// Deliberately not here: the choice between algorithms by message size (the
// caller picks one per communicator), and fault recovery.
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "dtrain/comm/mpi.h"
#include "dtrain/comm/ring.h"
#include "mpi/local_slots.h"
#include "mpi/mpi_internal.h"
#include "recursive.h"
#include "split.h"

namespace dtrain::comm {
namespace {

using Clock = std::chrono::steady_clock;
using mpi_detail::datatype;

// Point-to-point tags on the duplicated communicator. Distinct, so a user's recv never
// takes a ring chunk; both within MPI's guaranteed tag range (MPI_TAG_UB >= 32767).
constexpr int kRingTag = 1;
constexpr int kUserTag = 2;
static_assert(kRingTag != kUserTag && kRingTag >= 0 && kUserTag >= 0 && kUserTag <= 32767,
              "mpi backend tags must be distinct and inside MPI's guaranteed tag range");

// MPI counts are int: larger messages travel as several MPI messages of at most 1 GiB.
constexpr size_t kMaxMessageBytes = size_t{1} << 30;
static_assert(kMaxMessageBytes <= static_cast<size_t>(INT_MAX));
constexpr size_t kMaxMpiCount = static_cast<size_t>(INT_MAX);

long long ms_of(std::chrono::milliseconds d) { return static_cast<long long>(d.count()); }

// The abort state shared by the communicator and its transports. Safe from any thread.
class AbortFlag {
 public:
  bool is_set() const { return set_.load(std::memory_order_acquire); }
  // Keeps the first reason; later calls change nothing.
  void set(const std::string& reason) {
    std::lock_guard<std::mutex> lock(mu_);
    if (set_.load(std::memory_order_relaxed)) return;
    reason_ = reason;
    set_.store(true, std::memory_order_release);
  }
  std::string reason() const {
    std::lock_guard<std::mutex> lock(mu_);
    return reason_;
  }

 private:
  std::atomic<bool> set_{false};
  mutable std::mutex mu_;
  std::string reason_;  // GUARDED_BY(mu_)
};

// One wait's polling rhythm and its exit conditions (abort, deadline).
class Poll {
 public:
  Poll(const AbortFlag& abort, Deadline deadline, int rank)
      : abort_(abort), deadline_(deadline), rank_(rank) {}

  // Throws CommError when aborted, TimeoutError(describe()) when the deadline passed;
  // otherwise pauses before the next MPI_Test.
  template <typename Describe>
  void next(Describe&& describe) {
    if (abort_.is_set()) {
      DTRAIN_THROW(CommError, "mpi: rank {}: communicator aborted: {}", rank_, abort_.reason());
    }
    const auto now = Clock::now();
    if (now >= deadline_) {
      DTRAIN_THROW(TimeoutError, "mpi: rank {}: timed out {}", rank_, describe());
    }
    const auto waited = now - start_;
    if (waited < std::chrono::microseconds(50)) return;
    if (waited < std::chrono::milliseconds(5)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  const AbortFlag& abort_;
  Deadline deadline_;
  int rank_;
  Clock::time_point start_ = Clock::now();
};

// comm::PointToPoint over MPI_Isend/MPI_Irecv on one tag of one communicator.
// Thread-safety: REQUIRES external synchronization (the communicator's worker thread).
class MpiPointToPoint final : public PointToPoint {
 public:
  MpiPointToPoint(const MpiRuntime& runtime, MPI_Comm comm, int tag, int rank, int size,
                  const AbortFlag& abort)
      : runtime_(runtime), comm_(comm), tag_(tag), rank_(rank), size_(size), abort_(abort) {}
  ~MpiPointToPoint() override { drop_pending(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  Request post_send(const void* data, size_t bytes, int peer) override {
    return post(const_cast<void*>(data), bytes, peer, /*is_send=*/true);
  }
  Request post_recv(void* data, size_t bytes, int peer) override {
    return post(data, bytes, peer, /*is_send=*/false);
  }

  // Waits for `request` and every earlier request in the same direction with the same
  // peer (MPI may complete them out of order; callers rely on "sends complete in
  // order"), then forgets completed requests.
  void wait(const Request& request, Deadline deadline) override {
    check_usable();
    auto covered = [&](const Entry& e) {
      return e.peer == request.peer && e.is_send == request.is_send && e.seq <= request.seq;
    };
    Poll poll(abort_, deadline, rank_);
    try {
      for (;;) {
        const Entry* stuck = nullptr;
        for (Entry& e : pending_) {
          if (e.req == MPI_REQUEST_NULL || !covered(e)) continue;
          int done = 0;
          {
            auto lock = runtime_.lock_mpi();
            MPI_CHECK(MPI_Test(&e.req, &done, MPI_STATUS_IGNORE),
                      e.is_send ? "MPI_Test (send)" : "MPI_Test (recv)");
          }
          if (!done) {
            stuck = &e;
            break;  // in-order completion is the common case: test the rest next round
          }
        }
        if (stuck == nullptr) break;
        poll.next([&] {
          return fmt::format("after {} ms waiting to {} {} bytes {} rank {}",
                             ms_of(std::chrono::duration_cast<std::chrono::milliseconds>(
                                 Clock::now() - stuck->posted)),
                             stuck->is_send ? "send" : "receive", stuck->bytes,
                             stuck->is_send ? "to" : "from", stuck->peer);
        });
      }
    } catch (...) {
      drop_pending();
      failed_ = true;
      throw;
    }
    while (!pending_.empty() && pending_.front().req == MPI_REQUEST_NULL) pending_.pop_front();
  }

 private:
  struct Entry {
    uint64_t seq;
    int peer;
    bool is_send;
    size_t bytes;
    Clock::time_point posted;
    MPI_Request req;
  };

  void check_usable() const {
    DTRAIN_CHECK(!failed_, CommError,
                 "mpi: rank {}: point-to-point transport failed earlier and cannot be reused",
                 rank_);
  }

  Request post(void* data, size_t bytes, int peer, bool is_send) {
    check_usable();
    DTRAIN_CHECK(peer >= 0 && peer < size_ && peer != rank_, InvalidArgument,
                 "mpi: rank {}: bad point-to-point peer {} (size {})", rank_, peer, size_);
    DTRAIN_CHECK(bytes > 0, InvalidArgument, "mpi: rank {}: empty point-to-point message", rank_);
    Request r;
    r.peer = peer;
    r.is_send = is_send;
    r.seq = ++seq_;
    const auto now = Clock::now();
    auto* p = static_cast<std::byte*>(data);
    // Pieces of at most 1 GiB; the receiver posts the same sizes, so pieces match 1:1.
    for (size_t off = 0; off < bytes; off += kMaxMessageBytes) {
      const int n = static_cast<int>(std::min(kMaxMessageBytes, bytes - off));
      Entry e{r.seq, peer, is_send, static_cast<size_t>(n), now, MPI_REQUEST_NULL};
      {
        auto lock = runtime_.lock_mpi();
        if (is_send) {
          MPI_CHECK(MPI_Isend(p + off, n, MPI_BYTE, peer, tag_, comm_, &e.req), "MPI_Isend");
        } else {
          MPI_CHECK(MPI_Irecv(p + off, n, MPI_BYTE, peer, tag_, comm_, &e.req), "MPI_Irecv");
        }
      }
      pending_.push_back(e);
    }
    return r;
  }

  // After a failure: cancel pending receives so they never write their buffers, and
  // release the requests. MPI cannot cancel sends; they may still read their buffers.
  void drop_pending() noexcept {
    auto lock = runtime_.lock_mpi();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return pending_.clear();
    for (Entry& e : pending_) {
      if (e.req == MPI_REQUEST_NULL) continue;
      if (!e.is_send) MPI_Cancel(&e.req);
      MPI_Request_free(&e.req);
    }
    pending_.clear();
  }

  const MpiRuntime& runtime_;
  MPI_Comm comm_;
  int tag_, rank_, size_;
  const AbortFlag& abort_;
  uint64_t seq_ = 0;
  bool failed_ = false;
  std::deque<Entry> pending_;  // in post order
};

// The Work handle of one queued operation.
class MpiWork final : public Work {
 public:
  void wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
    if (error_) std::rethrow_exception(error_);
  }
  bool is_completed() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  std::optional<std::chrono::steady_clock::time_point> completed_at() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_ ? std::optional(done_at_) : std::nullopt;
  }
  void finish(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      done_at_ = std::chrono::steady_clock::now();
      error_ = std::move(error);
    }
    cv_.notify_all();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;                              // GUARDED_BY(mu_)
  std::chrono::steady_clock::time_point done_at_;  // GUARDED_BY(mu_)
  std::exception_ptr error_;                       // GUARDED_BY(mu_)
};

// Reductions for f16/bf16 in kNative: MPI has no 16-bit float types, so the buffers
// travel as MPI_UINT16_T and these user-defined ops combine them in float with the same
// arithmetic as the ring (comm::reduce_into). MPI calls them as inout = in op inout;
// every op here is commutative.
template <DType D, ReduceOp Op>
void reduce_16bit(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce_into(inout, in, static_cast<size_t>(*len), D, Op);
}

class MpiCommunicator final : public Communicator {
  using Run = std::function<void(Deadline)>;

 public:
  // `owned`: MPI_COMM_NULL duplicates MPI_COMM_WORLD; otherwise the communicator to use
  // (from split()), which this object then owns and frees.
  MpiCommunicator(std::shared_ptr<MpiRuntime> runtime, CommOptions opts, MpiOptions mpi,
                  MPI_Comm owned = MPI_COMM_NULL)
      : runtime_(std::move(runtime)), mpi_(mpi), timeout_ms_(opts.timeout.count()), comm_(owned) {
    DTRAIN_CHECK(runtime_ != nullptr, InvalidArgument,
                 "mpi: make_mpi_communicator needs a runtime");
    DTRAIN_CHECK(opts.timeout.count() > 0, InvalidArgument,
                 "mpi: the timeout must be positive, got {} ms", ms_of(opts.timeout));
    if (comm_ == MPI_COMM_NULL) {
      duplicate_world(Clock::now() + opts.timeout);  // a timed-out idup is abandoned, not freed
    }
    try {
      if (owned != MPI_COMM_NULL) adopt_comm();
      create_16bit_ops();
    } catch (...) {
      release_mpi_objects();
      throw;
    }
    ring_p2p_ = std::make_unique<MpiPointToPoint>(*runtime_, comm_, kRingTag, rank_, size_, abort_);
    user_p2p_ = std::make_unique<MpiPointToPoint>(*runtime_, comm_, kUserTag, rank_, size_, abort_);
    ring_ = std::make_unique<Ring>(*ring_p2p_, mpi_.ring);
    local_possible_ = mpi_.algorithm == MpiAlgorithm::kAuto && size_ > 1 && node_is_world();
    worker_ = std::thread([this] { worker_loop(); });
  }

  ~MpiCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(queue_mu_);
      stopping_ = true;
    }
    queue_cv_.notify_all();
    worker_.join();  // runs what is queued (each bounded by its deadline), then exits
    ring_.reset();
    user_p2p_.reset();
    ring_p2p_.reset();
    release_mpi_objects();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  std::shared_ptr<Work> allreduce_async(void* data, size_t count, DType dtype,
                                        ReduceOp op) override {
    check_buffer(data, count, "allreduce");
    return enqueue(describe("allreduce", count, dtype, op), allreduce_op(data, count, dtype, op));
  }
  void allreduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    check_buffer(data, count, "allreduce");
    run_blocking([&] { return describe("allreduce", count, dtype, op); },
                 allreduce_op(data, count, dtype, op));
  }
  Run allreduce_op(void* data, size_t count, DType dtype, ReduceOp op) {
    switch (algorithm(Collective::kAllreduce, count * dtype_size(dtype))) {
      case Algo::kNative:
        return [=, this](Deadline d) { native_allreduce(data, count, dtype, op, d); };
      case Algo::kLocal:
        return [=, this](Deadline d) { local(d)->allreduce(data, count, dtype, op, d); };
      case Algo::kRecursiveDoubling:
        return [=, this](Deadline d) {
          recursive_doubling_allreduce(*ring_p2p_, data, count, dtype, op, d, scratch_);
        };
      default:
        return [=, this](Deadline d) { ring_->allreduce(data, count, dtype, op, d); };
    }
  }

  std::shared_ptr<Work> broadcast_async(void* data, size_t count, DType dtype, int root) override {
    check_buffer(data, count, "broadcast");
    DTRAIN_CHECK(root >= 0 && root < size_, InvalidArgument,
                 "mpi: broadcast root {} is not a rank of this communicator (size {})", root,
                 size_);
    const std::string what = fmt::format("{} root {}", describe("broadcast", count, dtype), root);
    if (algorithm(Collective::kBroadcast, count * dtype_size(dtype)) == Algo::kLocal) {
      return enqueue(what,
                     [=, this](Deadline d) { local(d)->broadcast(data, count, dtype, root, d); });
    }
    if (!native(Collective::kBroadcast, count * dtype_size(dtype))) {
      return enqueue(what,
                     [=, this](Deadline d) { ring_->broadcast(data, count, dtype, root, d); });
    }
    return enqueue(what, [=, this](Deadline d) { native_broadcast(data, count, dtype, root, d); });
  }

  std::shared_ptr<Work> allgather_async(const void* send, void* recv, size_t count,
                                        DType dtype) override {
    check_buffer(send, count, "allgather");
    check_buffer(recv, count, "allgather");
    const std::string what = describe("allgather", count, dtype);
    if (algorithm(Collective::kAllgather, count * dtype_size(dtype)) == Algo::kLocal) {
      return enqueue(what,
                     [=, this](Deadline d) { local(d)->allgather(send, recv, count, dtype, d); });
    }
    if (!native(Collective::kAllgather, count * dtype_size(dtype))) {
      return enqueue(what,
                     [=, this](Deadline d) { ring_->allgather(send, recv, count, dtype, d); });
    }
    check_native_count(count, "allgather");
    return enqueue(what, [=, this](Deadline d) {
      if (count == 0) return;
      MPI_Request req = MPI_REQUEST_NULL;
      {
        auto lock = runtime_->lock_mpi();
        MPI_CHECK(MPI_Iallgather(send, static_cast<int>(count), datatype(dtype), recv,
                                 static_cast<int>(count), datatype(dtype), comm_, &req),
                  "MPI_Iallgather");
      }
      wait_collective({req}, d, "MPI_Iallgather");
    });
  }

  std::shared_ptr<Work> reduce_scatter_async(const void* send, void* recv, size_t count,
                                             DType dtype, ReduceOp op) override {
    check_buffer(send, count, "reduce_scatter");
    check_buffer(recv, count, "reduce_scatter");
    const std::string what = describe("reduce_scatter", count, dtype, op);
    if (algorithm(Collective::kReduceScatter, count * dtype_size(dtype) * size_) == Algo::kLocal) {
      return enqueue(what, [=, this](Deadline d) {
        local(d)->reduce_scatter(send, recv, count, dtype, op, d);
      });
    }
    if (!native(Collective::kReduceScatter, count * dtype_size(dtype) * size_)) {
      return enqueue(
          what, [=, this](Deadline d) { ring_->reduce_scatter(send, recv, count, dtype, op, d); });
    }
    check_native_count(count, "reduce_scatter");
    return enqueue(what, [=, this](Deadline d) {
      if (count == 0) return;
      MPI_Request req = MPI_REQUEST_NULL;
      {
        auto lock = runtime_->lock_mpi();
        MPI_CHECK(MPI_Ireduce_scatter_block(send, recv, static_cast<int>(count), datatype(dtype),
                                            native_op(dtype, op), comm_, &req),
                  "MPI_Ireduce_scatter_block");
      }
      wait_collective({req}, d, "MPI_Ireduce_scatter_block");
      if (op == ReduceOp::kAvg) scale_in_place(recv, count, dtype, 1.0 / size_);
    });
  }

  void send(const void* data, size_t count, DType dtype, int peer) override {
    check_buffer(data, count, "send");
    check_peer(peer, "send");
    const size_t bytes = count * dtype_size(dtype);
    enqueue(fmt::format("{} to rank {}", describe("send", count, dtype), peer), [=,
                                                                                 this](Deadline d) {
      if (bytes == 0) return;
      user_p2p_->wait(user_p2p_->post_send(data, bytes, peer), d);
    })->wait();
  }

  void recv(void* data, size_t count, DType dtype, int peer) override {
    check_buffer(data, count, "recv");
    check_peer(peer, "recv");
    const size_t bytes = count * dtype_size(dtype);
    enqueue(fmt::format("{} from rank {}", describe("recv", count, dtype), peer), [=, this](
                                                                                      Deadline d) {
      if (bytes == 0) return;
      user_p2p_->wait(user_p2p_->post_recv(data, bytes, peer), d);
    })->wait();
  }

  void barrier() override {
    if (local_possible_) {
      run_blocking([] { return std::string("barrier"); },
                   [this](Deadline d) { local(d)->barrier(d); });
      return;
    }
    if (!native(Collective::kAllreduce, 1)) {
      run_blocking([] { return std::string("barrier"); },
                   [this](Deadline d) { ring_->barrier(d); });
      return;
    }
    run_blocking([] { return std::string("barrier"); },
                 [this](Deadline d) {
                   MPI_Request req = MPI_REQUEST_NULL;
                   {
                     auto lock = runtime_->lock_mpi();
                     MPI_CHECK(MPI_Ibarrier(comm_, &req), "MPI_Ibarrier");
                   }
                   wait_collective({req}, d, "MPI_Ibarrier");
                 });
  }

  void abort(const std::string& reason) override {
    abort_.set(reason);
    queue_cv_.notify_all();
    if (mpi_.mpi_abort_on_abort) {
      auto lock = runtime_->lock_mpi();
      MPI_Abort(comm_, mpi_.mpi_abort_exit_code);
    }
  }

  void set_timeout(std::chrono::milliseconds timeout) override {
    DTRAIN_CHECK(timeout.count() > 0, InvalidArgument,
                 "mpi: the timeout must be positive, got {} ms", ms_of(timeout));
    timeout_ms_.store(timeout.count());
  }
  std::chrono::milliseconds timeout() const override {
    return std::chrono::milliseconds(timeout_ms_.load());
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    split_detail::check_color(color, "mpi");
    // (color, key) at [0, 2), every rank's pairs at [2, 2 + 2 * size). On failure MPI may
    // still hold the ring's sends (they cannot be cancelled): the buffer is then leaked.
    auto pairs = std::make_unique<std::vector<int64_t>>(2 + 2 * static_cast<size_t>(size_));
    (*pairs)[0] = color;
    (*pairs)[1] = key;
    MPI_Comm child = MPI_COMM_NULL;
    try {
      enqueue(fmt::format("split(color {}, key {})", color, key), [&](Deadline d) {
        ring_->allgather(pairs->data(), pairs->data() + 2, 2, DType::i64, d);
        auto lock = runtime_->lock_mpi();
        MPI_CHECK(MPI_Comm_split(comm_, color == kNoColor ? MPI_UNDEFINED : color, key, &child),
                  "MPI_Comm_split");
      })->wait();
    } catch (...) {
      (void)pairs.release();
      throw;
    }
    const split_detail::Group g =
        split_detail::group_of(std::vector<int64_t>(pairs->begin() + 2, pairs->end()), rank_);
    if (child == MPI_COMM_NULL) {
      DTRAIN_CHECK(g.rank < 0, CommError, "mpi: rank {}: MPI_Comm_split put color {} in no group",
                   rank_, color);
      return nullptr;
    }
    auto out = std::make_unique<MpiCommunicator>(runtime_, CommOptions{timeout()}, mpi_, child);
    DTRAIN_CHECK(out->rank() == g.rank && out->size() == static_cast<int>(g.members.size()),
                 CommError,
                 "mpi: rank {}: MPI_Comm_split (color {}, key {}) made rank {} of {}, expected "
                 "rank {} of {}",
                 rank_, color, key, out->rank(), out->size(), g.rank, g.members.size());
    return out;
  }

 private:
  struct Task {
    std::string what;
    std::function<void(Deadline)> run;
    std::shared_ptr<MpiWork> work;
  };

  // ---- setup and teardown ----

  void duplicate_world(Deadline deadline) {
    rank_ = runtime_->world_rank();
    size_ = runtime_->world_size();
    MPI_Request req = MPI_REQUEST_NULL;
    {
      auto lock = runtime_->lock_mpi();
      MPI_CHECK(MPI_Comm_idup(MPI_COMM_WORLD, &comm_, &req), "MPI_Comm_idup");
    }
    // The request is a collective one: it cannot be cancelled, so a timeout abandons it.
    wait_collective({req}, deadline, "MPI_Comm_idup (creating the communicator)");
    auto lock = runtime_->lock_mpi();
    MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  }

  // A communicator from split(): rank and size from it, errors returned (not fatal).
  void adopt_comm() {
    auto lock = runtime_->lock_mpi();
    MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    MPI_CHECK(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    MPI_CHECK(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  void create_16bit_ops() {
    auto lock = runtime_->lock_mpi();
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::f16, ReduceOp::kSum>, 1, &ops16_[0][0]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::f16, ReduceOp::kMax>, 1, &ops16_[0][1]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::f16, ReduceOp::kMin>, 1, &ops16_[0][2]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::bf16, ReduceOp::kSum>, 1, &ops16_[1][0]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::bf16, ReduceOp::kMax>, 1, &ops16_[1][1]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::bf16, ReduceOp::kMin>, 1, &ops16_[1][2]),
              "MPI_Op_create");
  }

  void release_mpi_objects() noexcept {
    auto lock = runtime_->lock_mpi();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto& row : ops16_) {
      for (MPI_Op& op : row) {
        if (op != MPI_OP_NULL) MPI_Op_free(&op);
      }
    }
    if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  // ---- algorithm choice (every rank decides the same from the same arguments) ----

  Algo algorithm(Collective c, size_t bytes) const {
    if (mpi_.algorithm == MpiAlgorithm::kNative) return Algo::kNative;
    if (mpi_.algorithm == MpiAlgorithm::kRing) return Algo::kRing;
    AlgoCapabilities can;
    can.native = true;
    can.local = local_possible_;
    can.local_capacity = (mpi_.algos.local_max_bytes + 4095) / 4096 * 4096;
    return algorithm_for(mpi_.algos, c, bytes, can);
  }

  // Whether every process of the job runs on this node (Open MPI's, MPICH's counts):
  // then every communicator's ranks can share memory, known without a collective.
  static bool node_is_world() {
    for (const char* pair : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"}) {
      const char* local = std::getenv(pair);
      if (local == nullptr) continue;
      int world = 0;
      MPI_Comm_size(MPI_COMM_WORLD, &world);
      return std::atoi(local) == world;
    }
    return false;
  }

  // kAuto on one node: the shared-memory slots of the tcp backend (local_slots.h), set
  // up inside the first collective that uses them (every rank runs the same one, on
  // the worker or inline: never concurrently), within that call's deadline.
  shm::LocalCollectives* local(Deadline d) {
    if (!local_) local_ = setup_local_slots(d);
    DTRAIN_CHECK(local_ != nullptr, CommError,
                 "mpi: rank {}: the ranks of this node could not share memory (see /dev/shm)",
                 rank_);
    return local_->collectives.get();
  }
  std::unique_ptr<mpi_detail::LocalSlots> setup_local_slots(Deadline deadline) {
    auto wait_requests = [this, deadline](std::vector<MPI_Request> reqs, const char* what) {
      wait_collective(std::move(reqs), deadline, what);
    };
    auto wait_until = [this](const std::function<bool()>& ready, Deadline d) {
      Poll poll(abort_, d, rank_);
      while (!ready()) {
        poll.next(
            [] { return std::string("waiting for this host's ranks in a local collective"); });
      }
    };
    return mpi_detail::make_local_slots(*runtime_, comm_, rank_, size_, mpi_.algos.local_max_bytes,
                                        wait_requests, wait_until);
  }
  // The other collectives run MPI's own or the ring.
  bool native(Collective c, size_t bytes) const { return algorithm(c, bytes) == Algo::kNative; }

  // ---- the queue ----

  // A blocking call runs on the calling thread when the worker is idle and nothing is
  // queued (the order is the same; no hand-off between threads), else it queues.
  // `what` is formatted only when it is needed.
  template <typename What>
  void run_blocking(const What& what, Run run) {
    if (abort_.is_set()) std::rethrow_exception(aborted_error(what()));
    std::unique_lock<std::mutex> lock(queue_mu_);
    if (running_ || !queue_.empty()) {
      lock.unlock();
      enqueue(what(), std::move(run))->wait();
      return;
    }
    running_ = true;
    lock.unlock();
    std::exception_ptr error;
    try {
      run(Clock::now() + timeout());
    } catch (...) {
      Task task{what(), nullptr, nullptr};
      error = fail_task(task, std::current_exception());
    }
    lock.lock();
    running_ = false;
    lock.unlock();
    if (error) std::rethrow_exception(error);
  }

  // A failed or aborted communicator stays failed: later calls throw at once (as tcp).
  std::shared_ptr<Work> enqueue(std::string what, std::function<void(Deadline)> run) {
    if (abort_.is_set()) std::rethrow_exception(aborted_error(what));
    auto work = std::make_shared<MpiWork>();
    {
      std::lock_guard<std::mutex> lock(queue_mu_);
      queue_.push_back(Task{std::move(what), std::move(run), work});
    }
    queue_cv_.notify_one();
    return work;
  }

  void worker_loop() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(queue_mu_);
        queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
        running_ = true;
      }
      std::exception_ptr error = run_task(task);
      {
        std::lock_guard<std::mutex> lock(queue_mu_);
        running_ = false;  // before finish(): a waiter may go on right after
      }
      task.work->finish(error);
    }
  }

  std::exception_ptr aborted_error(const std::string& what) const {
    return std::make_exception_ptr(CommError(fmt::format(
        "mpi: rank {}: {} failed: communicator aborted: {}", rank_, what, abort_.reason())));
  }

  // Queued operations fail at once after an abort or an earlier failure.
  std::exception_ptr run_task(Task& task) {
    if (abort_.is_set()) return aborted_error(task.what);
    try {
      task.run(Clock::now() + timeout());
      return nullptr;
    } catch (...) {
      return fail_task(task, std::current_exception());
    }
  }

  // The ring cannot resume from a half-finished step and MPI cannot cancel a
  // collective, so any failure ends this communicator.
  std::exception_ptr fail_task(const Task& task, std::exception_ptr failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const Error& e) {
      const std::string message =
          fmt::format("{} ({} algorithm, {} ranks) failed: {}", task.what,
                      mpi_algorithm_name(mpi_.algorithm), size_, e.message());
      abort_.set(fmt::format("rank {}: {}", rank_, message));
      if (e.kind() == ErrorKind::kTimeout) {
        return std::make_exception_ptr(TimeoutError(message, __FILE__, __LINE__));
      }
      return std::make_exception_ptr(CommError(message, __FILE__, __LINE__));
    } catch (const std::exception& e) {
      abort_.set(fmt::format("rank {}: {} failed: {}", rank_, task.what, e.what()));
      return failure;
    }
  }

  // ---- native collectives ----

  MPI_Op native_op(DType dtype, ReduceOp op) const {
    const int col = op == ReduceOp::kMax ? 1 : op == ReduceOp::kMin ? 2 : 0;
    if (dtype == DType::f16) return ops16_[0][col];
    if (dtype == DType::bf16) return ops16_[1][col];
    return col == 1 ? MPI_MAX : col == 2 ? MPI_MIN : MPI_SUM;
  }

  // Elementwise collectives split counts above INT_MAX into several MPI calls.
  void native_allreduce(void* data, size_t count, DType dtype, ReduceOp op, Deadline d) {
    std::vector<MPI_Request> reqs;
    auto* p = static_cast<std::byte*>(data);
    const size_t es = dtype_size(dtype);
    for (size_t off = 0; off < count; off += kMaxMpiCount) {
      const int n = static_cast<int>(std::min(kMaxMpiCount, count - off));
      MPI_Request req = MPI_REQUEST_NULL;
      auto lock = runtime_->lock_mpi();
      MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, p + off * es, n, datatype(dtype), native_op(dtype, op),
                               comm_, &req),
                "MPI_Iallreduce");
      reqs.push_back(req);
    }
    wait_collective(std::move(reqs), d, "MPI_Iallreduce");
    if (op == ReduceOp::kAvg) scale_in_place(data, count, dtype, 1.0 / size_);
  }

  void native_broadcast(void* data, size_t count, DType dtype, int root, Deadline d) {
    std::vector<MPI_Request> reqs;
    auto* p = static_cast<std::byte*>(data);
    const size_t es = dtype_size(dtype);
    for (size_t off = 0; off < count; off += kMaxMpiCount) {
      const int n = static_cast<int>(std::min(kMaxMpiCount, count - off));
      MPI_Request req = MPI_REQUEST_NULL;
      auto lock = runtime_->lock_mpi();
      MPI_CHECK(MPI_Ibcast(p + off * es, n, datatype(dtype), root, comm_, &req), "MPI_Ibcast");
      reqs.push_back(req);
    }
    wait_collective(std::move(reqs), d, "MPI_Ibcast");
  }

  // Polls collective requests until all complete. On timeout or abort they are
  // abandoned: MPI forbids cancelling or freeing a pending collective request.
  void wait_collective(std::vector<MPI_Request> reqs, Deadline deadline, const char* what) {
    Poll poll(abort_, deadline, rank_);
    const auto start = Clock::now();
    for (;;) {
      int done = 0;
      {
        auto lock = runtime_->lock_mpi();
        MPI_CHECK(
            MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE),
            what);
      }
      if (done) return;
      poll.next([&] {
        return fmt::format(
            "after {} ms in {}: not every rank joined the collective",
            ms_of(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start)),
            what);
      });
    }
  }

  // ---- argument checks (on the calling thread) ----

  void check_buffer(const void* p, size_t count, const char* op) const {
    DTRAIN_CHECK(p != nullptr || count == 0, InvalidArgument,
                 "mpi: {}: null buffer for {} elements", op, count);
  }
  void check_peer(int peer, const char* op) const {
    DTRAIN_CHECK(peer >= 0 && peer < size_ && peer != rank_, InvalidArgument,
                 "mpi: rank {}: {} peer {} must be another rank of this communicator (size {})",
                 rank_, op, peer, size_);
  }
  void check_native_count(size_t count, const char* op) const {
    DTRAIN_CHECK(count <= kMaxMpiCount, UnsupportedError,
                 "mpi: {} of {} elements per rank exceeds MPI's int count limit ({}) in the "
                 "native algorithm; use MpiAlgorithm::kRing",
                 op, count, kMaxMpiCount);
  }

  static std::string describe(const char* name, size_t count, DType dtype) {
    return fmt::format("{}({} x {})", name, count, dtype_name(dtype));
  }
  static std::string describe(const char* name, size_t count, DType dtype, ReduceOp op) {
    return fmt::format("{}({}, {} x {})", name, reduce_op_name(op), count, dtype_name(dtype));
  }

  std::shared_ptr<MpiRuntime> runtime_;  // declared first: MPI outlives everything below
  MpiOptions mpi_;
  std::atomic<int64_t> timeout_ms_;
  int rank_ = 0;
  int size_ = 1;
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Op ops16_[2][3] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                         {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};  // [f16, bf16][sum, max, min]
  AbortFlag abort_;
  std::unique_ptr<MpiPointToPoint> ring_p2p_;
  std::unique_ptr<MpiPointToPoint> user_p2p_;
  std::unique_ptr<Ring> ring_;

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Task> queue_;          // GUARDED_BY(queue_mu_)
  bool stopping_ = false;           // GUARDED_BY(queue_mu_)
  bool running_ = false;            // GUARDED_BY(queue_mu_): an operation runs (worker or inline)
  std::vector<std::byte> scratch_;  // recursive doubling's (the running operation's)
  bool local_possible_ = false;     // kAuto with every rank on this node
  std::unique_ptr<mpi_detail::LocalSlots> local_;  // worker / inline run only
  std::thread worker_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(std::shared_ptr<MpiRuntime> runtime,
                                                    CommOptions opts, MpiOptions mpi) {
  return std::make_unique<MpiCommunicator>(std::move(runtime), opts, mpi);
}

std::unique_ptr<Communicator> make_mpi_communicator(CommOptions opts, MpiAlgorithm algo) {
  MpiOptions mpi;
  mpi.algorithm = algo;
  return make_mpi_communicator(MpiRuntime::init(), opts, mpi);
}

}  // namespace dtrain::comm
