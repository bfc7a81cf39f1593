// HierarchicalCommunicator: all-reduce in two levels for several ranks per host.
//
// Built from a world communicator and each rank's host key (ranks with equal keys
// share a host). It splits the world twice (Communicator::split): a local
// communicator of the ranks on this host, ranked by world rank, and a cross
// communicator of the ranks with the same local index on every host. allreduce is
//   local reduce_scatter (shared memory on the tcp backend)
//   -> cross allreduce of this rank's shard (tcp or mpi, one rank per host on the wire)
//   -> local allgather.
// With H hosts of L ranks and S bytes, each host sends 2(H-1)/H x S over its link (L
// shards of S/L), where each ring edge crossing hosts carries 2(n-1)/n x S in the flat
// ring (2 hosts x 2 ranks: S against 1.5 S). Each stage has the timeout. A count not divisible by
// the local size is padded (zeros) to equal blocks in a scratch copy; the padding is never copied
// back. kAvg sums in both levels and divides by the world size once, as the flat ring does.
//
// Every other collective (broadcast, allgather, reduce_scatter, send/recv, barrier,
// split) is the world communicator's. All operations, forwarded ones included, run in
// issue order on one worker thread of this object, so async forms keep the
// Communicator contract (complete in issue order).
//
// Hosts must have equal rank counts: uneven hosts are refused at construction with
// InvalidArgument naming the hosts and their counts (no silent flat fall-back).
// Deliberately not here: pipelining the three stages over chunks, topology beyond
// two levels.
//
// Thread-safety: as Communicator (one issuing thread; abort() from any thread).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/comm/communicator.h"

namespace dtrain::comm {

// Where each world rank lives, as computed from the gathered host keys.
struct HostLayout {
  int hosts = 0;       // distinct keys
  int local_size = 0;  // ranks per host (equal on every host)
  int host_index = 0;  // this rank's host, hosts numbered by their lowest world rank
  int local_rank = 0;  // this rank's position on its host, by world rank
};

// The layout for `rank` given every rank's key (keys[r] is world rank r's). Throws
// InvalidArgument when hosts hold different numbers of ranks (message names them).
HostLayout host_layout(const std::vector<std::string>& keys, int rank);

// This process's host key: DTRAIN_HOST_ID when set, else host name, boot id and
// network namespace ("host/boot-id/net:[inode]"), so that network namespaces on one
// machine (which share the host name) count as different hosts.
std::string host_key_from_env();

class HierarchicalCommunicator final : public Communicator {
 public:
  // Collective over `world` (every rank calls it with its own key): gathers the keys,
  // checks the layout, splits the local and cross communicators. Takes ownership of
  // `world`; the children are split from it and destroyed before it.
  static std::unique_ptr<HierarchicalCommunicator> create(std::unique_ptr<Communicator> world,
                                                          const std::string& host_key);
  // The same over a world this object does not own: `world` must outlive it.
  static std::unique_ptr<HierarchicalCommunicator> create(Communicator& world,
                                                          const std::string& host_key);
  ~HierarchicalCommunicator() override;

  const HostLayout& layout() const { return layout_; }
  int rank() const override { return world_->rank(); }
  int size() const override { return world_->size(); }
  std::string backend() const override { return world_->backend(); }

  std::shared_ptr<Work> allreduce_async(void* data, size_t count, DType dtype,
                                        ReduceOp op) override;
  std::shared_ptr<Work> broadcast_async(void* data, size_t count, DType dtype, int root) override;
  std::shared_ptr<Work> allgather_async(const void* send, void* recv, size_t count,
                                        DType dtype) override;
  std::shared_ptr<Work> reduce_scatter_async(const void* send, void* recv, size_t count,
                                             DType dtype, ReduceOp op) override;
  // Blocking forms run on the calling thread when nothing is queued (Queue::run).
  void allreduce(void* data, size_t count, DType dtype, ReduceOp op) override;
  void broadcast(void* data, size_t count, DType dtype, int root) override;
  void allgather(const void* send, void* recv, size_t count, DType dtype) override;
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                      ReduceOp op) override;
  void send(const void* data, size_t count, DType dtype, int peer) override;
  void recv(void* data, size_t count, DType dtype, int peer) override;
  void barrier() override;
  void abort(const std::string& reason) override;
  void set_timeout(std::chrono::milliseconds timeout) override;
  std::chrono::milliseconds timeout() const override { return world_->timeout(); }
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  class Queue;  // the worker thread running the operations in issue order
  HierarchicalCommunicator(Communicator& world, std::unique_ptr<Communicator> owned,
                           const HostLayout& layout);
  // Runs on the worker (or inline): local reduce_scatter -> cross allreduce -> local allgather.
  void run_allreduce(void* data, size_t count, DType dtype, ReduceOp op);

  std::unique_ptr<Communicator> owned_world_;  // null when the caller owns the world
  Communicator* world_;
  HostLayout layout_;
  std::unique_ptr<Communicator> local_;    // this host's ranks, by world rank
  std::unique_ptr<Communicator> cross_;    // one rank per host, same local rank
  std::vector<std::byte> padded_, shard_;  // scratch of the running task (one at a time)
  std::unique_ptr<Queue> queue_;           // last: joined before the communicators go
};

}  // namespace dtrain::comm
