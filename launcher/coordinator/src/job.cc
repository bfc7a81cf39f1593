// The coordinator's job state machine (see job.h and proto/coordinator.proto).
//
//   WAITING --(world_size joins)--> RUNNING --(every rank left)--> SUCCEEDED
//      |                               |
//      +--(failure reported)--> FAILED <--(failure reported / heartbeat lost)
//
// Ranks are fixed when the rendezvous completes: requested ranks first, then the
// other members fill the free ranks in join order. A Join that gives up before the
// rendezvous completes withdraws its member, so the job never waits for a ghost.
#include "job.h"

#include <fmt/format.h>

#include <algorithm>

namespace dtrain::coordinator {

namespace {

using grpc::Status;
using grpc::StatusCode;

constexpr std::chrono::milliseconds kWaitSlice{100};  // cancellation check period

std::string rank_list(const std::vector<int>& ranks) {
  constexpr size_t kShown = 16;
  std::string s;
  for (size_t i = 0; i < ranks.size() && i < kShown; ++i) {
    s += (i ? ", " : "") + std::to_string(ranks[i]);
  }
  if (ranks.size() > kShown) s += fmt::format(", ... ({} in all)", ranks.size());
  return s;
}

uint64_t age_ms(Clock::time_point since, Clock::time_point now) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now - since).count());
}

}  // namespace

Job::Job(JobConfig config) : config_(std::move(config)), start_(Clock::now()) {}

void Job::log(const std::string& line) const {
  if (config_.log) config_.log(line);
}

template <class Ready>
Job::WaitEnd Job::wait_until(std::unique_lock<std::mutex>& lock, const CallWait& wait,
                             Ready ready) {
  for (;;) {
    if (ready()) return WaitEnd::kReady;
    if (shutdown_) return WaitEnd::kShutdown;
    Clock::time_point now = Clock::now();
    if (now >= wait.deadline) return WaitEnd::kTimeout;
    if (wait.cancelled && wait.cancelled()) return WaitEnd::kCancelled;
    cv_.wait_until(lock, std::min(wait.deadline, now + kWaitSlice));
  }
}

Status Job::wait_end_status(WaitEnd end, const std::string& what) const {
  switch (end) {
    case WaitEnd::kShutdown:
      return Status(StatusCode::UNAVAILABLE, "the coordinator is shutting down");
    case WaitEnd::kCancelled:
      return Status(StatusCode::CANCELLED, what + ": the call was cancelled");
    case WaitEnd::kTimeout:
      return Status(StatusCode::DEADLINE_EXCEEDED, what);
    case WaitEnd::kReady:
      break;
  }
  return Status::OK;
}

Status Job::check_job_id(const std::string& job_id) const {
  if (job_id == config_.job_id) return Status::OK;
  return Status(StatusCode::FAILED_PRECONDITION,
                fmt::format("job '{}' is not served here: this coordinator runs job '{}'", job_id,
                            config_.job_id));
}

Status Job::check_rank(int rank) const {
  if (!ranked_) {
    return Status(StatusCode::FAILED_PRECONDITION,
                  fmt::format("the rendezvous of job '{}' has not completed ({} of {} joined)",
                              config_.job_id, members_.size(), config_.world_size));
  }
  if (rank < 0 || rank >= config_.world_size) {
    return Status(StatusCode::INVALID_ARGUMENT,
                  fmt::format("rank {} is out of range for job '{}' (world size {})", rank,
                              config_.job_id, config_.world_size));
  }
  return Status::OK;
}

Status Job::aborted() const {
  return Status(StatusCode::ABORTED, fmt::format("job '{}' failed: {}", config_.job_id, reason_));
}

Job::Member* Job::member_by_id(uint64_t id) {
  for (Member& m : members_) {
    if (m.id == id) return &m;
  }
  return nullptr;
}

// ---- Join ----

void Job::complete_rendezvous() {
  std::vector<bool> taken(static_cast<size_t>(config_.world_size), false);
  for (Member& m : members_) {
    if (m.requested_rank >= 0) {
      m.rank = m.requested_rank;
      taken[static_cast<size_t>(m.rank)] = true;
    }
  }
  int next = 0;
  for (Member& m : members_) {  // join order
    if (m.requested_rank >= 0) continue;
    while (taken[static_cast<size_t>(next)]) ++next;
    m.rank = next;
    taken[static_cast<size_t>(next)] = true;
  }
  std::sort(members_.begin(), members_.end(),
            [](const Member& a, const Member& b) { return a.rank < b.rank; });
  std::map<std::string, int> per_host;
  Clock::time_point now = Clock::now();
  for (Member& m : members_) {
    m.local_rank = per_host[m.host]++;
    m.state = v1::WORKER_STATE_ALIVE;
    m.last_heartbeat = now;
  }
  ranked_ = true;
  state_ = v1::JOB_STATE_RUNNING;
  log(fmt::format("job '{}': rendezvous complete, {} workers, generation {}", config_.job_id,
                  config_.world_size, generation_));
  cv_.notify_all();
}

