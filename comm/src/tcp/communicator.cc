// TcpCommunicator: the Communicator of the tcp backend (see tcp.h for the design).
//
// The issuing thread validates arguments and queues an operation; one worker thread
// runs the queue in order, each operation with a deadline of timeout() from its
// start, the collectives through Ring over the tcp::Transport. The first failure
// (a lost peer, a timeout, abort()) is recorded with the operation it happened in;
// the running operation, every queued one and every later call fail with it.
//
// Deliberately not here: sockets and the wire protocol (transport.cc), the
// algorithms (ring.cc).
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "dtrain/comm/tcp.h"
#include "recursive.h"
#include "split.h"
#include "tcp/transport.h"

namespace dtrain::comm {
namespace {

// Why an operation failed; every failure is a CommError or a TimeoutError.
struct Failure {
  ErrorKind kind = ErrorKind::kComm;
  std::string message;
};

[[noreturn]] void throw_failure(const Failure& f) {
  if (f.kind == ErrorKind::kTimeout) throw TimeoutError(f.message);
  throw CommError(f.message);
}

// A queued operation's completion. wait() throws a fresh exception in the waiting
// thread, so no exception object is shared between threads.
// Thread-safety: safe from any thread.
class TcpWork final : public Work {
 public:
  void wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
    if (error_) throw_failure(*error_);
  }
  bool is_completed() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  std::optional<std::chrono::steady_clock::time_point> completed_at() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_ ? std::optional(done_at_) : std::nullopt;
  }
  void finish(std::optional<Failure> error) {
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
  bool done_ = false;
  std::chrono::steady_clock::time_point done_at_;
  std::optional<Failure> error_;
};

AlgoCapabilities capabilities(tcp::Transport& t) {
  AlgoCapabilities c;
  c.local = t.local() != nullptr;
  c.local_capacity = c.local ? t.local()->capacity() : 0;
  c.direct = t.direct() != nullptr;
  return c;
}

class TcpCommunicator final : public Communicator {
 public:
  // `store` (kept for split()) must outlive this communicator and its children.
  TcpCommunicator(std::unique_ptr<tcp::Transport> transport, CommOptions opts, Store& store,
                  TcpOptions tcp)
      : transport_(std::move(transport)),
        ring_(*transport_, tcp.ring),
        store_(&store),
        tcp_(std::move(tcp)),
        caps_(capabilities(*transport_)),
        timeout_ms_(opts.timeout.count()),
        worker_([this] { worker_loop(); }) {}

  ~TcpCommunicator() override {
    bool busy;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      busy = running_ || !queue_.empty();
    }
    cv_.notify_all();
    if (busy) abort("destroyed with operations pending");
    worker_.join();
    if (!transport_->failed()) transport_->say_bye();
  }

  int rank() const override { return transport_->rank(); }
  int size() const override { return transport_->size(); }
  std::string backend() const override { return "tcp"; }

  std::shared_ptr<Work> allreduce_async(void* data, size_t count, DType dtype,
                                        ReduceOp op) override {
    check_buffer(data, count, dtype, "allreduce");
    return enqueue("allreduce", allreduce_op(data, count, dtype, op));
  }
  void allreduce(void* data, size_t count, DType dtype, ReduceOp op) override {
    check_buffer(data, count, dtype, "allreduce");
    run_blocking("allreduce", allreduce_op(data, count, dtype, op));
  }

  std::shared_ptr<Work> broadcast_async(void* data, size_t count, DType dtype, int root) override {
    check_root(data, count, dtype, root);
    return enqueue("broadcast", broadcast_op(data, count, dtype, root));
  }
  void broadcast(void* data, size_t count, DType dtype, int root) override {
    check_root(data, count, dtype, root);
    run_blocking("broadcast", broadcast_op(data, count, dtype, root));
  }

  std::shared_ptr<Work> allgather_async(const void* send, void* recv, size_t count,
                                        DType dtype) override {
    check_pair(send, recv, count, dtype, "allgather");
    return enqueue("allgather", allgather_op(send, recv, count, dtype));
  }
  void allgather(const void* send, void* recv, size_t count, DType dtype) override {
    check_pair(send, recv, count, dtype, "allgather");
    run_blocking("allgather", allgather_op(send, recv, count, dtype));
  }

