// Job: the coordinator's state for one job, with every RPC's semantics, apart from
// the transport (server.cc adds gRPC plumbing and the token check on top).
//
// State: the members in join order (sorted by rank once the rendezvous completes),
// the job state and generation, named barriers, the key-value store, the failure.
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
  std::chrono::milliseconds heartbeat_timeout{0};  // 0: no liveness monitoring
  std::function<void(const std::string&)> log;     // may be empty
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
  };
  struct BarrierState {
    uint64_t round = 0;
    std::set<int> arrived;
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
  Member* member_by_id(uint64_t id);               // REQUIRES: mu_ held
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
  bool shutdown_ = false;                            // GUARDED_BY(mu_)
};

}  // namespace dtrain::coordinator
