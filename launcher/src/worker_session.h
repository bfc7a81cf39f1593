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
// Thread-safety: created and used by the worker's main thread; the heartbeat sender
// runs its own thread.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "dtrain/comm/communicator.h"
#include "worker_env.h"

namespace dtrain::cli {

struct SessionOptions {
  std::string backend = "auto";  // auto | tcp | mpi
  bool mpi_native = false;       // mpi: MPI's own collectives instead of dtrain's ring
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};  // every comm call
  std::chrono::milliseconds join_timeout{std::chrono::seconds(120)};
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
  void report_failure(const std::string& reason);

 private:
  WorkerSession() = default;
  struct Coordinator;  // client, store, heartbeats (tcp backend only)

  WorkerIdentity identity_;
  std::string backend_;
  std::unique_ptr<Coordinator> coord_;
  std::shared_ptr<void> mpi_runtime_;  // keeps MPI initialised while the session lives
  std::unique_ptr<comm::Communicator> comm_;
};

}  // namespace dtrain::cli
