// WorkerSession: everything a worker process needs to take part in a job.
//
// From the identity its launcher gave it (worker_env.h) it builds the communicator:
//   - backend tcp (the default): joins the gRPC coordinator (rendezvous: rank, world
//     size, generation), bootstraps the tcp transport through the coordinator's
//     key-value store, and sends heartbeats;
//   - backend mpi: under mpirun, MPI itself is the bootstrap (no coordinator needed);
//   - a single process with no launcher: a one-rank tcp communicator, no sockets.
// "auto" picks mpi when started by mpirun without a coordinator address, else tcp.
//
// Recovery (tcp with a coordinator): the heartbeat thread watches the job's
// generation; when the coordinator moves to a newer one (a worker was lost) it
// aborts the communicator, so a blocked collective fails at once. rejoin() then
// reports the loss, joins the next generation (waiting for the coordinator while it
// restarts) and builds a fresh communicator. The checkpoint calls wrap the
// coordinator's two-phase commit.
//
// With --stall-timeout or --check-collectives the communicator is wrapped in the
// inspector (comm/inspector.h), whose progress records go to the same store.
//
// Thread-safety: created and used by the worker's main thread; the heartbeat sender
// runs its own thread.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "dtrain/comm/communicator.h"
#include "dtrain/coordinator/client.h"
#include "worker_env.h"

namespace dtrain::cli {

struct SessionOptions {
  std::string backend = "auto";  // auto | tcp | mpi | nccl (auto: nccl for a cuda device)
  std::string device = "cpu";    // "cpu" or "cuda:N": the nccl backend's GPU
  bool mpi_native = false;       // mpi: MPI's own collectives instead of dtrain's ring
  // The all-reduce algorithm (comm/algorithm.h: auto, ring, local, rd, native,
  // hierarchical); empty: DTRAIN_ALLREDUCE_ALGO or auto.
  std::string allreduce_algo;
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};  // every comm call
  std::chrono::milliseconds join_timeout{std::chrono::seconds(120)};
  // The stall and desync inspector (comm/inspector.h) around the world communicator:
  // a collective pending longer than stall_timeout is reported and fails (0: off);
  // check_collectives compares every collective's fingerprint across the ranks.
  std::chrono::milliseconds stall_timeout{0};
  bool check_collectives = false;
  // Fault injection (DTRAIN_TEST_STALL_AT=rank:seq): that rank holds before collective #seq.
  int test_stall_rank = -1;
  uint64_t test_stall_at = 0;
};

class WorkerSession {
 public:
  static std::unique_ptr<WorkerSession> open(const WorkerIdentity& id, const SessionOptions& o);
  ~WorkerSession();
  WorkerSession(const WorkerSession&) = delete;
  WorkerSession& operator=(const WorkerSession&) = delete;

  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }
  int local_rank() const { return identity_.local_rank; }
  const WorkerIdentity& identity() const { return identity_; }
  comm::Communicator& comm() { return *comm_; }
  const std::string& backend() const { return backend_; }
  // Tells the coordinator this rank failed (best effort) before the process exits.
  // fatal: the failure would repeat after a restart (the job fails at once).
  void report_failure(const std::string& reason, bool fatal = false);

  // A coordinator (tcp/nccl with more than one process, or mpi given one) is there.
  bool has_coordinator() const;
  // The training progress the next heartbeats carry (`dtrain status`); a no-op
  // without a coordinator. Thread-safe.
  void report_progress(const coordinator::WorkerProgress& progress);
  // The generation this session's communicator belongs to (0 without coordinator).
  uint64_t generation() const;
  // The coordinator has moved past generation() (the communicator is aborted).
  bool generation_over() const;
  // What the coordinator said at the last join (empty without coordinator).
  const coordinator::CheckpointRef& last_checkpoint() const;
  // Aborts the communicator, reports `reason` for this generation (ignored by the
  // coordinator when it already moved on), joins the next generation and builds a
  // new communicator. Returns false when the report ended the job (FAILED: recovery
  // off or restarts exhausted); throws when the join is refused (the coordinator's
  // reason) or the coordinator stays unreachable for the join timeout.
  // REQUIRES: has_coordinator().
  bool rejoin(const std::string& reason);

  // Two-phase checkpoint commit through the coordinator. REQUIRES: has_coordinator().
  std::string begin_checkpoint(coordinator::CheckpointBegin begin);
  coordinator::ShardCommit commit_shard(int64_t step, const coordinator::ShardInfo& shard);

 private:
  WorkerSession() = default;
  struct Coordinator;  // client, store, heartbeats
  // Connects to id.coordinator and joins the job (tcp/nccl: also builds the
  // communicator; mpi: the MPI communicator exists and must match the join).
  void attach_coordinator(const WorkerIdentity& id);
  // Records the generation `joined`, builds its communicator (not for mpi) and
  // starts its heartbeat thread.
  void connect_generation(const coordinator::JoinResult& joined);
  void connect_generation_comm(const coordinator::JoinResult& joined);
  void start_heartbeat(const coordinator::JoinResult& joined);
  // Joins, retrying while the generation moves or the coordinator restarts (until
  // the join timeout); throws at once when the job has failed or the join is refused.
  coordinator::JoinResult join_job(coordinator::JoinOptions jo);

  WorkerIdentity identity_;
  std::string backend_;
  std::unique_ptr<Coordinator> coord_;
  std::shared_ptr<void> mpi_runtime_;  // keeps MPI initialised while the session lives
  std::unique_ptr<comm::Communicator> comm_;
  SessionOptions options_;
};

}  // namespace dtrain::cli
