// MpiCommunicator: the Communicator interface over MPI (see dtrain/comm/mpi.h for the
// contract: algorithms, timeouts, threading, lifetime).
//
// Shape:
//   - One duplicated MPI communicator per MpiCommunicator (MPI_Comm_idup of
//     MPI_COMM_WORLD, error handler MPI_ERRORS_RETURN so MPI failures become CommError
//     instead of killing the job).
//   - One worker thread runs the queued operations in issue order; every async call
//     returns an MpiWork that the worker completes. Blocking collectives and barrier
//     run on the calling thread when nothing is queued or running (busy_ is 0: one
//     compare-and-swap), else they queue and wait; send and recv always queue. Either
//     way they are ordered after earlier async calls.
//   - MpiPointToPoint (transport.h) implements comm::PointToPoint over
//     MPI_Isend/MPI_Irecv on one tag: the ring collectives (Ring, the same code the tcp
//     backend runs) use tag kRingTag, the user's send/recv use tag kUserTag, so the two
//     never match each other's messages. MPI's non-overtaking rule (per source, tag and
//     communicator) gives the in-order delivery PointToPoint promises.
//   - kNative runs MPI's own collectives on the same communicator (native.h: blocking
//     ones behind a polled MPI_Ibarrier guard under MPI_THREAD_MULTIPLE, the polled
//     non-blocking ones otherwise); their traffic is kept apart from point-to-point
//     traffic by MPI itself.
//   - Every wait polls MPI_Test against the operation's deadline and the abort flag
//     (Poll, transport.h).
//   - Any failure of an operation aborts the communicator: the ring cannot resume from a
//     half-finished step, and a timed-out MPI collective cannot be cancelled.
//   - split() is a queued operation: the ring first all-gathers every rank's (color, key)
//     (bounded by the timeout, so a rank that never joins gives TimeoutError instead of
//     a hang), then every rank calls MPI_Comm_split on this communicator's MPI_Comm. The
//     child owns the resulting MPI_Comm (freed on destruction), shares the MpiRuntime and
//     the options, and checks that MPI ranked it as the gathered pairs say.
//
// Deliberately not here: the size table of the algorithm choice (algorithm.h), MPI's
// collectives themselves (native.h), and fault recovery.
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
#include "mpi/native.h"
#include "mpi/transport.h"
#include "recursive.h"
#include "split.h"