Status Job::join(const v1::JoinRequest& req, const CallWait& wait, v1::JoinResponse* resp) {
  std::unique_lock<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (state_ == v1::JOB_STATE_FAILED) {
    return Status(StatusCode::FAILED_PRECONDITION,
                  fmt::format("job '{}' has failed: {}", config_.job_id, reason_));
  }
  if (state_ == v1::JOB_STATE_SUCCEEDED) {
    return Status(StatusCode::FAILED_PRECONDITION,
                  fmt::format("job '{}' has ended", config_.job_id));
  }
  if (state_ != v1::JOB_STATE_WAITING ||
      members_.size() >= static_cast<size_t>(config_.world_size)) {
    return Status(StatusCode::RESOURCE_EXHAUSTED, fmt::format("job '{}' is full (world size {})",
                                                              config_.job_id, config_.world_size));
  }
  int requested = -1;
  if (req.has_requested_rank()) {
    requested = req.requested_rank();
    if (requested < 0 || requested >= config_.world_size) {
      return Status(StatusCode::INVALID_ARGUMENT,
                    fmt::format("requested rank {} is out of range for job '{}' (world size {})",
                                requested, config_.job_id, config_.world_size));
    }
    for (const Member& m : members_) {
      if (m.requested_rank == requested) {
        return Status(StatusCode::ALREADY_EXISTS,
                      fmt::format("rank {} of job '{}' is already taken by {} (pid {})", requested,
                                  config_.job_id, m.host, m.pid));
      }
    }
  }
  Member joined;
  joined.id = next_member_id_++;
  joined.host = req.host();
  joined.address = req.address();
  joined.pid = req.pid();
  joined.requested_rank = requested;
  joined.joined = joined.last_heartbeat = Clock::now();
  const uint64_t id = joined.id;
  members_.push_back(std::move(joined));
  log(fmt::format("job '{}': {} (pid {}) joined{}, {} of {}", config_.job_id, req.host(), req.pid(),
                  requested >= 0 ? fmt::format(" asking for rank {}", requested) : "",
                  members_.size(), config_.world_size));
  if (members_.size() == static_cast<size_t>(config_.world_size)) complete_rendezvous();

  WaitEnd end = wait_until(lock, wait, [&] { return state_ != v1::JOB_STATE_WAITING; });
  if (end == WaitEnd::kReady) {
    if (state_ == v1::JOB_STATE_FAILED) return aborted();
    const Member* me = member_by_id(id);
    resp->set_job_id(config_.job_id);
    resp->set_rank(me->rank);
    resp->set_world_size(config_.world_size);
    resp->set_generation(generation_);
    resp->set_local_rank(me->local_rank);
    int local_size = 0;
    for (const Member& m : members_) {
      local_size += m.host == me->host ? 1 : 0;
      v1::Peer* p = resp->add_peers();
      p->set_rank(m.rank);
      p->set_host(m.host);
      p->set_address(m.address);
      p->set_pid(m.pid);
      p->set_local_rank(m.local_rank);
    }
    resp->set_local_world_size(local_size);
    return Status::OK;
  }
  // Gave up before the rendezvous completed: withdraw, so that a retry can join.
  size_t before = members_.size();
  std::erase_if(members_, [&](const Member& m) { return m.id == id; });
  log(fmt::format("job '{}': {} (pid {}) withdrew its join, {} of {}", config_.job_id, req.host(),
                  req.pid(), members_.size(), config_.world_size));
  cv_.notify_all();
  return wait_end_status(
      end, fmt::format("the rendezvous of job '{}' did not complete within {}: {} of {} workers "
                       "joined",
                       config_.job_id, format_duration(wait.limit), before, config_.world_size));
}

// ---- Heartbeat ----

Status Job::heartbeat(const v1::HeartbeatRequest& req, v1::HeartbeatResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (Status s = check_rank(req.rank()); !s.ok()) return s;
  Member& m = members_[static_cast<size_t>(req.rank())];
  m.last_heartbeat = Clock::now();
  ++m.heartbeats;
  resp->set_generation(generation_);
  resp->set_state(state_);
  resp->set_reason(reason_);
  return Status::OK;
}

