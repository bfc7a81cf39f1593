// Job: the coordinator's state for one job, with every RPC's semantics, apart from
// the transport (server.cc adds gRPC plumbing and the token check on top).
//
// State: the members in join order (sorted by rank once the rendezvous completes),
// the job state and generation, named barriers, the key-value store, the failure,
// the restart count, the checkpoints being committed and the last committed one.
// With a state folder, job.json there holds what must survive a coordinator restart
// (job id, world size, generation, restarts, state, last committed checkpoint); it
// is rewritten (tmp -> fsync -> rename) on every change of those.
// One mutex guards it all and one condition variable wakes every blocked call on
// any change; blocked calls re-check in short slices so that a cancelled client is
// noticed. Calls answer grpc::Status codes as documented in coordinator.proto.
//
// Thread-safety: all methods are safe to call from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include <grpcpp/support/status.h>

#include "convert.h"
#include "dtrain/proto/coordinator.pb.h"

namespace dtrain::coordinator {

namespace v1 = ::dtrain::v1;
using Clock = std::chrono::steady_clock;

// How long one blocking call may wait, and how to tell that its client went away.
struct CallWait {
  Clock::time_point deadline;
  std::chrono::milliseconds limit{0};  // deadline - start, for messages
  std::function<bool()> cancelled;     // may be empty
};

struct JobConfig {
  std::string job_id;
  int world_size = 1;
  std::chrono::milliseconds heartbeat_timeout{0};      // 0: no liveness monitoring
  std::chrono::milliseconds heartbeat_interval{1000};  // told to the workers in Join
  // Restarts (generation bumps after a lost worker) before the job FAILS; 0: a lost
  // worker fails the job at once.
  int max_restarts = 0;
  std::string state_dir;  // empty: nothing persisted
  // Elastic: when a recovering rendezvous has at least min_workers (0 or
  // world_size: off) but not all after rejoin_timeout, the job goes on with those.
  int min_workers = 0;
  std::chrono::milliseconds rejoin_timeout{10000};
  std::function<void(const std::string&)> log;  // may be empty
};

class Job {
 public:
  explicit Job(JobConfig config);

  grpc::Status join(const v1::JoinRequest& req, const CallWait& wait, v1::JoinResponse* resp);
  grpc::Status heartbeat(const v1::HeartbeatRequest& req, v1::HeartbeatResponse* resp);
  grpc::Status barrier(const v1::BarrierRequest& req, const CallWait& wait,
                       v1::BarrierResponse* resp);
  grpc::Status set(const v1::SetRequest& req);
  grpc::Status get(const v1::GetRequest& req, const CallWait& wait, v1::GetResponse* resp);
  grpc::Status wait(const v1::WaitRequest& req, const CallWait& wait);
  grpc::Status status(const v1::GetJobStatusRequest& req, v1::JobStatus* resp);
  grpc::Status report_failure(const v1::ReportFailureRequest& req, v1::ReportFailureResponse* resp);
  grpc::Status leave(const v1::LeaveRequest& req, v1::LeaveResponse* resp);
  grpc::Status begin_checkpoint(const v1::BeginCheckpointRequest& req,
                                v1::BeginCheckpointResponse* resp);
  grpc::Status commit_shard(const v1::CommitShardRequest& req, v1::CommitShardResponse* resp);
  grpc::Status last_checkpoint(const v1::GetLastCheckpointRequest& req, v1::CheckpointRef* resp);

  // Declares ranks lost whose heartbeats stopped for longer than the timeout.
  void check_heartbeats();
  // Ends every blocked call (UNAVAILABLE) and refuses blocking calls from now on.
  void shutdown();

  const std::string& job_id() const { return config_.job_id; }

 private:
  struct Member {
    uint64_t id = 0;  // join sequence number
    std::string host;
    std::string address;
    int64_t pid = 0;
    int requested_rank = -1;
    int rank = -1;
    int local_rank = 0;
    v1::WorkerState state = v1::WORKER_STATE_JOINING;
    Clock::time_point joined;
    Clock::time_point last_heartbeat;
    uint64_t heartbeats = 0;
    std::optional<v1::WorkerProgress> progress;  // from the latest heartbeat with one
  };
  struct BarrierState {
    uint64_t round = 0;
    std::set<int> arrived;
  };
  struct PendingCheckpoint {
    uint64_t generation = 0;
    int64_t epoch = 0;
    std::string root;
    std::string config_json;
    int keep_last = 0;
    std::map<int, v1::ShardDescriptor> shards;  // by rank
  };
  enum class WaitEnd { kReady, kTimeout, kCancelled, kShutdown };

  // Waits until ready() (checked first, with the lock held) or the call must end.
  template <class Ready>
  WaitEnd wait_until(std::unique_lock<std::mutex>& lock, const CallWait& wait, Ready ready);
  grpc::Status wait_end_status(WaitEnd end, const std::string& what) const;
  grpc::Status check_job_id(const std::string& job_id) const;
  grpc::Status check_rank(int rank) const;         // REQUIRES: mu_ held
  grpc::Status aborted() const;                    // REQUIRES: mu_ held, state_ FAILED
  void complete_rendezvous();                      // REQUIRES: mu_ held
  void fail(int rank, const std::string& reason);  // REQUIRES: mu_ held
  // A worker is lost: a new generation (restarts left) or FAILED.  REQUIRES: mu_ held
  void lose(int rank, const std::string& reason);
  grpc::Status stale_generation(uint64_t gen, const std::string& what) const;  // REQUIRES: mu_
  void load_state();  // from config_.state_dir/job.json, when there is one (constructor)
  void persist();     // REQUIRES: mu_ held
  // Elastic: completes a recovering rendezvous with fewer workers once allowed.
  void go_on_with_fewer();            // REQUIRES: mu_ held
  Member* member_by_id(uint64_t id);  // REQUIRES: mu_ held
  void log(const std::string& line) const;

  const JobConfig config_;
  const Clock::time_point start_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Member> members_;                 // GUARDED_BY(mu_)
  uint64_t next_member_id_ = 1;                 // GUARDED_BY(mu_)
  v1::JobState state_ = v1::JOB_STATE_WAITING;  // GUARDED_BY(mu_)
  uint64_t generation_ = 1;                     // GUARDED_BY(mu_)
  bool ranked_ = false;  // ranks assigned, members_[r].rank == r  GUARDED_BY(mu_)
  std::map<std::string, BarrierState> barriers_;     // GUARDED_BY(mu_)
  std::unordered_map<std::string, std::string> kv_;  // GUARDED_BY(mu_)
  std::string reason_;                               // GUARDED_BY(mu_)
  int failed_rank_ = -1;                             // GUARDED_BY(mu_)
  int64_t failed_pid_ = 0;                           // GUARDED_BY(mu_)
  bool shutdown_ = false;                            // GUARDED_BY(mu_)
  int restarts_ = 0;                                 // GUARDED_BY(mu_)
  int world_ = config_.world_size;  // this generation's workers (elastic: fewer)  GUARDED_BY(mu_)
  Clock::time_point recovering_since_;            // GUARDED_BY(mu_)
  v1::CheckpointRef last_checkpoint_;             // GUARDED_BY(mu_)
  std::map<int64_t, PendingCheckpoint> pending_;  // by step  GUARDED_BY(mu_)
};

}  // namespace dtrain::coordinator
