// CoordinatorClient: typed calls over the generated gRPC stub (see client.h).
//
// Deadlines: non-blocking calls get call_timeout; a blocking call sends its timeout
// to the coordinator (timeout_ms) and sets its own deadline that much plus
// call_timeout later, so the coordinator's descriptive DEADLINE_EXCEEDED ("missing
// ranks 2") arrives before the transport's bare one.
#include "dtrain/coordinator/client.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>

#include "convert.h"
#include "dtrain/common/error.h"
#include "dtrain/proto/coordinator.grpc.pb.h"
#include "tls.h"

namespace dtrain::coordinator {

namespace {

using std::chrono::milliseconds;

const char* code_name(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

// A refusal is the caller's to fix (token, job id, rank, ...); a failure may pass.
bool is_refusal(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::UNAUTHENTICATED:
      return true;
    default:
      return false;
  }
}

std::string this_host() {
  char name[HOST_NAME_MAX + 1] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "unknown-host";
  return name;
}

uint64_t to_ms(milliseconds d) { return d.count() > 0 ? static_cast<uint64_t>(d.count()) : 1; }

}  // namespace

// Thread-safety: read-only after connect(); the stub is safe for concurrent calls.
struct CoordinatorClient::Impl {
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Coordinator::Stub> stub;

  // Deadline `timeout` from now, plus the token.
  void prepare(grpc::ClientContext& ctx, milliseconds timeout) const {
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    if (!options.token.empty()) ctx.AddMetadata("x-dtrain-token", options.token);
  }

  [[noreturn]] void fail(const grpc::Status& s, const std::string& call) const {
    const grpc::StatusCode c = s.error_code();
    std::string msg =
        fmt::format("coordinator {}: {} {}: {} [{}]", options.address, call,
                    is_refusal(c) ? "refused" : "failed", s.error_message(), code_name(c));
    if (c == grpc::StatusCode::DEADLINE_EXCEEDED) throw TimeoutError(msg, __FILE__, __LINE__);
    if (c == grpc::StatusCode::UNIMPLEMENTED) throw UnsupportedError(msg, __FILE__, __LINE__);
    if (is_refusal(c)) throw InvalidArgument(msg, __FILE__, __LINE__);
    throw CommError(msg, __FILE__, __LINE__);
  }

