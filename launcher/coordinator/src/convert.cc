// Wire messages -> plain C++ views (see convert.h).
#include "convert.h"

#include <fmt/format.h>

namespace dtrain::coordinator {

namespace v1 = ::dtrain::v1;

const char* job_state_name(JobState s) {
  switch (s) {
    case JobState::kWaiting:
      return "WAITING";
    case JobState::kRunning:
      return "RUNNING";
    case JobState::kFailed:
      return "FAILED";
    case JobState::kRecovering:
      return "RECOVERING";
    case JobState::kSucceeded:
      return "SUCCEEDED";
    case JobState::kUnknown:
      break;
  }
  return "UNKNOWN";
}

const char* worker_state_name(WorkerState s) {
  switch (s) {
    case WorkerState::kJoining:
      return "JOINING";
    case WorkerState::kAlive:
      return "ALIVE";
    case WorkerState::kLost:
      return "LOST";
    case WorkerState::kFailed:
      return "FAILED";
    case WorkerState::kLeft:
      return "LEFT";
    case WorkerState::kUnknown:
      break;
  }
  return "UNKNOWN";
}

JobState from_proto(v1::JobState s) {
  switch (s) {
    case v1::JOB_STATE_WAITING:
      return JobState::kWaiting;
    case v1::JOB_STATE_RUNNING:
      return JobState::kRunning;
    case v1::JOB_STATE_FAILED:
      return JobState::kFailed;
    case v1::JOB_STATE_SUCCEEDED:
      return JobState::kSucceeded;
    case v1::JOB_STATE_RECOVERING:
      return JobState::kRecovering;
    default:
      return JobState::kUnknown;
  }
}

WorkerState from_proto(v1::WorkerState s) {
  switch (s) {
    case v1::WORKER_STATE_JOINING:
      return WorkerState::kJoining;
    case v1::WORKER_STATE_ALIVE:
      return WorkerState::kAlive;
    case v1::WORKER_STATE_LOST:
      return WorkerState::kLost;
    case v1::WORKER_STATE_FAILED:
      return WorkerState::kFailed;
    case v1::WORKER_STATE_LEFT:
      return WorkerState::kLeft;
    default:
      return WorkerState::kUnknown;
  }
}

JoinResult from_proto(const v1::JoinResponse& r) {
  JoinResult j;
  j.rank = r.rank();
  j.world_size = r.world_size();
  j.generation = r.generation();
  j.local_rank = r.local_rank();
  j.local_world_size = r.local_world_size();
  for (const v1::Peer& p : r.peers()) {
    j.peers.push_back(PeerInfo{p.rank(), p.host(), p.address(), p.pid(), p.local_rank()});
  }
  j.last_checkpoint = from_proto(r.last_checkpoint());
  j.heartbeat_interval = std::chrono::milliseconds(static_cast<int64_t>(r.heartbeat_interval_ms()));
  return j;
}

CheckpointRef from_proto(const v1::CheckpointRef& c) {
  return CheckpointRef{c.root(), c.name(), c.step(), c.generation()};
}

HeartbeatResult from_proto(const v1::HeartbeatResponse& r) {
  return HeartbeatResult{r.generation(), from_proto(r.state()), r.reason()};
}

JobStatus from_proto(const v1::JobStatus& s) {
  JobStatus j;
  j.job_id = s.job_id();
  j.state = from_proto(s.state());
  j.world_size = s.world_size();
  j.generation = s.generation();
  j.reason = s.reason();
  j.failed_rank = s.failed_rank();
  j.failed_pid = s.failed_pid();
  j.uptime = std::chrono::milliseconds(static_cast<int64_t>(s.uptime_ms()));
  j.last_checkpoint = from_proto(s.last_checkpoint());
  j.restarts = static_cast<int>(s.restarts());
  j.max_restarts = static_cast<int>(s.max_restarts());
  for (const v1::WorkerStatus& w : s.workers()) {
    WorkerStatus ws;
    ws.rank = w.rank();
    ws.host = w.host();
    ws.address = w.address();
    ws.pid = w.pid();
    ws.state = from_proto(w.state());
    ws.last_heartbeat_age =
        std::chrono::milliseconds(static_cast<int64_t>(w.last_heartbeat_age_ms()));
    ws.heartbeats = w.heartbeats();
    if (w.has_progress()) {
      ws.progress = {w.progress().step(), w.progress().samples_per_s(), w.progress().loss()};
    }
    j.workers.push_back(std::move(ws));
  }
  return j;
}

std::string format_duration(std::chrono::milliseconds d) {
  if (d.count() < 1000) return fmt::format("{} ms", d.count());
  return fmt::format("{:.1f} s", static_cast<double>(d.count()) / 1000.0);
}

}  // namespace dtrain::coordinator
