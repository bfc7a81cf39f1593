// The coordinator's job state machine (see job.h and proto/coordinator.proto).
//
//   WAITING --(world_size joins)--> RUNNING --(every rank left)--> SUCCEEDED
//      |                               |
//      +--(failure reported)--> FAILED <--(failure reported / heartbeat lost)
//
// With restarts (max_restarts > 0) a lost worker -- heartbeats stopped, a reported
// failure, or a new process joining under the rank of a running member -- moves
// RUNNING (or WAITING/RECOVERING) to RECOVERING with the next generation while
// restarts are left, and to FAILED ("restarts exhausted") after:
//
//   RUNNING --(worker lost, restarts left)--> RECOVERING --(world_size joins)--> RUNNING
//
// RECOVERING drops the members, barriers and pending checkpoints of the old
// generation; blocked calls end ABORTED; Heartbeats of the old generation are
// answered with the new one (the worker re-joins). A fatal report fails the job.
//
// Ranks are fixed when the rendezvous completes: requested ranks first, then the
// other members fill the free ranks in join order. A Join that gives up before the
// rendezvous completes withdraws its member, so the job never waits for a ghost.
#include "job.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/error.h"

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

Job::Job(JobConfig config) : config_(std::move(config)), start_(Clock::now()) {
  if (!config_.state_dir.empty()) load_state();
}

// ---- State folder ----

void Job::load_state() {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(config_.state_dir, ec);
  DTRAIN_CHECK(!ec, IoError, "coordinator: cannot create the state folder {}: {}",
               config_.state_dir, ec.message());
  const std::string path = (fs::path(config_.state_dir) / "job.json").string();
  std::lock_guard<std::mutex> lock(mu_);
  if (fs::exists(path)) {
    nlohmann::json j;
    try {
      std::ifstream in(path);
      j = nlohmann::json::parse(in);
      DTRAIN_CHECK(j.value("job_id", "") == config_.job_id, InvalidArgument,
                   "coordinator: state file {} belongs to job '{}', not '{}'", path,
                   j.value("job_id", ""), config_.job_id);
      DTRAIN_CHECK(j.value("world_size", 0) == config_.world_size, InvalidArgument,
                   "coordinator: state file {} is for a world size of {}, not {}", path,
                   j.value("world_size", 0), config_.world_size);
      generation_ = j.at("generation").get<uint64_t>() + 1;
      restarts_ = j.value("restarts", 0);
      std::string saved = j.value("state", "");
      const nlohmann::json& c = j.value("last_checkpoint", nlohmann::json::object());
      last_checkpoint_.set_root(c.value("root", ""));
      last_checkpoint_.set_name(c.value("name", ""));
      last_checkpoint_.set_step(c.value("step", int64_t{0}));
      last_checkpoint_.set_generation(c.value("generation", uint64_t{0}));
      if (saved == "JOB_STATE_FAILED" || saved == "JOB_STATE_SUCCEEDED") {
        v1::JobState_Parse(saved, &state_);
        reason_ = j.value("reason", "");
      } else {
        state_ = v1::JOB_STATE_RECOVERING;
        recovering_since_ = Clock::now();
      }
    } catch (const nlohmann::json::exception& e) {
      DTRAIN_THROW(DataFormatError, "coordinator: state file {} is malformed: {}", path, e.what());
    }
    log(
        fmt::format("job '{}': continued from {}: generation {}, {} restart(s), state {}, last "
                    "checkpoint {}",
                    config_.job_id, path, generation_, restarts_, v1::JobState_Name(state_),
                    last_checkpoint_.name().empty() ? "none" : last_checkpoint_.name()));
  }
  persist();
}

