#include "worker_session.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <thread>

#include "dtrain/comm/hierarchical.h"
#include "dtrain/comm/inspector.h"
#include "dtrain/comm/mpi.h"
#include "dtrain/comm/nccl.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/coordinator/client.h"
#include "dtrain/coordinator/grpc_store.h"
#include "dtrain/coordinator/heartbeat.h"
#include "dtrain/engine/cuda/runtime.h"
#include "logging.h"

namespace dtrain::cli {

// Thread-safety: newest_generation is written by the heartbeat thread; the rest is
// used by the worker's main thread only (the heartbeat is stopped before a rejoin
// replaces it).
namespace {

// Bootstraps NCCL under mpirun without a coordinator: the one key rank 0 sets
// ("nccl/unique_id") is broadcast over MPI to the ranks that get it. Valid for
// make_nccl_communicator's protocol only (rank 0 sets once, every other rank gets once).
class MpiBroadcastStore final : public comm::Store {
 public:
  explicit MpiBroadcastStore(comm::Communicator& mpi) : mpi_(mpi) {}
  void set(const std::string& /*key*/, const std::string& value) override {
    DTRAIN_CHECK(mpi_.rank() == 0, InvalidArgument, "MpiBroadcastStore: only rank 0 sets");
    int64_t n = static_cast<int64_t>(value.size());
    mpi_.broadcast(&n, 1, DType::i64, 0);
    std::string copy = value;
    mpi_.broadcast(copy.data(), copy.size(), DType::u8, 0);
  }
  std::string get(const std::string& /*key*/, std::chrono::milliseconds /*timeout*/) override {
    int64_t n = 0;
    mpi_.broadcast(&n, 1, DType::i64, 0);
    DTRAIN_CHECK(n >= 0 && n <= (1 << 20), CommError,
                 "MpiBroadcastStore: rank 0 sent a value of {} bytes", n);
    std::string value(static_cast<size_t>(n), '\0');
    mpi_.broadcast(value.data(), value.size(), DType::u8, 0);
    return value;
  }

