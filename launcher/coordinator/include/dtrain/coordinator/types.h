// Plain C++ views of what the coordinator hands out (ranks, peers, job status), so
// that code using the client needs neither gRPC nor the generated protobuf types.
// The wire format is proto/coordinator.proto; src/convert.cc maps between the two.
//
// Thread-safety: plain values; REQUIRES external synchronization when shared.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace dtrain::coordinator {

// The job's life cycle (JobState in the proto). kUnknown stands for a value a newer
// coordinator sends that this build does not know.
enum class JobState { kUnknown, kWaiting, kRunning, kFailed, kSucceeded, kRecovering };
enum class WorkerState { kUnknown, kJoining, kAlive, kLost, kFailed, kLeft };

const char* job_state_name(JobState s);        // "WAITING", "RUNNING", ...
const char* worker_state_name(WorkerState s);  // "JOINING", "ALIVE", ...

// A committed checkpoint the coordinator recorded (name empty: none).
struct CheckpointRef {
  std::string root;
  std::string name;  // "step-00000120"
  int64_t step = 0;
  uint64_t generation = 0;
};

// One rank's written shard (the wire form of dtrain::ckpt::ShardEntry).
struct ShardInfo {
  int rank = 0;
  std::string file;
  uint64_t bytes = 0;
  std::string checksum;
};

struct PeerInfo {
  int rank = -1;
  std::string host;
  std::string address;
  int64_t pid = 0;
  int local_rank = 0;
};

// What Join returns: this worker's identity in generation `generation`.
struct JoinResult {
  int rank = -1;
  int world_size = 0;
  uint64_t generation = 0;
  int local_rank = 0;
  int local_world_size = 0;
  std::vector<PeerInfo> peers;  // every rank, sorted by rank
  CheckpointRef last_checkpoint;
  std::chrono::milliseconds heartbeat_interval{0};  // 0: the coordinator did not say
};

struct HeartbeatResult {
  uint64_t generation = 0;  // the job's current generation
  JobState state = JobState::kUnknown;
  std::string reason;  // why the job failed, when it did
};

// A worker's training progress as its heartbeats report it (step -1: none yet).
struct WorkerProgress {
  int64_t step = -1;
  double samples_per_s = 0;
  double loss = 0;
};

struct WorkerStatus {
  int rank = -1;  // -1 while the rendezvous is open and no rank was requested
  std::string host;
  std::string address;
  int64_t pid = 0;
  WorkerState state = WorkerState::kUnknown;
  std::chrono::milliseconds last_heartbeat_age{0};
  uint64_t heartbeats = 0;
  WorkerProgress progress;
};

struct JobStatus {
  std::string job_id;
  JobState state = JobState::kUnknown;
  int world_size = 0;
  uint64_t generation = 0;
  std::vector<WorkerStatus> workers;  // by rank once running, in join order before
  std::string reason;                 // why the job failed, when it did
  int failed_rank = -1;
  int64_t failed_pid = 0;  // the process the last loss names, when known
  std::chrono::milliseconds uptime{0};
  CheckpointRef last_checkpoint;
  int restarts = 0;
  int max_restarts = 0;
};

}  // namespace dtrain::coordinator