void Job::persist() {
  if (config_.state_dir.empty()) return;
  nlohmann::json j = {{"job_id", config_.job_id},
                      {"world_size", config_.world_size},
                      {"generation", generation_},
                      {"restarts", restarts_},
                      {"max_restarts", config_.max_restarts},
                      {"state", v1::JobState_Name(state_)},
                      {"reason", reason_},
                      {"last_checkpoint",
                       {{"root", last_checkpoint_.root()},
                        {"name", last_checkpoint_.name()},
                        {"step", last_checkpoint_.step()},
                        {"generation", last_checkpoint_.generation()}}}};
  const std::string path = (std::filesystem::path(config_.state_dir) / "job.json").string();
  try {
    ckpt::write_file_atomic(path, j.dump(2) + "\n");
  } catch (const Error& e) {
    // The job goes on; a coordinator restarted later would miss this change.
    log(fmt::format("job '{}': cannot write {}: {}", config_.job_id, path, e.message()));
  }
}

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
                              config_.job_id, members_.size(), world_));
  }
  if (rank < 0 || rank >= world_) {
    return Status(StatusCode::INVALID_ARGUMENT,
                  fmt::format("rank {} is out of range for job '{}' (world size {})", rank,
                              config_.job_id, world_));
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
  world_ = static_cast<int>(members_.size());
  if (world_ == config_.world_size) {
    std::vector<bool> taken(static_cast<size_t>(world_), false);
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
  } else {
    // Elastic, fewer workers: ranks 0..n-1 in the order of the ranks they asked for
    // (their previous ones), then join order.
    std::stable_sort(members_.begin(), members_.end(), [](const Member& a, const Member& b) {
      return static_cast<unsigned>(a.requested_rank) < static_cast<unsigned>(b.requested_rank);
    });
    for (size_t i = 0; i < members_.size(); ++i) members_[i].rank = static_cast<int>(i);
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
  log(fmt::format(
      "job '{}': rendezvous complete, {} workers{}, generation {}", config_.job_id, world_,
      world_ < config_.world_size ? fmt::format(" (elastic: {} of {})", world_, config_.world_size)
                                  : "",
      generation_));
  persist();
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
  if (state_ == v1::JOB_STATE_RUNNING && config_.max_restarts > 0 && req.has_requested_rank()) {
    // A new process under the rank of a running member: the old one is gone (its
    // launcher restarted it), so that rank is lost.
    for (const Member& m : members_) {
      if (m.rank != req.requested_rank() || m.state != v1::WORKER_STATE_ALIVE) continue;
      if (m.pid == req.pid() && m.host == req.host()) break;
      failed_pid_ = m.pid;
      lose(m.rank, fmt::format("rank {} ({}, pid {}) was replaced by a new process ({}, pid {})",
                               m.rank, m.host, m.pid, req.host(), req.pid()));
      if (state_ == v1::JOB_STATE_FAILED) {
        return Status(StatusCode::FAILED_PRECONDITION,
                      fmt::format("job '{}' has failed: {}", config_.job_id, reason_));
      }
      break;
    }
  }
  const bool open = state_ == v1::JOB_STATE_WAITING || state_ == v1::JOB_STATE_RECOVERING;
  if (!open || members_.size() >= static_cast<size_t>(config_.world_size)) {
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
  const uint64_t gen = generation_;
  members_.push_back(std::move(joined));
  log(fmt::format(
      "job '{}': {} (pid {}) joined generation {}{}{}, {} of {}", config_.job_id, req.host(),
      req.pid(), gen, requested >= 0 ? fmt::format(" asking for rank {}", requested) : "",
      req.previous_generation() != 0 ? fmt::format(" (was rank {} of generation {})",
                                                   req.previous_rank(), req.previous_generation())
                                     : "",
      members_.size(), config_.world_size));
  if (members_.size() == static_cast<size_t>(config_.world_size)) complete_rendezvous();

  WaitEnd end = wait_until(lock, wait, [&] {
    go_on_with_fewer();
    return generation_ != gen ||
           (state_ != v1::JOB_STATE_WAITING && state_ != v1::JOB_STATE_RECOVERING);
  });
  if (end == WaitEnd::kReady) {
    if (state_ == v1::JOB_STATE_FAILED) return aborted();
    if (generation_ != gen) return stale_generation(gen, "the rendezvous");
    const Member* me = member_by_id(id);
    resp->set_job_id(config_.job_id);
    resp->set_rank(me->rank);
    resp->set_world_size(world_);
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
    *resp->mutable_last_checkpoint() = last_checkpoint_;
    resp->set_heartbeat_interval_ms(static_cast<uint64_t>(config_.heartbeat_interval.count()));
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
  resp->set_generation(generation_);
  resp->set_state(state_);
  resp->set_reason(reason_);
  // An older generation, or no ranks yet while recovering: the answer tells the
  // worker to re-join; no member is touched.
  if (req.generation() != 0 && req.generation() != generation_) return Status::OK;
  if (state_ == v1::JOB_STATE_RECOVERING && !ranked_) return Status::OK;
  if (Status s = check_rank(req.rank()); !s.ok()) return s;
  Member& m = members_[static_cast<size_t>(req.rank())];
  m.last_heartbeat = Clock::now();
  ++m.heartbeats;
  if (req.has_progress()) m.progress = req.progress();
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
    failed_pid_ = m.pid;
    lose(m.rank,
         fmt::format("rank {} ({}, pid {}) lost: no heartbeat for {} (timeout {})", m.rank, m.host,
                     m.pid, format_duration(silent), format_duration(config_.heartbeat_timeout)));
    return;  // members_ may have been cleared
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
  if (state_ == v1::JOB_STATE_FAILED) return aborted();
  const uint64_t gen = req.generation() != 0 ? req.generation() : generation_;
  if (gen != generation_) return stale_generation(gen, fmt::format("barrier '{}'", req.name()));
  if (Status s = check_rank(req.rank()); !s.ok()) return s;
  BarrierState& b = barriers_[req.name()];  // std::map: the reference stays valid
  if (!b.arrived.insert(req.rank()).second) {
    return Status(
        StatusCode::ALREADY_EXISTS,
        fmt::format("rank {} is already waiting at barrier '{}'", req.rank(), req.name()));
  }
  resp->set_generation(generation_);
  if (b.arrived.size() == static_cast<size_t>(world_)) {
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
  for (int r = 0; r < world_; ++r) {
    if (b.arrived.count(r) == 0) missing.push_back(r);
  }
  const size_t arrived = b.arrived.size();
  b.arrived.erase(req.rank());
  if (end == WaitEnd::kReady) {
    if (state_ == v1::JOB_STATE_FAILED) return aborted();
    return stale_generation(gen, fmt::format("barrier '{}'", req.name()));
  }
  return wait_end_status(
      end, fmt::format("barrier '{}' of job '{}' timed out after {}: {} of {} ranks arrived, "
                       "missing ranks {}",
                       req.name(), config_.job_id, format_duration(wait.limit), arrived, world_,
                       rank_list(missing)));
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
  const uint64_t gen = generation_;
  WaitEnd end = wait_until(
      lock, wait, [&] { return found() || state_ == v1::JOB_STATE_FAILED || generation_ != gen; });
  if (end == WaitEnd::kReady && found()) {
    resp->set_value(kv_[req.key()]);
    return Status::OK;
  }
  if (end == WaitEnd::kReady && generation_ != gen) {
    return stale_generation(gen, fmt::format("waiting for key '{}'", req.key()));
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
  const uint64_t gen = generation_;
  WaitEnd end = wait_until(lock, wait, [&] {
    return all_set() || state_ == v1::JOB_STATE_FAILED || generation_ != gen;
  });
  if (end == WaitEnd::kReady && all_set()) return Status::OK;
  if (end == WaitEnd::kReady && generation_ != gen) return stale_generation(gen, "Wait");
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
  resp->set_world_size(world_);
  resp->set_generation(generation_);
  resp->set_reason(reason_);
  resp->set_failed_rank(failed_rank_);
  resp->set_uptime_ms(age_ms(start_, now));
  *resp->mutable_last_checkpoint() = last_checkpoint_;
  resp->set_restarts(static_cast<uint32_t>(restarts_));
  resp->set_max_restarts(static_cast<uint32_t>(std::max(0, config_.max_restarts)));
  resp->set_failed_pid(failed_pid_);
  for (const Member& m : members_) {
    v1::WorkerStatus* w = resp->add_workers();
    w->set_rank(m.rank >= 0 ? m.rank : m.requested_rank);
    w->set_host(m.host);
    w->set_address(m.address);
    w->set_pid(m.pid);
    w->set_state(m.state);
    w->set_last_heartbeat_age_ms(age_ms(m.last_heartbeat, now));
    w->set_heartbeats(m.heartbeats);
    if (m.progress) *w->mutable_progress() = *m.progress;
  }
  return Status::OK;
}

void Job::fail(int rank, const std::string& reason) {
  state_ = v1::JOB_STATE_FAILED;
  reason_ = reason;
  failed_rank_ = rank;
  log(fmt::format("job '{}' FAILED: {}", config_.job_id, reason));
  persist();
  cv_.notify_all();
}

void Job::lose(int rank, const std::string& reason) {
  if (config_.max_restarts <= 0) {
    fail(rank, reason);
    return;
  }
  if (restarts_ >= config_.max_restarts) {
    fail(rank, fmt::format("{}; restarts exhausted ({} of {} used)", reason, restarts_,
                           config_.max_restarts));
    return;
  }
  ++restarts_;
  ++generation_;
  state_ = v1::JOB_STATE_RECOVERING;
  recovering_since_ = Clock::now();
  reason_ = reason;
  failed_rank_ = rank;
  members_.clear();
  ranked_ = false;
  // Blocked barrier calls hold references into barriers_: empty them, keep the nodes.
  for (auto& [name, b] : barriers_) b.arrived.clear();
  pending_.clear();
  log(fmt::format("job '{}': {}; restart {} of {}: generation {}, waiting for {} workers to join",
                  config_.job_id, reason, restarts_, config_.max_restarts, generation_,
                  config_.world_size));
  persist();
  cv_.notify_all();
}

void Job::go_on_with_fewer() {
  const int min = config_.min_workers;
  if (state_ != v1::JOB_STATE_RECOVERING || min <= 0 || min >= config_.world_size) return;
  const size_t n = members_.size();
  if (n < static_cast<size_t>(min) || n >= static_cast<size_t>(config_.world_size)) return;
  if (Clock::now() - recovering_since_ < config_.rejoin_timeout) return;
  log(fmt::format(
      "job '{}': {} of {} workers re-joined within {}: going on with them (elastic, "
      "--min-workers {})",
      config_.job_id, n, config_.world_size, format_duration(config_.rejoin_timeout), min));
  complete_rendezvous();
}

Status Job::stale_generation(uint64_t gen, const std::string& what) const {
  return Status(StatusCode::ABORTED,
                fmt::format("{}: generation {} of job '{}' is over (now {}): join again", what, gen,
                            config_.job_id, generation_));
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
  if (req.generation() != 0 && req.generation() < generation_) {
    log(
        fmt::format("job '{}': failure of rank {} reported for generation {}, which is over (now "
                    "{}): {}",
                    config_.job_id, rank, req.generation(), generation_, req.reason()));
  } else if (state_ == v1::JOB_STATE_WAITING || state_ == v1::JOB_STATE_RUNNING ||
             state_ == v1::JOB_STATE_RECOVERING) {
    std::string who = rank >= 0 ? fmt::format("rank {}", rank) : std::string("a worker");
    std::string by;
    if (req.has_reporter_rank() && req.reporter_rank() != rank) {
      by = fmt::format(" (reported by rank {})", req.reporter_rank());
    }
    std::string why = req.reason().empty() ? std::string("no reason given") : req.reason();
    if (state_ == v1::JOB_STATE_RUNNING && rank >= 0 &&
        static_cast<size_t>(rank) < members_.size()) {
      Member& m = members_[static_cast<size_t>(rank)];
      if (m.state == v1::WORKER_STATE_ALIVE) m.state = v1::WORKER_STATE_FAILED;
    }
    std::string what = fmt::format("{} failed{}: {}", who, by, why);
    failed_pid_ = 0;
    if (req.fatal()) {
      fail(rank, what);
    } else {
      lose(rank, what);
    }
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
    persist();
  }
  cv_.notify_all();
  resp->set_state(state_);
  return Status::OK;
}

// ---- Checkpoints (two-phase commit) ----

Status Job::begin_checkpoint(const v1::BeginCheckpointRequest& req,
                             v1::BeginCheckpointResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (state_ == v1::JOB_STATE_FAILED) return aborted();
  if (req.generation() != generation_) {
    return stale_generation(req.generation(), fmt::format("checkpoint of step {}", req.step()));
  }
  if (Status s = check_rank(req.rank()); !s.ok()) return s;
  if (req.step() < 0 || req.root().empty()) {
    return Status(StatusCode::INVALID_ARGUMENT,
                  fmt::format("BeginCheckpoint: needs a step >= 0 and a root folder (got step {}, "
                              "root '{}')",
                              req.step(), req.root()));
  }
  PendingCheckpoint& p = pending_[req.step()];
  if (p.root.empty()) {
    p.generation = generation_;
    p.epoch = req.epoch();
    p.root = req.root();
    p.config_json = req.config_json();
    p.keep_last = req.keep_last();
  }
  resp->set_name(ckpt::checkpoint_name(req.step()));
  return Status::OK;
}

Status Job::commit_shard(const v1::CommitShardRequest& req, v1::CommitShardResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  if (state_ == v1::JOB_STATE_FAILED) return aborted();
  const std::string name = ckpt::checkpoint_name(req.step());
  if (req.generation() != generation_) {
    return stale_generation(req.generation(), "shard of checkpoint " + name);
  }
  if (Status s = check_rank(req.shard().rank()); !s.ok()) return s;
  auto it = pending_.find(req.step());
  if (it == pending_.end()) {
    return Status(StatusCode::FAILED_PRECONDITION,
                  fmt::format("CommitShard: checkpoint {} of job '{}' was not begun (or was "
                              "abandoned)",
                              name, config_.job_id));
  }
  PendingCheckpoint& p = it->second;
  p.shards[req.shard().rank()] = req.shard();
  resp->set_shards_in(static_cast<int32_t>(p.shards.size()));
  if (p.shards.size() == static_cast<size_t>(world_)) {
    ckpt::Manifest m;
    m.name = name;
    m.step = req.step();
    m.epoch = p.epoch;
    m.world_size = world_;
    m.generation = p.generation;
    for (const auto& [rank, d] : p.shards) {
      m.shards.push_back(ckpt::ShardEntry{rank, d.file(), d.bytes(), d.checksum()});
    }
    const std::string root = p.root;
    const int keep = p.keep_last;
    try {
      if (!p.config_json.empty()) m.config = nlohmann::json::parse(p.config_json);
      ckpt::CheckpointStore(root).commit(m, keep);
    } catch (const std::exception& e) {
      pending_.erase(it);
      log(fmt::format("job '{}': checkpoint {} NOT committed: {}", config_.job_id, name, e.what()));
      return Status(StatusCode::FAILED_PRECONDITION,
                    fmt::format("checkpoint {} of job '{}' was not committed: {}", name,
                                config_.job_id, e.what()));
    }
    last_checkpoint_.set_root(root);
    last_checkpoint_.set_name(name);
    last_checkpoint_.set_step(m.step);
    last_checkpoint_.set_generation(m.generation);
    pending_.erase(pending_.begin(), std::next(it));
    resp->set_committed(true);
    log(fmt::format("job '{}': checkpoint {} committed ({} shards, generation {}) in {}",
                    config_.job_id, name, m.shards.size(), m.generation, root));
    persist();
  }
  *resp->mutable_last() = last_checkpoint_;
  return Status::OK;
}

Status Job::last_checkpoint(const v1::GetLastCheckpointRequest& req, v1::CheckpointRef* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!req.job_id().empty()) {
    if (Status s = check_job_id(req.job_id()); !s.ok()) return s;
  }
  *resp = last_checkpoint_;
  return Status::OK;
}

void Job::shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  shutdown_ = true;
  cv_.notify_all();
}

}  // namespace dtrain::coordinator
