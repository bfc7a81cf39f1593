// shm::LocalCollectives: latency-bound collectives for a group whose ranks all share
// one host, through each rank's two collective slots (Slots in segment.h).
//
// Collective number s (1, 2, ...; every rank counts the same) uses buffer s % 2 of
// every rank's slots:
//   1. wait until every rank has posted s - 1: they have all finished collective
//      s - 2, the last one that read buffer s % 2, so it may be overwritten;
//   2. copy this rank's input into its own buffer (up to 24 bytes: into the cache
//      line of `posted`, half s % 2), publish posted = s (release) and ring the
//      peers' doorbells (a syscall only for a peer asleep in FUTEX_WAIT);
//   3. wait until every rank has posted s, then read what this rank needs straight
//      from the peers' buffers (mapped in this process).
// One copy in, one pass over the peers' inputs, and two waits on a cache line: no
// message framing, no chunk protocol, no thread hand-off. Reductions combine the
// inputs in rank order (((x0 op x1) op x2) ...) on every rank, so every rank holds
// the same bits; rank 1 starts from its own input, x1 op x0 equals x0 op x1.
//
// Used below a size threshold (the buffer size at most); the ring takes over above,
// where its pipelined chunks move more bytes per second (docs/collectives.md).
// Waiting is the transport's (spin, then sleep on the doorbell, watching the control
// sockets), so a lost peer or a passed deadline throws as in every other wait.
//
// Thread-safety: REQUIRES external synchronization (one collective at a time).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "dtrain/comm/ring.h"
#include "shm/segment.h"

namespace dtrain::comm::shm {

// Blocks until ready() returns true; throws CommError/TimeoutError as a transport wait.
using WaitUntil = std::function<void(const std::function<bool()>& ready, Deadline deadline)>;

class LocalCollectives {
 public:
  // slots[r] is rank r's (this rank's own at `rank`), bells[r] rank r's doorbell
  // (this rank's entry unused; an invalid Doorbell is never rung: the mpi backend's
  // waits poll and never sleep on one, and a ring is a locked instruction).
  LocalCollectives(int rank, std::vector<Slots> slots, std::vector<Doorbell> bells, WaitUntil wait);

  int rank() const { return rank_; }
  int size() const { return static_cast<int>(slots_.size()); }
  // Bytes one rank can place in a collective: the largest input of allreduce,
  // broadcast and allgather (per rank), and of reduce_scatter (all blocks).
  size_t capacity() const { return slots_[static_cast<size_t>(rank_)].bytes; }

  void allreduce(void* data, size_t count, DType dtype, ReduceOp op, Deadline deadline);
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                      Deadline deadline);
  void allgather(const void* send, void* recv, size_t count, DType dtype, Deadline deadline);
  void broadcast(void* data, size_t count, DType dtype, int root, Deadline deadline);
  void barrier(Deadline deadline);

  // The protocol's steps, for algorithms built on the slots (shm/direct_collective.h):
  // begin() starts the next collective number and returns this rank's buffer for it
  // (`bytes` at most capacity(), the same on every rank, so every rank picks the same
  // place), post() publishes it and waits until every rank has (steps 1-3 above);
  // input(r) is rank r's buffer of the current number.
  std::byte* begin(size_t bytes, Deadline deadline);
  void post(Deadline deadline);
  const std::byte* input(int r) const { return place(r); }

 private:
  void wait_posted(uint64_t seq, Deadline deadline);
  // Inputs of up to kInlineBytes travel in `posted`'s cache line (two halves, by
  // seq % 2), so a peer's wait brings them along: one cache-line transfer, not two.
  static constexpr size_t kInlineBytes = 24;
  static_assert(sizeof(uint64_t) + 2 * kInlineBytes <= 64, "posted and both halves: one line");
  std::byte* place(int r) const {
    const Slots& s = slots_[static_cast<size_t>(r)];
    return inline_ ? reinterpret_cast<std::byte*>(s.posted + 1) + (seq_ % 2) * kInlineBytes
                   : s.buffer[seq_ % 2];
  }
  // dst = input(0) op input(1) op ... over `count` elements from element `offset` of
  // each input; dst_holds_own: dst already holds this rank's input (allreduce).
  void reduce_inputs(std::byte* dst, size_t offset, size_t count, DType dtype, ReduceOp op,
                     bool dst_holds_own) const;

  int rank_;
  std::vector<Slots> slots_;
  std::vector<Doorbell> bells_;
  WaitUntil wait_;
  uint64_t seq_ = 0;
  bool inline_ = false;  // the running collective's inputs are in the posted lines
};

}  // namespace dtrain::comm::shm