namespace dtrain::comm {
namespace {

using mpi_detail::AbortFlag;
using mpi_detail::Clock;
using mpi_detail::datatype;
using mpi_detail::kMaxMpiCount;
using mpi_detail::MpiPointToPoint;
using mpi_detail::ms_of;
using mpi_detail::Poll;

// Point-to-point tags on the duplicated communicator. Distinct, so a user's recv never
// takes a ring chunk; both within MPI's guaranteed tag range (MPI_TAG_UB >= 32767).
constexpr int kRingTag = 1;
constexpr int kUserTag = 2;
static_assert(kRingTag != kUserTag && kRingTag >= 0 && kUserTag >= 0 && kUserTag <= 32767,
              "mpi backend tags must be distinct and inside MPI's guaranteed tag range");

// Looks at the slots' sequence numbers before a wait starts its clock (about 1 us).
constexpr int kPureSpinLooks = 256;

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
      local_possible_ = mpi_.algorithm == MpiAlgorithm::kAuto && size_ > 1 && node_is_world();
      mpi_detail::NativeCollectives::Guard guard;
      if (local_possible_) guard = [this](Deadline d) { local(d)->barrier(d); };
      native_ = std::make_unique<mpi_detail::NativeCollectives>(*runtime_, comm_, rank_, size_,
                                                                abort_, std::move(guard));
    } catch (...) {
      release_mpi_objects();
      throw;
    }
    ring_p2p_ = std::make_unique<MpiPointToPoint>(*runtime_, comm_, kRingTag, rank_, size_, abort_);
    user_p2p_ = std::make_unique<MpiPointToPoint>(*runtime_, comm_, kUserTag, rank_, size_, abort_);
    ring_ = std::make_unique<Ring>(*ring_p2p_, mpi_.ring);
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
    const Algo algo = algorithm(Collective::kAllreduce, count * dtype_size(dtype));
    return enqueue(describe("allreduce", count, dtype, op),
                   [=, this](Deadline d) { run_allreduce(algo, data, count, dtype, op, d); });
  }
  // The blocking form passes its arguments by reference (no std::function, no
  // allocation: at 8 B the whole call is a few hundred nanoseconds).
  void allreduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    check_buffer(data, count, "allreduce");
    const Algo algo = algorithm(Collective::kAllreduce, count * dtype_size(dtype));
    run_blocking([&] { return describe("allreduce", count, dtype, op); },
                 [&](Deadline d) { run_allreduce(algo, data, count, dtype, op, d); });
  }
  void run_allreduce(Algo algo, void* data, size_t count, DType dtype, ReduceOp op, Deadline d) {
    switch (algo) {
      case Algo::kNative:
        return native_->allreduce(data, count, dtype, op, d,
                                  native_mode(count * dtype_size(dtype)));
      case Algo::kLocal:
        return local(d)->allreduce(data, count, dtype, op, d);
      case Algo::kRecursiveDoubling:
        return recursive_doubling_allreduce(*ring_p2p_, data, count, dtype, op, d, scratch_);
      default:
        return ring_->allreduce(data, count, dtype, op, d);
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
    return enqueue(what, [=, this](Deadline d) {
      native_->broadcast(data, count, dtype, root, d, native_mode(count * dtype_size(dtype)));
    });
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
    native_->check_count(count, "allgather");
    return enqueue(what, [=, this](Deadline d) {
      native_->allgather(send, recv, count, dtype, d, native_mode(count * dtype_size(dtype)));
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
    native_->check_count(count, "reduce_scatter");
    return enqueue(what, [=, this](Deadline d) {
      native_->reduce_scatter(send, recv, count, dtype, op, d,
                              native_mode(count * dtype_size(dtype) * size_));
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
                 [this](Deadline d) { native_->barrier(d); });
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
    mpi_detail::wait_requests(*runtime_, abort_, rank_, {req}, deadline,
                              "MPI_Comm_idup (creating the communicator)");
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

  void release_mpi_objects() noexcept {
    native_.reset();  // frees its MPI_Ops (unless MPI is finalised)
    auto lock = runtime_->lock_mpi();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
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

  // MPI's blocking collectives behind an MPI_Ibarrier guard (native.h) where MPI allows
  // calling them from any thread at once; the polled non-blocking ones otherwise.
  mpi_detail::NativeMode native_mode(size_t /*bytes*/) const {
    return mpi_.native_blocking && runtime_->thread_level() == MPI_THREAD_MULTIPLE
               ? mpi_detail::NativeMode::kGuarded
               : mpi_detail::NativeMode::kNonBlocking;
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
      mpi_detail::wait_requests(*runtime_, abort_, rank_, std::move(reqs), deadline, what);
    };
    auto wait_until = [this](const std::function<bool()>& ready, Deadline d) {
      // A peer a few hundred nanoseconds behind (the common case of a small collective)
      // is seen here, before Poll's clock reads and abort checks.
      for (int i = 0; i < kPureSpinLooks; ++i) {
        if (ready()) return;
      }
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

  // A blocking call runs on the calling thread when no operation is queued or running
  // (the order is the same; no hand-off between threads), else it queues and waits.
  // The test is one compare-and-swap on busy_, no lock; `body` is called in place (or
  // through a std::function referring to it, when queued); `what` is formatted only
  // when it is needed.
  template <typename What, typename Body>
  void run_blocking(const What& what, Body&& body) {
    if (abort_.is_set()) std::rethrow_exception(aborted_error(what()));
    int idle = 0;
    if (!busy_.compare_exchange_strong(idle, 1, std::memory_order_acquire)) {
      enqueue(what(), Run(std::ref(body)))->wait();  // body outlives the wait
      return;
    }
    std::exception_ptr error;
    try {
      body(Clock::now() + timeout());
    } catch (...) {
      error = fail_task(what(), std::current_exception());
    }
    busy_.fetch_sub(1, std::memory_order_release);
    if (error) std::rethrow_exception(error);
  }

  // A failed or aborted communicator stays failed: later calls throw at once (as tcp).
  std::shared_ptr<Work> enqueue(std::string what, std::function<void(Deadline)> run) {
    if (abort_.is_set()) std::rethrow_exception(aborted_error(what));
    auto work = std::make_shared<MpiWork>();
    {
      std::lock_guard<std::mutex> lock(queue_mu_);
      busy_.fetch_add(1, std::memory_order_relaxed);  // the queue lock orders it
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
      }
      std::exception_ptr error = run_task(task);
      busy_.fetch_sub(1, std::memory_order_release);  // before finish(): a waiter goes on
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
      return fail_task(task.what, std::current_exception());
    }
  }

  // The ring cannot resume from a half-finished step and MPI cannot cancel a
  // collective, so any failure ends this communicator.
  std::exception_ptr fail_task(const std::string& what, std::exception_ptr failure) {
    try {
      std::rethrow_exception(failure);
    } catch (const Error& e) {
      const std::string message =
          fmt::format("{} ({} algorithm, {} ranks) failed: {}", what,
                      mpi_algorithm_name(mpi_.algorithm), size_, e.message());
      abort_.set(fmt::format("rank {}: {}", rank_, message));
      if (e.kind() == ErrorKind::kTimeout) {
        return std::make_exception_ptr(TimeoutError(message, __FILE__, __LINE__));
      }
      return std::make_exception_ptr(CommError(message, __FILE__, __LINE__));
    } catch (const std::exception& e) {
      abort_.set(fmt::format("rank {}: {} failed: {}", rank_, what, e.what()));
      return failure;
    }
  }

  void check_buffer(const void* p, size_t count, const char* op) const {
    DTRAIN_CHECK(p != nullptr || count == 0, InvalidArgument,
                 "mpi: {}: null buffer for {} elements", op, count);
  }
  void check_peer(int peer, const char* op) const {
    DTRAIN_CHECK(peer >= 0 && peer < size_ && peer != rank_, InvalidArgument,
                 "mpi: rank {}: {} peer {} must be another rank of this communicator (size {})",
                 rank_, op, peer, size_);
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
  std::unique_ptr<mpi_detail::NativeCollectives> native_;  // MPI's own collectives
  AbortFlag abort_;
  std::unique_ptr<MpiPointToPoint> ring_p2p_;
  std::unique_ptr<MpiPointToPoint> user_p2p_;
  std::unique_ptr<Ring> ring_;

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Task> queue_;  // GUARDED_BY(queue_mu_)
  bool stopping_ = false;   // GUARDED_BY(queue_mu_)
  // Operations queued or running (worker or inline): 0 lets a blocking call run inline.
  std::atomic<int> busy_{0};
  std::vector<std::byte> scratch_;                 // recursive doubling's (the running operation's)
  bool local_possible_ = false;                    // kAuto with every rank on this node
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