  std::shared_ptr<Work> reduce_scatter_async(const void* send, void* recv, size_t count,
                                             DType dtype, ReduceOp op) override {
    check_pair(send, recv, count, dtype, "reduce_scatter");
    return enqueue("reduce_scatter", reduce_scatter_op(send, recv, count, dtype, op));
  }
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                      ReduceOp op) override {
    check_pair(send, recv, count, dtype, "reduce_scatter");
    run_blocking("reduce_scatter", reduce_scatter_op(send, recv, count, dtype, op));
  }

  void send(const void* data, size_t count, DType dtype, int peer) override {
    check_buffer(data, count, dtype, "send");
    check_peer(peer, "send to");
    size_t bytes = count * dtype_size(dtype);
    enqueue("send", [=, this](Deadline d) {
      transport_->wait(transport_->post_send(data, bytes, peer), d);
    })->wait();
  }

  void recv(void* data, size_t count, DType dtype, int peer) override {
    check_buffer(data, count, dtype, "recv");
    check_peer(peer, "receive from");
    size_t bytes = count * dtype_size(dtype);
    enqueue("recv", [=, this](Deadline d) {
      transport_->wait(transport_->post_recv(data, bytes, peer), d);
    })->wait();
  }

  void barrier() override {
    run_blocking("barrier", [this](Deadline d) {
      if (transport_->local() != nullptr) return transport_->local()->barrier(d);
      ring_.barrier(d);
    });
  }

  void abort(const std::string& reason) override {
    record_failure(ErrorKind::kComm, "tcp: communicator aborted: " + reason);
    transport_->fail(ErrorKind::kComm, "communicator aborted: " + reason);
  }

  void set_timeout(std::chrono::milliseconds timeout) override {
    DTRAIN_CHECK(timeout.count() > 0, InvalidArgument, "tcp: timeout must be positive, got {} ms",
                 timeout.count());
    timeout_ms_.store(timeout.count());
  }
  std::chrono::milliseconds timeout() const override {
    return std::chrono::milliseconds(timeout_ms_.load());
  }

  // Gathers every rank's (color, key) over this communicator, then the members of each
  // group build their own mesh through the same store under a tag of their own.
  std::unique_ptr<Communicator> split(int color, int key) override {
    split_detail::check_color(color, "tcp");
    std::vector<int64_t> mine = {color, key}, all(2 * static_cast<size_t>(size()));
    allgather(mine.data(), all.data(), 2, DType::i64);
    const uint64_t seq = splits_++;  // the same on every rank: split is collective
    split_detail::Group g = split_detail::group_of(all, rank());
    if (g.rank < 0) return nullptr;
    TcpOptions child = tcp_;
    child.tag = fmt::format("{}/split{}/c{}", tcp_.tag, seq, color);
    return make_tcp_communicator(*store_, g.rank, static_cast<int>(g.members.size()),
                                 CommOptions{timeout()}, child);
  }

  // ---- algorithm choice (every rank decides the same from the same arguments)

  Algo algorithm(Collective c, size_t bytes) const {
    return algorithm_for(tcp_.algos, c, bytes, caps_);
  }

 private:
  struct Op {
    const char* name;
    std::function<void(Deadline)> run;
    std::shared_ptr<TcpWork> work;
  };

  using Run = std::function<void(Deadline)>;

  Run allreduce_op(void* data, size_t count, DType dtype, ReduceOp op) {
    switch (algorithm(Collective::kAllreduce, count * dtype_size(dtype))) {
      case Algo::kLocal:
        return [=, this](Deadline d) { transport_->local()->allreduce(data, count, dtype, op, d); };
      case Algo::kDirect:
        return
            [=, this](Deadline d) { transport_->direct()->allreduce(data, count, dtype, op, d); };
      case Algo::kRecursiveDoubling:
        return [=, this](Deadline d) {
          recursive_doubling_allreduce(*transport_, data, count, dtype, op, d, scratch_);
        };
      default:
        return [=, this](Deadline d) { ring_.allreduce(data, count, dtype, op, d); };
    }
  }
  Run broadcast_op(void* data, size_t count, DType dtype, int root) {
    switch (algorithm(Collective::kBroadcast, count * dtype_size(dtype))) {
      case Algo::kLocal:
        return
            [=, this](Deadline d) { transport_->local()->broadcast(data, count, dtype, root, d); };
      case Algo::kDirect:
        return
            [=, this](Deadline d) { transport_->direct()->broadcast(data, count, dtype, root, d); };
      default:
        return [=, this](Deadline d) { ring_.broadcast(data, count, dtype, root, d); };
    }
  }
  Run allgather_op(const void* send, void* recv, size_t count, DType dtype) {
    switch (algorithm(Collective::kAllgather, count * dtype_size(dtype))) {
      case Algo::kLocal:
        return
            [=, this](Deadline d) { transport_->local()->allgather(send, recv, count, dtype, d); };
      case Algo::kDirect:
        return
            [=, this](Deadline d) { transport_->direct()->allgather(send, recv, count, dtype, d); };
      default:
        return [=, this](Deadline d) { ring_.allgather(send, recv, count, dtype, d); };
    }
  }
  Run reduce_scatter_op(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) {
    const size_t bytes = count * dtype_size(dtype) * static_cast<size_t>(size());
    switch (algorithm(Collective::kReduceScatter, bytes)) {
      case Algo::kLocal:
        return [=, this](Deadline d) {
          transport_->local()->reduce_scatter(send, recv, count, dtype, op, d);
        };
      case Algo::kDirect:
        return [=, this](Deadline d) {
          transport_->direct()->reduce_scatter(send, recv, count, dtype, op, d);
        };
      default:
        return [=, this](Deadline d) { ring_.reduce_scatter(send, recv, count, dtype, op, d); };
    }
  }

  // ---- argument checks (on the calling thread)

  void check_root(const void* data, size_t count, DType dtype, int root) const {
    check_buffer(data, count, dtype, "broadcast");
    DTRAIN_CHECK(root >= 0 && root < size(), InvalidArgument,
                 "tcp: broadcast root {} is not a rank of a world of size {}", root, size());
  }
  void check_pair(const void* send, const void* recv, size_t count, DType dtype,
                  const char* op) const {
    check_buffer(send, count, dtype, op);
    check_buffer(recv, count, dtype, op);
  }
  void check_buffer(const void* ptr, size_t count, DType dtype, const char* op) const {
    DTRAIN_CHECK(dtype_size(dtype) > 0, DTypeError, "tcp: {} got an unknown dtype {}", op,
                 static_cast<int>(dtype));
    DTRAIN_CHECK(ptr != nullptr || count == 0, InvalidArgument,
                 "tcp: {} of {} elements got a null buffer", op, count);
  }
  void check_peer(int peer, const char* what) const {
    DTRAIN_CHECK(peer >= 0 && peer < size() && peer != rank(), InvalidArgument,
                 "tcp: rank {} cannot {} rank {} (world size {})", rank(), what, peer, size());
  }

  std::shared_ptr<TcpWork> enqueue(const char* name, std::function<void(Deadline)> run) {
    throw_if_failed();
    auto work = std::make_shared<TcpWork>();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back({name, std::move(run), work});
    }
    cv_.notify_all();
    return work;
  }

  // A blocking call runs on the calling thread when the worker is idle and nothing is
  // queued (the same order as queuing it; no hand-off and wake-up between threads),
  // else it queues behind the pending operations and waits.
  void run_blocking(const char* name, Run run) {
    throw_if_failed();
    std::unique_lock<std::mutex> lock(mu_);
    if (running_ || !queue_.empty()) {
      lock.unlock();
      enqueue(name, std::move(run))->wait();
      return;
    }
    running_ = true;
    lock.unlock();
    Op op{name, std::move(run), nullptr};
    std::optional<Failure> error = run_op(op);
    lock.lock();
    running_ = false;
    lock.unlock();
    if (error) throw_failure(*error);
  }

  void throw_if_failed() const {
    if (std::optional<Failure> f = stored_failure()) throw_failure(*f);
  }

  // Keeps the first failure.
  void record_failure(ErrorKind kind, const std::string& message) {
    std::lock_guard<std::mutex> lock(fail_mu_);
    if (!failure_) failure_ = Failure{kind, message};
  }

  std::optional<Failure> stored_failure() const {
    std::lock_guard<std::mutex> lock(fail_mu_);
    return failure_;
  }

  // Runs one operation; returns why it failed, if it did.
  std::optional<Failure> run_op(Op& op) {
    if (std::optional<Failure> f = stored_failure()) return f;
    const auto timeout = std::chrono::milliseconds(timeout_ms_.load());
    try {
      // A peer that failed or left while we were idle; at most once a millisecond (a
      // syscall per peer; a wait notices a lost peer by itself within milliseconds).
      if (const auto now = tcp::Clock::now(); now >= next_peer_check_) {
        transport_->check_peers();
        next_peer_check_ = now + std::chrono::milliseconds(1);
      }
      op.run(tcp::Clock::now() + timeout);
      return std::nullopt;
    } catch (const Error& e) {
      ErrorKind kind = e.kind() == ErrorKind::kTimeout ? ErrorKind::kTimeout : ErrorKind::kComm;
      std::string message = fmt::format("{} during {}", e.message(), op.name);
      if (kind == ErrorKind::kTimeout) message += fmt::format(" (timeout {} ms)", timeout.count());
      return fail_op(kind, message);
    } catch (const std::exception& e) {
      return fail_op(ErrorKind::kComm, fmt::format("tcp: {} failed: {}", op.name, e.what()));
    }
  }

  Failure fail_op(ErrorKind kind, const std::string& message) {
    record_failure(kind, message);
    // Usually the transport failed first; otherwise tell the peers now.
    transport_->fail(kind, message.substr(message.rfind("tcp: ", 0) == 0 ? 5 : 0));
    return Failure{kind, message};
  }

  void worker_loop() {
    for (;;) {
      Op op;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        op = std::move(queue_.front());
        queue_.pop_front();
        running_ = true;
      }
      std::optional<Failure> error = run_op(op);
      {
        std::lock_guard<std::mutex> lock(mu_);
        running_ = false;  // before finish(): a waiter may destroy us right after
      }
      op.work->finish(std::move(error));
    }
  }

  std::unique_ptr<tcp::Transport> transport_;
  Ring ring_;       // used by the worker only
  Store* store_;    // the store this communicator was built through (for split)
  TcpOptions tcp_;  // its options: the children's tag derives from tcp_.tag
  AlgoCapabilities caps_;
  std::vector<std::byte> scratch_;  // recursive doubling's receive buffer (worker or inline)
  tcp::Clock::time_point next_peer_check_{};  // run_op only (worker or inline, never both)
  uint64_t splits_ = 0;                       // splits done so far (issuing thread only)
  std::atomic<int64_t> timeout_ms_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Op> queue_;  // GUARDED_BY(mu_)
  bool running_ = false;  // GUARDED_BY(mu_)
  bool stop_ = false;     // GUARDED_BY(mu_)

  mutable std::mutex fail_mu_;
  std::optional<Failure> failure_;  // GUARDED_BY(fail_mu_): the first failure

  std::thread worker_;  // last: starts after everything above exists
};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  DTRAIN_CHECK(end != v && *end == '\0' && x >= 0 && x <= (1ll << 30), InvalidArgument,
               "{}='{}' is not a non-negative integer", name, v);
  return static_cast<int>(x);
}

}  // namespace

