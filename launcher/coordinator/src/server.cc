// CoordinatorServer: gRPC plumbing around Job (job.h).
//
// A synchronous gRPC service: each call runs on a server thread and may block in
// Job (Join, Barrier, Get with wait, Wait); gRPC grows its thread pool as needed.
// The job token is checked at the top of every handler, before the job is touched,
// so a refused call changes nothing. The standard grpc.health.v1.Health service is
// served beside it without a token (it tells nothing but whether the job goes on),
// for Kubernetes `grpc:` probes. SO_REUSEPORT is switched off so that a second
// coordinator on the same port fails to bind instead of silently sharing it.
#include "dtrain/coordinator/server.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "convert.h"
#include "dtrain/common/error.h"
#include "dtrain/proto/coordinator.grpc.pb.h"
#include "dtrain/proto/health.grpc.pb.h"
#include "job.h"
#include "tls.h"

namespace dtrain::coordinator {

namespace {

using grpc::ServerContext;
using grpc::Status;
using grpc::StatusCode;

constexpr const char* kTokenKey = "x-dtrain-token";

// Compares in time independent of where the strings differ.
bool same_secret(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  }
  return diff == 0;
}

// The call's limit: timeout_ms when given, never past the client's deadline.
CallWait call_wait(ServerContext* ctx, uint64_t timeout_ms) {
  using std::chrono::milliseconds;
  constexpr milliseconds kForever{std::chrono::hours(24 * 7)};
  auto client_left =
      std::chrono::duration_cast<milliseconds>(ctx->deadline() - std::chrono::system_clock::now());
  milliseconds limit = std::clamp(client_left, milliseconds(0), kForever);
  if (timeout_ms > 0) {
    limit = std::min(limit, milliseconds(static_cast<int64_t>(std::min<uint64_t>(
                                timeout_ms, static_cast<uint64_t>(kForever.count())))));
  }
  return CallWait{Clock::now() + limit, limit, [ctx] { return ctx->IsCancelled(); }};
}

// Thread-safety: handlers run concurrently on gRPC threads; Job does the locking.
class Service final : public v1::Coordinator::Service {
 public:
  Service(Job& job, std::string token) : job_(job), token_(std::move(token)) {}

  Status Join(ServerContext* ctx, const v1::JoinRequest* req, v1::JoinResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.join(*req, call_wait(ctx, req->timeout_ms()), resp);
  }
  Status Heartbeat(ServerContext* ctx, const v1::HeartbeatRequest* req,
                   v1::HeartbeatResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.heartbeat(*req, resp);
  }
  Status Barrier(ServerContext* ctx, const v1::BarrierRequest* req,
                 v1::BarrierResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.barrier(*req, call_wait(ctx, req->timeout_ms()), resp);
  }
  Status Set(ServerContext* ctx, const v1::SetRequest* req, v1::SetResponse*) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.set(*req);
  }
  Status Get(ServerContext* ctx, const v1::GetRequest* req, v1::GetResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.get(*req, call_wait(ctx, req->timeout_ms()), resp);
  }
  Status Wait(ServerContext* ctx, const v1::WaitRequest* req, v1::WaitResponse*) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.wait(*req, call_wait(ctx, req->timeout_ms()));
  }
  Status GetJobStatus(ServerContext* ctx, const v1::GetJobStatusRequest* req,
                      v1::JobStatus* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.status(*req, resp);
  }
  Status ReportFailure(ServerContext* ctx, const v1::ReportFailureRequest* req,
                       v1::ReportFailureResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.report_failure(*req, resp);
  }
  Status Leave(ServerContext* ctx, const v1::LeaveRequest* req, v1::LeaveResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.leave(*req, resp);
  }
  Status BeginCheckpoint(ServerContext* ctx, const v1::BeginCheckpointRequest* req,
                         v1::BeginCheckpointResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.begin_checkpoint(*req, resp);
  }
  Status CommitShard(ServerContext* ctx, const v1::CommitShardRequest* req,
                     v1::CommitShardResponse* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.commit_shard(*req, resp);
  }
  Status GetLastCheckpoint(ServerContext* ctx, const v1::GetLastCheckpointRequest* req,
                           v1::CheckpointRef* resp) override {
    if (Status s = authorize(*ctx); !s.ok()) return s;
    return job_.last_checkpoint(*req, resp);
  }

 private:
  Status authorize(const ServerContext& ctx) const {
    if (token_.empty()) return Status::OK;
    const auto& md = ctx.client_metadata();
    auto it = md.find(kTokenKey);
    if (it == md.end()) {
      return Status(StatusCode::UNAUTHENTICATED,
                    fmt::format("this coordinator requires a job token (metadata '{}'; dtrain "
                                "takes it from --token or DTRAIN_JOB_TOKEN)",
                                kTokenKey));
    }
    if (!same_secret(std::string_view(it->second.data(), it->second.size()), token_)) {
      return Status(StatusCode::UNAUTHENTICATED, "wrong job token");
    }
    return Status::OK;
  }

  Job& job_;
  const std::string token_;
};

std::string host_port(const std::string& host, int port) {
  bool ipv6 = host.find(':') != std::string::npos && host.front() != '[';
  return ipv6 ? fmt::format("[{}]:{}", host, port) : fmt::format("{}:{}", host, port);
}

// grpc.health.v1.Health: "" (the server) is SERVING while it runs;
// "dtrain.v1.Coordinator" is SERVING until the job has failed or ended, then
// NOT_SERVING; any other name is NOT_FOUND, as the protocol asks.
class HealthService final : public grpc::health::v1::Health::Service {
 public:
  explicit HealthService(Job& job) : job_(job) {}