 private:
  comm::Communicator& mpi_;
};

comm::NcclOptions nccl_options(const std::string& device_text, const comm::CommOptions& copts) {
  const Device device = cuda::parse_device(device_text);
  DTRAIN_CHECK(device.is_cuda(), InvalidArgument,
               "--backend nccl: NCCL moves GPU memory; add --device cuda (one GPU per worker)");
  cuda::require_device(device);  // "no CUDA device: <driver's error>"
  comm::NcclOptions no;
  no.device = device.index;
  no.compute_stream = cuda::compute_stream(device);  // ordered against the engine's work
  no.comm = copts;
  return no;
}

// The environment's algorithm table, with --allreduce-algo over DTRAIN_ALLREDUCE_ALGO.
comm::AlgoOptions algo_options(const SessionOptions& o) {
  comm::AlgoOptions a = comm::AlgoOptions::from_env();
  if (!o.allreduce_algo.empty()) {
    a[comm::Collective::kAllreduce] = comm::parse_algo(o.allreduce_algo, "--allreduce-algo");
  }
  return a;
}

std::unique_ptr<comm::Communicator> make_nccl(comm::Store& store, int rank, int size,
                                              const comm::NcclOptions& options) {
#ifdef DTRAIN_WITH_CUDA
  return comm::make_nccl_communicator(store, rank, size, options);
#else
  (void)store, (void)rank, (void)size, (void)options;  // nccl_options threw already
  DTRAIN_THROW(UnsupportedError, "--backend nccl: dtrain was built without the CUDA backend");
#endif
}

// The world communicator, wrapped in the stall and desync inspector when asked for. store:
// where the ranks' progress goes (null: reports name this rank only); checker: the host
// communicator carrying the fingerprints (null: a split of c, not possible for nccl).
std::unique_ptr<comm::Communicator> inspected(std::unique_ptr<comm::Communicator> c,
                                              comm::Store* store, const SessionOptions& o,
                                              std::unique_ptr<comm::Communicator> checker = {}) {
  if (o.stall_timeout.count() == 0 && !o.check_collectives) return c;
  comm::InspectorOptions io;
  io.stall_timeout = o.stall_timeout;
  io.check_collectives = o.check_collectives;
  io.log = [](const std::string& line) { spdlog::warn("{}", line); };  // stall reports
  if (c->rank() == o.test_stall_rank) io.test_hold_at = o.test_stall_at;
  return comm::make_inspected_communicator(std::move(c), store, std::move(io), std::move(checker));
}

// Hierarchical all-reduce (comm/hierarchical.h) wraps the world when asked for.
std::unique_ptr<comm::Communicator> with_allreduce_algo(std::unique_ptr<comm::Communicator> world,
                                                        const SessionOptions& o) {
  if (algo_options(o)[comm::Collective::kAllreduce] != comm::Algo::kHierarchical ||
      world->size() == 1) {
    return world;
  }
  return comm::HierarchicalCommunicator::create(std::move(world), comm::host_key_from_env());
}

}  // namespace

struct WorkerSession::Coordinator {
  std::optional<coordinator::CoordinatorClient> client;
  std::unique_ptr<coordinator::GrpcStore> store;
  std::unique_ptr<comm::PrefixStore> prefixed;
  std::unique_ptr<coordinator::HeartbeatSender> heartbeat;
  comm::MemoryStore local;  // single-process sessions
  int rank = 0;
  uint64_t generation = 0;
  std::atomic<uint64_t> newest_generation{0};  // the newest the coordinator announced
  coordinator::CheckpointRef last_checkpoint;
  std::string job_id;
  // What the heartbeats carry (report_progress writes, the heartbeat thread reads).
  std::mutex progress_mu;
  std::optional<coordinator::WorkerProgress> progress;  // GUARDED_BY(progress_mu)
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
  s->options_ = o;
  std::string backend = o.backend;
  if (backend == "auto") {
    if (o.device != "cpu") {
      backend = "nccl";
    } else {
      backend = (id.launcher == "mpirun" && id.coordinator.empty()) ? "mpi" : "tcp";
    }
  }
  DTRAIN_CHECK(backend == "tcp" || backend == "mpi" || backend == "nccl", InvalidArgument,
               "--backend {}: expected auto, tcp, mpi or nccl", o.backend);
  s->backend_ = backend;
  comm::CommOptions copts;
  copts.timeout = o.timeout;
  if (backend == "nccl") (void)nccl_options(o.device, copts);  // fail early, one line
  DTRAIN_CHECK(backend != "nccl" || o.allreduce_algo == "ring", UnsupportedError,
               "--allreduce-algo {}: tcp and mpi backends only (NCCL picks its own)",
               o.allreduce_algo);

  if (backend == "nccl" && id.launcher == "mpirun" && id.coordinator.empty()) {
    auto runtime = comm::MpiRuntime::init();
    s->mpi_runtime_ = runtime;
    auto mpi = comm::make_mpi_communicator(runtime, copts, comm::MpiOptions{});
    MpiBroadcastStore store(*mpi);
    s->comm_ = inspected(make_nccl(store, mpi->rank(), mpi->size(), nccl_options(o.device, copts)),
                         nullptr, o);
    return s;
  }
  if (backend == "mpi") {
    auto runtime = comm::MpiRuntime::init();
    s->mpi_runtime_ = runtime;
    comm::MpiOptions mo;
    mo.algorithm = o.mpi_native ? comm::MpiAlgorithm::kNative : comm::MpiAlgorithm::kAuto;
    mo.algos = algo_options(o);
    s->comm_ = inspected(with_allreduce_algo(comm::make_mpi_communicator(runtime, copts, mo), o),
                         nullptr, o);
    // Given a coordinator, MPI moves the data and the coordinator commits checkpoints
    // and tracks the job (a lost rank ends the mpirun job; a rerun resumes).
    if (!id.coordinator.empty()) s->attach_coordinator(id);
    return s;
  }