TcpOptions TcpOptions::from_env() {
  TcpOptions o;
  if (const char* v = std::getenv("DTRAIN_TCP_BIND"); v != nullptr && *v != '\0') {
    o.bind_address = v;
  }
  if (const char* v = std::getenv("DTRAIN_TCP_ADVERTISE"); v != nullptr && *v != '\0') {
    o.advertise_host = v;
  }
  o.socket_buffer_bytes = env_int("DTRAIN_TCP_SOCKET_BUFFER", o.socket_buffer_bytes);
  o.ring.chunk_bytes =
      static_cast<size_t>(env_int("DTRAIN_TCP_CHUNK_BYTES", static_cast<int>(o.ring.chunk_bytes)));
  o.ring.cold_min_bytes = static_cast<size_t>(
      env_int("DTRAIN_TCP_COLD_MIN_BYTES", static_cast<int>(o.ring.cold_min_bytes)));
  o.spin_us = env_int("DTRAIN_TCP_SPIN_US", o.spin_us);
  o.pure_spin_us = env_int("DTRAIN_TCP_PURE_SPIN_US", o.pure_spin_us);
  if (const char* v = std::getenv("DTRAIN_SHM"); v != nullptr && *v != '\0') {
    const std::string s = v;
    DTRAIN_CHECK(s == "0" || s == "1", InvalidArgument, "DTRAIN_SHM='{}' must be 0 or 1", s);
    o.shm = s == "1";
  }
  o.shm_ring_bytes =
      static_cast<size_t>(env_int("DTRAIN_SHM_RING_BYTES", static_cast<int>(o.shm_ring_bytes)));
  if (const char* v = std::getenv("DTRAIN_DIRECT"); v != nullptr && *v != '\0') {
    const std::string s = v;
    DTRAIN_CHECK(s == "0" || s == "1", InvalidArgument, "DTRAIN_DIRECT='{}' must be 0 or 1", s);
    o.direct = s == "1";
  }
  o.direct_chunk_bytes = static_cast<size_t>(
      env_int("DTRAIN_DIRECT_CHUNK_BYTES", static_cast<int>(o.direct_chunk_bytes)));
  o.algos = AlgoOptions::from_env();
  return o;
}

std::optional<Algo> tcp_algorithm(const Communicator& comm, Collective c, size_t bytes) {
  const auto* tcp = dynamic_cast<const TcpCommunicator*>(&comm);
  if (tcp == nullptr) return std::nullopt;
  return tcp->algorithm(c, bytes);
}

std::unique_ptr<Communicator> make_tcp_communicator(Store& store, int rank, int size,
                                                    CommOptions opts) {
  return make_tcp_communicator(store, rank, size, opts, TcpOptions::from_env());
}

std::unique_ptr<Communicator> make_tcp_communicator(Store& store, int rank, int size,
                                                    CommOptions opts, const TcpOptions& tcp) {
  DTRAIN_CHECK(opts.timeout.count() > 0, InvalidArgument,
               "tcp: timeout must be positive, got {} ms", opts.timeout.count());
  auto transport =
      tcp::Transport::connect(store, rank, size, tcp, tcp::Clock::now() + opts.timeout);
  return std::make_unique<TcpCommunicator>(std::move(transport), opts, store, tcp);
}

}  // namespace dtrain::comm
