// MpiPointToPoint (see transport.h).
#include "mpi/transport.h"

#include <algorithm>

namespace dtrain::comm::mpi_detail {

void MpiPointToPoint::wait(const Request& request, Deadline deadline) {
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

PointToPoint::Request MpiPointToPoint::post(void* data, size_t bytes, int peer, bool is_send) {
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

void MpiPointToPoint::drop_pending() noexcept {
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

void wait_requests(const MpiRuntime& runtime, const AbortFlag& abort, int rank,
                   std::vector<MPI_Request> reqs, Deadline deadline, const char* what) {
  Poll poll(abort, deadline, rank);
  const auto start = Clock::now();
  for (;;) {
    int done = 0;
    {
      auto lock = runtime.lock_mpi();
      MPI_CHECK(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE),
                what);
    }
    if (done) return;
    poll.next([&] {
      return fmt::format(
          "after {} ms in {}: not every rank joined the collective",
          ms_of(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start)), what);
    });
  }
}

}  // namespace dtrain::comm::mpi_detail