  s->coord_ = std::make_unique<Coordinator>();
  Coordinator& c = *s->coord_;
  if (id.world_size == 1 && id.coordinator.empty()) {
    s->comm_ = inspected(backend == "nccl" ? make_nccl(c.local, 0, 1, nccl_options(o.device, copts))
                                           : comm::make_tcp_communicator(c.local, 0, 1, copts),
                         &c.local, o, nullptr);
    return s;
  }
  DTRAIN_CHECK(!id.coordinator.empty(), InvalidArgument,
               "rank {} of {} (started by {}) has no coordinator address: set "
               "DTRAIN_COORDINATOR=host:port (or MASTER_ADDR/MASTER_PORT), start the job with "
               "`dtrain launch`, or use --backend mpi under mpirun",
               id.rank, id.world_size, id.launcher);
  s->attach_coordinator(id);
  return s;
}

void WorkerSession::attach_coordinator(const WorkerIdentity& id) {
  if (!coord_) coord_ = std::make_unique<Coordinator>();
  Coordinator& c = *coord_;
  coordinator::ClientOptions co;
  co.address = id.coordinator;
  co.job_id = id.job_id.empty() ? "default" : id.job_id;
  co.token = id.token;
  co.tls_from_env();
  c.job_id = co.job_id;
  c.client.emplace(coordinator::CoordinatorClient::connect(co));
  coordinator::JoinOptions jo;
  if (id.launcher != "none") jo.rank = id.rank;
  c.store = std::make_unique<coordinator::GrpcStore>(*c.client);
  connect_generation(join_job(jo));
}

void WorkerSession::connect_generation(const coordinator::JoinResult& joined) {
  Coordinator& c = *coord_;
  c.rank = joined.rank;
  c.generation = joined.generation;
  c.newest_generation = joined.generation;
  c.last_checkpoint = joined.last_checkpoint;
  set_log_membership(joined.generation, joined.rank, joined.world_size);
  if (backend_ == "mpi") {
    DTRAIN_CHECK(joined.rank == comm_->rank() && joined.world_size == comm_->size(),
                 InvalidArgument,
                 "the coordinator made this process rank {} of {}, but MPI says rank {} of {}: "
                 "start the coordinator with --world-size {} for this mpirun",
                 joined.rank, joined.world_size, comm_->rank(), comm_->size(), comm_->size());
  } else {
    connect_generation_comm(joined);
  }
  start_heartbeat(joined);
}

void WorkerSession::connect_generation_comm(const coordinator::JoinResult& joined) {
  Coordinator& c = *coord_;
  comm::CommOptions copts;
  copts.timeout = options_.timeout;
  comm::TcpOptions topts = comm::TcpOptions::from_env();
  topts.algos = algo_options(options_);
  topts.tag = fmt::format("{}-g{}", c.job_id, joined.generation);
  c.prefixed = std::make_unique<comm::PrefixStore>(topts.tag + "/", *c.store);
  if (backend_ == "nccl") {
    std::unique_ptr<comm::Communicator> checker;  // the fingerprints travel on the host
    if (options_.check_collectives) {
      comm::TcpOptions t = topts;
      t.tag += "/inspect";
      checker = comm::make_tcp_communicator(*c.prefixed, joined.rank, joined.world_size, copts, t);
    }
    comm_ = inspected(make_nccl(*c.prefixed, joined.rank, joined.world_size,
                                nccl_options(options_.device, copts)),
                      c.prefixed.get(), options_, std::move(checker));
  } else {
    comm_ = inspected(
        with_allreduce_algo(
            comm::make_tcp_communicator(*c.prefixed, joined.rank, joined.world_size, copts, topts),
            options_),
        c.prefixed.get(), options_);
  }
}

void WorkerSession::start_heartbeat(const coordinator::JoinResult& joined) {
  Coordinator& c = *coord_;
  coordinator::HeartbeatSender::Options ho;
  ho.rank = joined.rank;
  ho.generation = joined.generation;
  if (joined.heartbeat_interval.count() > 0) ho.interval = joined.heartbeat_interval;
  // A newer generation means a worker was lost: fail this generation's pending and
  // future collectives at once (the heartbeat lives no longer than this communicator).
  comm::Communicator* comm = comm_.get();
  Coordinator* cp = &c;
  ho.on_change = [comm, cp](const coordinator::HeartbeatSnapshot& snap) {
    const uint64_t mine = cp->generation;
    if (!snap.last_error.empty() || snap.last.generation <= mine) return;
    cp->newest_generation = snap.last.generation;
    comm->abort(fmt::format("generation {} is over (the coordinator is at generation {}{})", mine,
                            snap.last.generation,
                            snap.last.reason.empty() ? "" : ": " + snap.last.reason));
  };
  ho.progress = [cp]() -> std::optional<coordinator::WorkerProgress> {
    std::lock_guard<std::mutex> lock(cp->progress_mu);
    return cp->progress;
  };
  c.heartbeat = std::make_unique<coordinator::HeartbeatSender>(*c.client, ho);
}

void WorkerSession::report_progress(const coordinator::WorkerProgress& progress) {
  if (!coord_) return;
  std::lock_guard<std::mutex> lock(coord_->progress_mu);
  coord_->progress = progress;
}

bool WorkerSession::has_coordinator() const {
  return coord_ && coord_->client.has_value() && coord_->store != nullptr;
}

uint64_t WorkerSession::generation() const { return coord_ ? coord_->generation : 0; }

bool WorkerSession::generation_over() const {
  return coord_ && coord_->newest_generation.load() > coord_->generation;
}

const coordinator::CheckpointRef& WorkerSession::last_checkpoint() const {
  static const coordinator::CheckpointRef kNone{};
  return coord_ ? coord_->last_checkpoint : kNone;
}

bool WorkerSession::rejoin(const std::string& reason) {
  DTRAIN_CHECK(has_coordinator(), InternalError, "rejoin: this session has no coordinator");
  Coordinator& c = *coord_;
  const int old_rank = c.rank;
  const uint64_t old_generation = c.generation;
  if (backend_ == "mpi") {  // MPI cannot replace a rank: end this run, a rerun resumes
    c.heartbeat->stop();
    report_failure(reason);
    return false;
  }
  c.heartbeat->stop();
  c.heartbeat.reset();
  comm_->abort(reason);
  comm_.reset();
  c.prefixed.reset();
  try {
    if (c.client->report_failure(-1, reason, old_rank, old_generation) ==
        coordinator::JobState::kFailed) {
      return false;
    }
  } catch (const Error&) {
    // The coordinator may be restarting; the join below waits for it.
  }
  coordinator::JoinOptions jo;
  jo.rank = old_rank;
  jo.previous_rank = old_rank;
  jo.previous_generation = old_generation;
  connect_generation(join_job(jo));
  return true;
}

coordinator::JoinResult WorkerSession::join_job(coordinator::JoinOptions jo) {
  Coordinator& c = *coord_;
  const auto deadline = std::chrono::steady_clock::now() + options_.join_timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    jo.timeout = std::max(left, std::chrono::milliseconds(1));
    try {
      coordinator::JoinResult joined = c.client->join(jo);
      // Fewer (elastic, after a loss) is fine; more means another job's coordinator.
      DTRAIN_CHECK(joined.world_size == identity_.world_size ||
                       (joined.generation > 1 && joined.world_size < identity_.world_size),
                   InvalidArgument,
                   "coordinator {} runs a job of {} workers but this worker was started as one "
                   "of {}",
                   identity_.coordinator, joined.world_size, identity_.world_size);
      return joined;
    } catch (const CommError&) {
      // ABORTED (the generation moved again, or the job failed, during the
      // rendezvous) or UNAVAILABLE (the coordinator is restarting): try again until
      // the join timeout, unless the job has failed.
      std::optional<coordinator::JobStatus> st;
      try {
        st = c.client->status();
      } catch (const Error&) {
        // Not reachable now: retry the join.
      }
      if (st && st->state == coordinator::JobState::kFailed) {
        DTRAIN_THROW(CommError, "cannot join job '{}': it has failed: {}", c.job_id, st->reason);
      }
      if (std::chrono::steady_clock::now() >= deadline) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
}

std::string WorkerSession::begin_checkpoint(coordinator::CheckpointBegin begin) {
  DTRAIN_CHECK(has_coordinator(), InternalError, "begin_checkpoint: no coordinator");
  begin.rank = coord_->rank;
  begin.generation = coord_->generation;
  return coord_->client->begin_checkpoint(begin);
}

coordinator::ShardCommit WorkerSession::commit_shard(int64_t step,
                                                     const coordinator::ShardInfo& shard) {
  DTRAIN_CHECK(has_coordinator(), InternalError, "commit_shard: no coordinator");
  return coord_->client->commit_shard(coord_->generation, step, shard);
}

void WorkerSession::report_failure(const std::string& reason, bool fatal) {
  if (comm_) comm_->abort(reason);
  if (!has_coordinator()) return;
  try {
    coord_->client->report_failure(coord_->rank, reason, coord_->rank, coord_->generation, fatal);
  } catch (const std::exception&) {
    // Best effort: the coordinator may be the thing that failed.
  }
}

}  // namespace dtrain::cli