void Job::check_heartbeats() {
  if (config_.heartbeat_timeout.count() <= 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ != v1::JOB_STATE_RUNNING) return;
  Clock::time_point now = Clock::now();
  for (Member& m : members_) {
    if (m.state != v1::WORKER_STATE_ALIVE || m.heartbeats == 0) continue;
    auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_heartbeat);
    if (silent <= config_.heartbeat_timeout) continue;
    m.state = v1::WORKER_STATE_LOST;
    if (state_ == v1::JOB_STATE_RUNNING) {
      fail(m.rank, fmt::format("rank {} ({}, pid {}) lost: no heartbeat for {} (timeout {})",
                               m.rank, m.host, m.pid, format_duration(silent),
                               format_duration(config_.heartbeat_timeout)));
    }
  }
}

// ---- Barrier ----

Status Job::barrier(const v1::BarrierRequest& req, const CallWait& wait,
                    v1::BarrierResponse* resp) {
  std::unique_lock<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (req.name().empty()) {
    return Status(StatusCode::INVALID_ARGUMENT, "a barrier needs a name");
  }
  if (Status s = check_rank(req.rank()); !s.ok()) return s;
  if (state_ == v1::JOB_STATE_FAILED) return aborted();
  const uint64_t gen = req.generation() != 0 ? req.generation() : generation_;
  if (gen != generation_) {
    return Status(StatusCode::ABORTED,
                  fmt::format("generation {} of job '{}' is over (now {}): join again", gen,
                              config_.job_id, generation_));
  }
  BarrierState& b = barriers_[req.name()];  // std::map: the reference stays valid
  if (!b.arrived.insert(req.rank()).second) {
    return Status(
        StatusCode::ALREADY_EXISTS,
        fmt::format("rank {} is already waiting at barrier '{}'", req.rank(), req.name()));
  }
  resp->set_generation(generation_);
  if (b.arrived.size() == static_cast<size_t>(config_.world_size)) {
    ++b.round;
    b.arrived.clear();
    cv_.notify_all();
    return Status::OK;
  }
  const uint64_t round = b.round;
  WaitEnd end = wait_until(lock, wait, [&] {
    return b.round != round || state_ == v1::JOB_STATE_FAILED || generation_ != gen;
  });
  if (end == WaitEnd::kReady && b.round != round) return Status::OK;
  std::vector<int> missing;
  for (int r = 0; r < config_.world_size; ++r) {
    if (b.arrived.count(r) == 0) missing.push_back(r);
  }
  const size_t arrived = b.arrived.size();
  b.arrived.erase(req.rank());
  if (end == WaitEnd::kReady) {
    if (state_ == v1::JOB_STATE_FAILED) return aborted();
    return Status(StatusCode::ABORTED,
                  fmt::format("barrier '{}': generation {} of job '{}' ended (now {})", req.name(),
                              gen, config_.job_id, generation_));
  }
  return wait_end_status(
      end, fmt::format("barrier '{}' of job '{}' timed out after {}: {} of {} ranks arrived, "
                       "missing ranks {}",
                       req.name(), config_.job_id, format_duration(wait.limit), arrived,
                       config_.world_size, rank_list(missing)));
}

// ---- Key-value store ----

Status Job::set(const v1::SetRequest& req) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (req.key().empty()) return Status(StatusCode::INVALID_ARGUMENT, "Set: empty key");
  kv_[req.key()] = req.value();
  cv_.notify_all();
  return Status::OK;
}

Status Job::get(const v1::GetRequest& req, const CallWait& wait, v1::GetResponse* resp) {
  std::unique_lock<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (req.key().empty()) return Status(StatusCode::INVALID_ARGUMENT, "Get: empty key");
  auto found = [&] { return kv_.count(req.key()) > 0; };
  if (!req.wait() && !found()) {
    return Status(StatusCode::NOT_FOUND,
                  fmt::format("key '{}' is not set in job '{}'", req.key(), config_.job_id));
  }
  WaitEnd end = wait_until(lock, wait, [&] { return found() || state_ == v1::JOB_STATE_FAILED; });
  if (end == WaitEnd::kReady && found()) {
    resp->set_value(kv_[req.key()]);
    return Status::OK;
  }
  if (end == WaitEnd::kReady) return aborted();
  return wait_end_status(end, fmt::format("key '{}' was not set in job '{}' within {}", req.key(),
                                          config_.job_id, format_duration(wait.limit)));
}

