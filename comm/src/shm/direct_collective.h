// shm::DirectCollectives: single-copy collectives for a group whose ranks all share one
// host. Each rank reads its peers' buffers straight from their address spaces with
// process_vm_readv, and allreduce writes its results into theirs with process_vm_writev
// (Linux cross-memory attach, CMA): no byte is staged through shared memory, so a large
// allreduce moves about half the bytes the pipelined ring does.
//
// A collective is a few collectives of the one-host slots (local_collective.h) in a
// row: the first carries a header in this rank's slot (pid, the buffer peers read,
// count, dtype, collective, root), the later ones are empty phase barriers.
//   allreduce       header | reduce own block, push each chunk to every peer | barrier
//   reduce_scatter  header | reduce own block of every rank's send into recv | barrier
//   allgather       header | read every peer's send into recv | barrier
//   broadcast       header | read root's buffer (non-roots) | barrier
// The last barrier means no peer still reads or writes this rank's buffers when the
// call returns. Rank b owns block b of allreduce (count split evenly, the first
// count % n blocks one element longer) and reduces it alone, in rank order
// x0 op x1 op ... (as the slots do), in chunks of chunk_bytes: each peer's chunk is
// read into a scratch buffer that stays in cache and combined into the destination;
// avg scales the reduced chunk. allreduce then writes the reduced chunk, still in
// cache, into block b of every peer's buffer. That is safe without another barrier:
// block b of a peer's buffer is read by rank b alone, which has read that chunk
// before it writes it. Every rank therefore ends with the same bits, and with the
// bits of `local`. Per rank an allreduce of S bytes reads (n-1)/n S of peer memory
// into the scratch, reads and writes its own block once, and writes (n-1)/n S of
// peer memory from the cache.
//
// probe(), at communicator setup (collective): every rank publishes the address of a
// word holding a random value, reads every peer's word, compares and writes the same
// value back; then the ranks
// agree (a min-allreduce over the slots), so either all of them use direct or none.
// A read fails under a seccomp filter or ptrace rules (EPERM), without CMA (ENOSYS),
// or between users.
//
// Errors: a read that fails (ESRCH: the peer is gone; EFAULT) first lets
// check_peers() report a peer's own failure, else throws CommError naming the peer.
// Every wait is the slots' (the transport's, with its deadline). A peer that passes
// a different count, dtype or root is a CommError naming both calls.
//
// Thread-safety: REQUIRES external synchronization; shares the slot sequence with the
// LocalCollectives it is built on (one collective at a time on either).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "shm/local_collective.h"

namespace dtrain::comm::shm {

class DirectCollectives {
 public:
  // `slots` must outlive this object; check_peers() throws when the transport knows
  // of a lost or failed peer. chunk_bytes >= 8: the reduction's unit.
  DirectCollectives(LocalCollectives& slots, std::function<void()> check_peers, size_t chunk_bytes);

  int rank() const { return slots_.rank(); }
  int size() const { return slots_.size(); }

  // Collective, every rank at setup. `enabled` false: this rank takes part but votes
  // no (DTRAIN_DIRECT=0); `fault`: publishes an unreadable address (the tests' hook
  // for a failing read). Returns whether every rank read every peer; *why says why
  // not.
  bool probe(bool enabled, bool fault, Deadline deadline, std::string* why);

  void allreduce(void* data, size_t count, DType dtype, ReduceOp op, Deadline deadline);
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                      Deadline deadline);
  void allgather(const void* send, void* recv, size_t count, DType dtype, Deadline deadline);
  void broadcast(void* data, size_t count, DType dtype, int root, Deadline deadline);

 private:
  struct Header {
    uint64_t pid;
    uint64_t addr;  // the buffer peers read
    uint64_t count;
    uint64_t value;  // probe: the word at addr
    uint32_t kind;
    uint32_t dtype;
    int32_t root;
    uint32_t enabled;  // probe: the rank's vote
  };

  // This rank's header of a collective on `buffer`.
  static Header call(uint32_t kind, const void* buffer, size_t count, DType dtype, int root);
  // The header round: publishes `mine`, waits for every rank's, checks they match
  // (CommError otherwise) and keeps the peers' pids and addresses.
  void publish(const Header& mine, Deadline deadline);
  Header header(int r) const;
  // Reads `bytes` at `from` in rank r's memory into `to` (local); throws.
  void read(int r, uint64_t from, void* to, size_t bytes);
  // Writes `bytes` at `from` (local) to `to` in rank r's memory; throws.
  void write(int r, const void* from, uint64_t to, size_t bytes);
  // dst[0, count) = x0 op ... op x_{n-1} over elements [first, first + count) of
  // every rank's published buffer (this rank's own at `own`, local; may be dst).
  void reduce_block(std::byte* dst, const std::byte* own, size_t first, size_t count, DType dtype,
                    ReduceOp op);
  void reduce_chunk(std::byte* dst, const std::byte* own, size_t at, size_t count, DType dtype,
                    ReduceOp op);
  void barrier(Deadline deadline);

  LocalCollectives& slots_;
  std::function<void()> check_peers_;
  size_t chunk_bytes_;
  const char* running_ = "";        // the collective in progress, for messages
  std::vector<std::byte> scratch_;  // two chunks: the accumulator and the incoming one
  std::vector<pid_t> pid_;          // of the current collective, per rank
  std::vector<uint64_t> addr_;
  uint64_t probe_word_;
};

}  // namespace dtrain::comm::shm