  void check(const grpc::Status& s, const std::string& call) const {
    if (!s.ok()) fail(s, call);
  }
};

CoordinatorClient::CoordinatorClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CoordinatorClient::~CoordinatorClient() = default;
CoordinatorClient::CoordinatorClient(CoordinatorClient&&) noexcept = default;
CoordinatorClient& CoordinatorClient::operator=(CoordinatorClient&&) noexcept = default;

void ClientOptions::tls_from_env() {
  if (const char* v = std::getenv("DTRAIN_TLS_CA"); v != nullptr && *v != '\0') tls_ca_file = v;
  if (const char* v = std::getenv("DTRAIN_TLS_SERVER_NAME"); v != nullptr && *v != '\0') {
    tls_server_name = v;
  }
}

CoordinatorClient CoordinatorClient::connect(ClientOptions options) {
  DTRAIN_CHECK(!options.address.empty(), InvalidArgument,
               "coordinator client: no coordinator address given (expected host:port)");
  DTRAIN_CHECK(!options.job_id.empty(), InvalidArgument, "coordinator client: the job id is empty");
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  const ClientOptions& o = impl->options;
  // Reconnect quickly (at most 1 s apart) after the coordinator goes away, so that
  // workers find a restarted coordinator at once instead of after gRPC's default
  // backoff of up to two minutes.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  impl->channel = grpc::CreateCustomChannel(o.address, channel_credentials(o.tls_ca_file), args);
  bool up = impl->channel->WaitForConnected(std::chrono::system_clock::now() + o.connect_timeout);
  DTRAIN_CHECK(up, CommError,
               "coordinator {}: not reachable within {} (is `dtrain coordinator` running there, "
               "and is the address right?{})",
               o.address, format_duration(o.connect_timeout),
               o.tls_ca_file.empty() ? ""
                                     : fmt::format(" With TLS: does its certificate chain to "
                                                   "'{}' and name the host?",
                                                   o.tls_ca_file));
  impl->stub = v1::Coordinator::NewStub(impl->channel);
  return CoordinatorClient(std::move(impl));
}

const std::string& CoordinatorClient::address() const { return impl_->options.address; }
const std::string& CoordinatorClient::job_id() const { return impl_->options.job_id; }

JoinResult CoordinatorClient::join(const JoinOptions& o) {
  v1::JoinRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_host(o.host.empty() ? this_host() : o.host);
  req.set_address(o.address);
  req.set_pid(o.pid != 0 ? o.pid : static_cast<int64_t>(getpid()));
  if (o.rank) req.set_requested_rank(*o.rank);
  if (o.previous_rank) req.set_previous_rank(*o.previous_rank);
  req.set_previous_generation(o.previous_generation);
  req.set_timeout_ms(to_ms(o.timeout));
  grpc::ClientContext ctx;
  impl_->prepare(ctx, o.timeout + impl_->options.call_timeout);
  v1::JoinResponse resp;
  impl_->check(impl_->stub->Join(&ctx, req, &resp), "Join");
  return from_proto(resp);
}

HeartbeatResult CoordinatorClient::heartbeat(int rank, uint64_t generation,
                                             const std::optional<WorkerProgress>& progress) {
  v1::HeartbeatRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_rank(rank);
  req.set_generation(generation);
  if (progress) {
    v1::WorkerProgress* p = req.mutable_progress();
    p->set_step(progress->step);
    p->set_samples_per_s(progress->samples_per_s);
    p->set_loss(progress->loss);
  }
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::HeartbeatResponse resp;
  impl_->check(impl_->stub->Heartbeat(&ctx, req, &resp), "Heartbeat");
  return from_proto(resp);
}

void CoordinatorClient::barrier(const std::string& name, int rank, uint64_t generation,
                                milliseconds timeout) {
  v1::BarrierRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_name(name);
  req.set_rank(rank);
  req.set_generation(generation);
  req.set_timeout_ms(to_ms(timeout));
  grpc::ClientContext ctx;
  impl_->prepare(ctx, timeout + impl_->options.call_timeout);
  v1::BarrierResponse resp;
  impl_->check(impl_->stub->Barrier(&ctx, req, &resp), fmt::format("Barrier '{}'", name));
}

void CoordinatorClient::set(const std::string& key, const std::string& value) {
  v1::SetRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_key(key);
  req.set_value(value);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::SetResponse resp;
  impl_->check(impl_->stub->Set(&ctx, req, &resp), fmt::format("Set '{}'", key));
}

std::string CoordinatorClient::get(const std::string& key, milliseconds timeout) {
  v1::GetRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_key(key);
  req.set_wait(true);
  req.set_timeout_ms(to_ms(timeout));
  grpc::ClientContext ctx;
  impl_->prepare(ctx, timeout + impl_->options.call_timeout);
  v1::GetResponse resp;
  impl_->check(impl_->stub->Get(&ctx, req, &resp), fmt::format("Get '{}'", key));
  return std::move(*resp.mutable_value());
}

std::optional<std::string> CoordinatorClient::try_get(const std::string& key) {
  v1::GetRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_key(key);
  req.set_wait(false);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::GetResponse resp;
  grpc::Status s = impl_->stub->Get(&ctx, req, &resp);
  if (s.error_code() == grpc::StatusCode::NOT_FOUND) return std::nullopt;
  impl_->check(s, fmt::format("Get '{}'", key));
  return std::move(*resp.mutable_value());
}

void CoordinatorClient::wait(const std::vector<std::string>& keys, milliseconds timeout) {
  v1::WaitRequest req;
  req.set_job_id(impl_->options.job_id);
  for (const std::string& k : keys) req.add_keys(k);
  req.set_timeout_ms(to_ms(timeout));
  grpc::ClientContext ctx;
  impl_->prepare(ctx, timeout + impl_->options.call_timeout);
  v1::WaitResponse resp;
  impl_->check(impl_->stub->Wait(&ctx, req, &resp), fmt::format("Wait ({} keys)", keys.size()));
}

JobStatus CoordinatorClient::status() {
  v1::GetJobStatusRequest req;
  req.set_job_id(impl_->options.job_id);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::JobStatus resp;
  impl_->check(impl_->stub->GetJobStatus(&ctx, req, &resp), "GetJobStatus");
  return from_proto(resp);
}

JobState CoordinatorClient::report_failure(int rank, const std::string& reason,
                                           std::optional<int> reporter_rank, uint64_t generation,
                                           bool fatal) {
  v1::ReportFailureRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_rank(rank);
  req.set_reason(reason);
  if (reporter_rank) req.set_reporter_rank(*reporter_rank);
  req.set_generation(generation);
  req.set_fatal(fatal);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::ReportFailureResponse resp;
  impl_->check(impl_->stub->ReportFailure(&ctx, req, &resp), "ReportFailure");
  return from_proto(resp.state());
}

JobState CoordinatorClient::leave(int rank, uint64_t generation) {
  v1::LeaveRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_rank(rank);
  req.set_generation(generation);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::LeaveResponse resp;
  impl_->check(impl_->stub->Leave(&ctx, req, &resp), "Leave");
  return from_proto(resp.state());
}

std::string CoordinatorClient::begin_checkpoint(const CheckpointBegin& b) {
  v1::BeginCheckpointRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_rank(b.rank);
  req.set_generation(b.generation);
  req.set_step(b.step);
  req.set_epoch(b.epoch);
  req.set_root(b.root);
  req.set_config_json(b.config_json);
  req.set_keep_last(b.keep_last);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::BeginCheckpointResponse resp;
  impl_->check(impl_->stub->BeginCheckpoint(&ctx, req, &resp),
               fmt::format("BeginCheckpoint (step {})", b.step));
  return resp.name();
}

ShardCommit CoordinatorClient::commit_shard(uint64_t generation, int64_t step,
                                            const ShardInfo& shard) {
  v1::CommitShardRequest req;
  req.set_job_id(impl_->options.job_id);
  req.set_generation(generation);
  req.set_step(step);
  v1::ShardDescriptor* d = req.mutable_shard();
  d->set_rank(shard.rank);
  d->set_file(shard.file);
  d->set_bytes(shard.bytes);
  d->set_checksum(shard.checksum);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::CommitShardResponse resp;
  impl_->check(impl_->stub->CommitShard(&ctx, req, &resp),
               fmt::format("CommitShard (step {}, rank {})", step, shard.rank));
  return ShardCommit{resp.committed(), resp.shards_in(), from_proto(resp.last())};
}

CheckpointRef CoordinatorClient::last_checkpoint() {
  v1::GetLastCheckpointRequest req;
  req.set_job_id(impl_->options.job_id);
  grpc::ClientContext ctx;
  impl_->prepare(ctx, impl_->options.call_timeout);
  v1::CheckpointRef resp;
  impl_->check(impl_->stub->GetLastCheckpoint(&ctx, req, &resp), "GetLastCheckpoint");
  return from_proto(resp);
}

}  // namespace dtrain::coordinator