  Status Check(ServerContext*, const grpc::health::v1::HealthCheckRequest* req,
               grpc::health::v1::HealthCheckResponse* resp) override {
    using Response = grpc::health::v1::HealthCheckResponse;
    if (req->service().empty()) {
      resp->set_status(Response::SERVING);
      return Status::OK;
    }
    if (req->service() != v1::Coordinator::service_full_name()) {
      return Status(StatusCode::NOT_FOUND, fmt::format("unknown service '{}'", req->service()));
    }
    v1::JobStatus s;
    job_.status(v1::GetJobStatusRequest(), &s);
    const bool over = s.state() == v1::JOB_STATE_FAILED || s.state() == v1::JOB_STATE_SUCCEEDED;
    resp->set_status(over ? Response::NOT_SERVING : Response::SERVING);
    return Status::OK;
  }

 private:
  Job& job_;
};

}  // namespace

// Thread-safety: the stop flags are guarded as marked; the rest is set in the
// constructor and read-only afterwards.
struct CoordinatorServer::Impl {
  ServerOptions options;
  Job job;
  Service service;
  HealthService health;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;  // GUARDED_BY(mu)
  std::mutex shutdown_mu;
  bool stopped = false;  // GUARDED_BY(shutdown_mu)
  std::thread monitor;   // heartbeat monitor, when heartbeat_timeout > 0

  explicit Impl(ServerOptions o)
      : options(std::move(o)),
        job(JobConfig{options.job_id, options.world_size, options.heartbeat_timeout,
                      options.heartbeat_interval, options.max_restarts, options.state_dir,
                      options.min_workers, options.rejoin_timeout, options.log}),
        service(job, options.token),
        health(job) {}

  void monitor_loop() {
    using std::chrono::milliseconds;
    milliseconds period =
        std::clamp(options.heartbeat_timeout / 4, milliseconds(10), milliseconds(1000));
    std::unique_lock<std::mutex> lock(mu);
    while (!cv.wait_for(lock, period, [&] { return stopping; })) {
      lock.unlock();
      job.check_heartbeats();
      lock.lock();
    }
  }
};

CoordinatorServer::CoordinatorServer(ServerOptions options) {
  DTRAIN_CHECK(options.world_size >= 1, InvalidArgument,
               "coordinator: world size must be at least 1, got {}", options.world_size);
  DTRAIN_CHECK(options.port >= 0 && options.port <= 65535, InvalidArgument,
               "coordinator: port must be in 0..65535, got {}", options.port);
  DTRAIN_CHECK(!options.job_id.empty(), InvalidArgument, "coordinator: the job id is empty");
  DTRAIN_CHECK(!options.bind_address.empty(), InvalidArgument,
               "coordinator: the bind address is empty");
  DTRAIN_CHECK(options.heartbeat_timeout.count() >= 0, InvalidArgument,
               "coordinator: the heartbeat timeout must not be negative");
  DTRAIN_CHECK(options.heartbeat_interval.count() > 0, InvalidArgument,
               "coordinator: the heartbeat interval must be positive, got {} ms",
               options.heartbeat_interval.count());
  DTRAIN_CHECK(options.min_workers >= 0 && options.min_workers <= options.world_size,
               InvalidArgument,
               "coordinator: --min-workers must be in 0..{} (the world size), got {}",
               options.world_size, options.min_workers);
  DTRAIN_CHECK(options.max_restarts >= 0, InvalidArgument,
               "coordinator: --max-restarts must be >= 0, got {}", options.max_restarts);
  DTRAIN_CHECK(is_loopback(options.bind_address) || !options.token.empty(), InvalidArgument,
               "coordinator: listening on {} (not loopback) requires a job token (--token or "
               "DTRAIN_JOB_TOKEN), so that only the job's workers can call it",
               options.bind_address);
  std::shared_ptr<grpc::ServerCredentials> creds =
      server_credentials(options.tls_cert_file, options.tls_key_file);
  impl_ = std::make_unique<Impl>(std::move(options));
  const ServerOptions& o = impl_->options;
  std::string listen = host_port(o.bind_address, o.port);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(listen, creds, &impl_->port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(&impl_->service);
  builder.RegisterService(&impl_->health);
  impl_->server = builder.BuildAndStart();
  if (!impl_->server || impl_->port == 0) {
    if (impl_->server) impl_->server->Shutdown();
    DTRAIN_THROW(IoError,
                 "coordinator: cannot listen on {} (port in use, or not an address of this "
                 "machine)",
                 listen);
  }
  if (o.heartbeat_timeout.count() > 0) {
    impl_->monitor = std::thread([impl = impl_.get()] { impl->monitor_loop(); });
  }
}

CoordinatorServer::~CoordinatorServer() {
  if (impl_) shutdown();
}

int CoordinatorServer::port() const { return impl_->port; }

std::string CoordinatorServer::address() const {
  return host_port(impl_->options.bind_address, impl_->port);
}

JobStatus CoordinatorServer::status() const {
  v1::JobStatus s;
  impl_->job.status(v1::GetJobStatusRequest(), &s);
  return from_proto(s);
}

void CoordinatorServer::shutdown() {
  std::lock_guard<std::mutex> once(impl_->shutdown_mu);  // a second caller waits for the first
  if (impl_->stopped) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  impl_->job.shutdown();
  // Blocked handlers return at once (the job is shut down); the deadline only bounds
  // a handler that is still being scheduled.
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server->Wait();
  if (impl_->monitor.joinable()) impl_->monitor.join();
  impl_->stopped = true;
}

}  // namespace dtrain::coordinator
