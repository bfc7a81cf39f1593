// Ring collectives written once over a small point-to-point interface.
//
// PointToPoint is what a transport must offer (tcp implements it over sockets, mpi
// over MPI_Isend/MPI_Irecv): non-blocking sends and receives of bytes to and from a
// peer, and a wait with a deadline that keeps every posted request moving, so sends
// and receives progress concurrently. Ring runs the collectives on top of it:
//
//   allreduce      = reduce-scatter then all-gather, n-1 steps each (busbw-optimal)
//   reduce_scatter = the first half of allreduce, out of place
//   allgather      = the second half, out of place
//   broadcast      = a pipelined chain root -> root+1 -> ... -> root-1
//   barrier        = a 1-byte allgather
//
// When the transport can reduce on receive (PointToPoint::can_recv_reduce), the
// in-place reduction steps of allreduce receive straight into the destination,
// combining as the bytes arrive, and use no scratch.
//
// Every segment is cut into chunks (RingOptions::chunk_bytes) and the steps are
// pipelined per chunk: chunk k of step s+1 is sent as soon as chunk k of step s has
// been received and reduced, up to `window` receives are posted ahead, and the
// reduction reads a chunk that was just received (still in cache) while the
// transport carries the next ones. Counts of any size work (segments may be empty
// when count < size); size 1 only copies.
//
// Deliberately not here: sockets, threads, error recovery. A transport error leaves
// the PointToPoint failed; Ring just lets the exception through.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dtrain/comm/communicator.h"

namespace dtrain::comm {

using Deadline = std::chrono::steady_clock::time_point;

// A byte transport between the ranks of one group.
// Thread-safety: REQUIRES external synchronization (one thread posts and waits);
// implementations say which calls (such as an abort) are safe from other threads.
class PointToPoint {
 public:
  // Identifies a posted request; filled in by the implementation, opaque to callers.
  struct Request {
    int peer = -1;
    bool is_send = false;
    uint64_t seq = 0;
  };

  virtual ~PointToPoint() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Queue a send of `bytes` (> 0) bytes to `peer` (!= rank). The buffer must stay
  // valid and unchanged until the request completes. Sends to one peer are delivered
  // in post order; receives from one peer are filled in post order, and a receive of
  // N bytes takes the next N bytes that peer sends (callers always post receives of
  // exactly the sizes the peer sends, so message and stream transports agree).
  virtual Request post_send(const void* data, size_t bytes, int peer) = 0;
  virtual Request post_recv(void* data, size_t bytes, int peer) = 0;
  // A receive whose destination is not read again soon (the copy steps of a
  // collective larger than the caches): a transport may write it around them
  // (non-temporal stores), saving the read-for-ownership of every destination line.
  // The default is post_recv.
  virtual Request post_recv_cold(void* data, size_t bytes, int peer) {
    return post_recv(data, bytes, peer);
  }

  // Optional: a receive of `count` elements from `peer` that combines them into
  // `data` with reduce_into(data, incoming, count, dtype, op) instead of
  // overwriting it, so the transport can reduce straight from its own buffers (the
  // shared-memory rings) without a scratch copy. Only when can_recv_reduce(peer);
  // the default implementation has none.
  virtual bool can_recv_reduce(int /*peer*/) const { return false; }
  virtual Request post_recv_reduce(void* data, size_t count, DType dtype, ReduceOp op, int peer);

  // Blocks until `request` completes, moving every posted request forward meanwhile.
  // Throws CommError when a peer is lost or the transport was aborted, TimeoutError
  // (naming the peers it was waiting for) when `deadline` passes first. After a
  // throw the transport is failed: pending requests are dropped and never touch
  // their buffers again.
  virtual void wait(const Request& request, Deadline deadline) = 0;
};

struct RingOptions {
  // Pipeline unit: each segment travels in chunks of this many bytes. Measured on
  // loopback TCP (2 ranks, 64 MiB f32): 1 MiB chunks cost ~25% less CPU per byte
  // than 256 KiB ones (fewer syscalls and acknowledgements) and pipeline as well.
  size_t chunk_bytes = 1 << 20;
  // Receives posted ahead; during reductions each is a scratch buffer of
  // chunk_bytes (out-of-place reduce_scatter keeps twice as many).
  int window = 4;
  // Collectives of at least this many bytes (the whole buffer) receive their copy
  // steps with post_recv_cold. Measured (2 ranks, one host, 2-core VM, comm/README.md):
  // streaming the copies lifted 64 MiB all-reduces from 4.3-4.7 to 5.6-5.7 GB/s busbw
  // but cost 1-16 MiB a tenth to a third (their destinations were still in cache).
  size_t cold_min_bytes = size_t{48} << 20;
};

// The ring collectives over one PointToPoint. Buffer semantics are Communicator's;
// send and recv must not overlap, except that allgather's send may be recv's own
// block (in place). Every rank must use the same RingOptions.
// Thread-safety: REQUIRES external synchronization (one collective at a time).
class Ring {
 public:
  explicit Ring(PointToPoint& p2p, RingOptions options = {});

  void allreduce(void* data, size_t count, DType dtype, ReduceOp op, Deadline deadline);
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                      Deadline deadline);
  void allgather(const void* send, void* recv, size_t count, DType dtype, Deadline deadline);
  void broadcast(void* data, size_t count, DType dtype, int root, Deadline deadline);
  void barrier(Deadline deadline);

  const RingOptions& options() const { return opts_; }

 private:
  struct Pass;
  void run(const Pass& pass, Deadline deadline);

  PointToPoint& p2p_;
  RingOptions opts_;
  std::vector<std::byte> scratch_;  // window * chunk bytes, kept between calls
};

}  // namespace dtrain::comm
