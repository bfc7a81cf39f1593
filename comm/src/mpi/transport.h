// The mpi backend's waiting and point-to-point pieces, shared by its sources: the
// abort flag a communicator and its transports share, the polling rhythm of every wait
// (Poll), and comm::PointToPoint over MPI_Isend/MPI_Irecv (MpiPointToPoint, what the
// ring collectives and the user's send/recv run on). Private to dtrain_comm_mpi.
//
// Poll: MPI only progresses inside MPI calls, so a wait spins for the first 50 us,
// then yields the CPU between tests (ranks may be oversubscribed), and once it has
// lasted 5 ms sleeps 50 us between tests (a stuck peer should not burn a core for the
// whole timeout; a live transfer keeps progressing).
#pragma once

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/mpi.h"
#include "dtrain/comm/ring.h"
#include "mpi/mpi_internal.h"

namespace dtrain::comm::mpi_detail {

using Clock = std::chrono::steady_clock;

// MPI counts are int: larger messages travel as several MPI messages of at most 1 GiB.
constexpr size_t kMaxMessageBytes = size_t{1} << 30;
static_assert(kMaxMessageBytes <= static_cast<size_t>(INT_MAX));
constexpr size_t kMaxMpiCount = static_cast<size_t>(INT_MAX);

inline long long ms_of(std::chrono::milliseconds d) { return static_cast<long long>(d.count()); }

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
  void wait(const Request& request, Deadline deadline) override;

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

  Request post(void* data, size_t bytes, int peer, bool is_send);

  // After a failure: cancel pending receives so they never write their buffers, and
  // release the requests. MPI cannot cancel sends; they may still read their buffers.
  void drop_pending() noexcept;

  const MpiRuntime& runtime_;
  MPI_Comm comm_;
  int tag_, rank_, size_;
  const AbortFlag& abort_;
  uint64_t seq_ = 0;
  bool failed_ = false;
  std::deque<Entry> pending_;  // in post order
};

// Polls collective requests until all complete (MPI_Testall, Poll's rhythm). On timeout
// or abort they are abandoned: MPI forbids cancelling or freeing a pending collective.
void wait_requests(const MpiRuntime& runtime, const AbortFlag& abort, int rank,
                   std::vector<MPI_Request> reqs, Deadline deadline, const char* what);

}  // namespace dtrain::comm::mpi_detail