Status Job::wait(const v1::WaitRequest& req, const CallWait& wait) {
  std::unique_lock<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  for (const std::string& k : req.keys()) {
    if (k.empty()) return Status(StatusCode::INVALID_ARGUMENT, "Wait: empty key");
  }
  auto all_set = [&] {
    return std::all_of(req.keys().begin(), req.keys().end(),
                       [&](const std::string& k) { return kv_.count(k) > 0; });
  };
  WaitEnd end = wait_until(lock, wait, [&] { return all_set() || state_ == v1::JOB_STATE_FAILED; });
  if (end == WaitEnd::kReady && all_set()) return Status::OK;
  if (end == WaitEnd::kReady) return aborted();
  std::string missing;
  for (const std::string& k : req.keys()) {
    if (kv_.count(k) == 0) missing += (missing.empty() ? "'" : ", '") + k + "'";
  }
  return wait_end_status(end, fmt::format("keys not set in job '{}' within {}: {}", config_.job_id,
                                          format_duration(wait.limit), missing));
}

// ---- Status, failures, leaving ----

Status Job::status(const v1::GetJobStatusRequest& req, v1::JobStatus* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!req.job_id().empty()) {
    if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  }
  Clock::time_point now = Clock::now();
  resp->set_job_id(config_.job_id);
  resp->set_state(state_);
  resp->set_world_size(config_.world_size);
  resp->set_generation(generation_);
  resp->set_reason(reason_);
  resp->set_failed_rank(failed_rank_);
  resp->set_uptime_ms(age_ms(start_, now));
  for (const Member& m : members_) {
    v1::WorkerStatus* w = resp->add_workers();
    w->set_rank(m.rank >= 0 ? m.rank : m.requested_rank);
    w->set_host(m.host);
    w->set_address(m.address);
    w->set_pid(m.pid);
    w->set_state(m.state);
    w->set_last_heartbeat_age_ms(age_ms(m.last_heartbeat, now));
    w->set_heartbeats(m.heartbeats);
  }
  return Status::OK;
}

void Job::fail(int rank, const std::string& reason) {
  state_ = v1::JOB_STATE_FAILED;
  reason_ = reason;
  failed_rank_ = rank;
  log(fmt::format("job '{}' FAILED: {}", config_.job_id, reason));
  cv_.notify_all();
}

Status Job::report_failure(const v1::ReportFailureRequest& req, v1::ReportFailureResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  const int rank = req.rank();
  if (rank < -1 || rank >= config_.world_size) {
    return Status(StatusCode::INVALID_ARGUMENT,
                  fmt::format("ReportFailure: rank {} is out of range for job '{}' (world size {})",
                              rank, config_.job_id, config_.world_size));
  }
  if (state_ == v1::JOB_STATE_WAITING || state_ == v1::JOB_STATE_RUNNING) {
    std::string who = rank >= 0 ? fmt::format("rank {}", rank) : std::string("a worker");
    std::string by;
    if (req.has_reporter_rank() && req.reporter_rank() != rank) {
      by = fmt::format(" (reported by rank {})", req.reporter_rank());
    }
    std::string why = req.reason().empty() ? std::string("no reason given") : req.reason();
    if (state_ == v1::JOB_STATE_RUNNING && rank >= 0) {
      Member& m = members_[static_cast<size_t>(rank)];
      if (m.state == v1::WORKER_STATE_ALIVE) m.state = v1::WORKER_STATE_FAILED;
    }
    fail(rank, fmt::format("{} failed{}: {}", who, by, why));
  } else {
    log(fmt::format("job '{}': failure of rank {} reported after the job ended ({}): {}",
                    config_.job_id, rank, v1::JobState_Name(state_), req.reason()));
  }
  resp->set_state(state_);
  resp->set_generation(generation_);
  return Status::OK;
}

Status Job::leave(const v1::LeaveRequest& req, v1::LeaveResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (Status s = check_rank(req.rank()); !s.ok()) return s;
  Member& m = members_[static_cast<size_t>(req.rank())];
  if (m.state == v1::WORKER_STATE_ALIVE) m.state = v1::WORKER_STATE_LEFT;
  bool all_left = std::all_of(members_.begin(), members_.end(),
                              [](const Member& x) { return x.state == v1::WORKER_STATE_LEFT; });
  if (all_left && state_ == v1::JOB_STATE_RUNNING) {
    state_ = v1::JOB_STATE_SUCCEEDED;
    log(fmt::format("job '{}' SUCCEEDED: every rank left", config_.job_id));
  }
  cv_.notify_all();
  resp->set_state(state_);
  return Status::OK;
}

void Job::shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  shutdown_ = true;
  cv_.notify_all();
}

}  // namespace dtrain::coordinator
