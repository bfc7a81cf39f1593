#include "worker_session.h"

#include <fmt/format.h>
#include <unistd.h>

#include "dtrain/comm/mpi.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/coordinator/client.h"
#include "dtrain/coordinator/grpc_store.h"
#include "dtrain/coordinator/heartbeat.h"

namespace dtrain::cli {

struct WorkerSession::Coordinator {
  std::optional<coordinator::CoordinatorClient> client;
  std::unique_ptr<coordinator::GrpcStore> store;
  std::unique_ptr<comm::PrefixStore> prefixed;
  std::unique_ptr<coordinator::HeartbeatSender> heartbeat;
  comm::MemoryStore local;  // single-process sessions
  int rank = 0;
  uint64_t generation = 0;
};

WorkerSession::~WorkerSession() {
  if (coord_ && coord_->heartbeat) coord_->heartbeat->stop();
  comm_.reset();  // close sockets / free the MPI communicator before MPI_Finalize
  if (coord_ && coord_->client && coord_->store) {
    try {
      coord_->client->leave(coord_->rank, coord_->generation);
    } catch (const std::exception&) {
      // The coordinator may already be gone at shutdown; nothing to recover.
    }
  }
}

std::unique_ptr<WorkerSession> WorkerSession::open(const WorkerIdentity& id,
                                                   const SessionOptions& o) {
  std::unique_ptr<WorkerSession> s(new WorkerSession());
  s->identity_ = id;
  std::string backend = o.backend;
  if (backend == "auto") {
    backend = (id.launcher == "mpirun" && id.coordinator.empty()) ? "mpi" : "tcp";
  }
  DTRAIN_CHECK(backend == "tcp" || backend == "mpi", InvalidArgument,
               "--backend {}: expected auto, tcp or mpi", o.backend);
  s->backend_ = backend;
  comm::CommOptions copts;
  copts.timeout = o.timeout;

  if (backend == "mpi") {
    auto runtime = comm::MpiRuntime::init();
    s->mpi_runtime_ = runtime;
    comm::MpiOptions mo;
    mo.algorithm = o.mpi_native ? comm::MpiAlgorithm::kNative : comm::MpiAlgorithm::kRing;
    s->comm_ = comm::make_mpi_communicator(runtime, copts, mo);
    return s;
  }

  s->coord_ = std::make_unique<Coordinator>();
  Coordinator& c = *s->coord_;
  if (id.world_size == 1 && id.coordinator.empty()) {
    s->comm_ = comm::make_tcp_communicator(c.local, 0, 1, copts);
    return s;
  }
  DTRAIN_CHECK(!id.coordinator.empty(), InvalidArgument,
               "rank {} of {} (started by {}) has no coordinator address: set "
               "DTRAIN_COORDINATOR=host:port (or MASTER_ADDR/MASTER_PORT), start the job with "
               "`dtrain launch`, or use --backend mpi under mpirun",
               id.rank, id.world_size, id.launcher);
  coordinator::ClientOptions co;
  co.address = id.coordinator;
  co.job_id = id.job_id.empty() ? "default" : id.job_id;
  co.token = id.token;
  c.client.emplace(coordinator::CoordinatorClient::connect(co));
  coordinator::JoinOptions jo;
  if (id.launcher != "none") jo.rank = id.rank;
  jo.timeout = o.join_timeout;
  coordinator::JoinResult joined = c.client->join(jo);
  DTRAIN_CHECK(joined.world_size == id.world_size, InvalidArgument,
               "coordinator {} runs a job of {} workers but this worker was started as one of {}",
               id.coordinator, joined.world_size, id.world_size);
  c.rank = joined.rank;
  c.generation = joined.generation;
  c.store = std::make_unique<coordinator::GrpcStore>(*c.client);
  comm::TcpOptions topts = comm::TcpOptions::from_env();
  topts.tag = fmt::format("{}-g{}", co.job_id, joined.generation);
  c.prefixed = std::make_unique<comm::PrefixStore>(topts.tag + "/", *c.store);
  s->comm_ = comm::make_tcp_communicator(*c.prefixed, joined.rank, joined.world_size, copts, topts);
  coordinator::HeartbeatSender::Options ho;
  ho.rank = joined.rank;
  ho.generation = joined.generation;
  c.heartbeat = std::make_unique<coordinator::HeartbeatSender>(*c.client, ho);
  return s;
}

void WorkerSession::report_failure(const std::string& reason) {
  if (comm_) comm_->abort(reason);
  if (!coord_ || !coord_->client || !coord_->store) return;
  try {
    coord_->client->report_failure(coord_->rank, reason, coord_->rank, coord_->generation);
  } catch (const std::exception&) {
    // Best effort: the coordinator may be the thing that failed.
  }
}

}  // namespace dtrain::cli
