// Recovery of a training job after a lost peer: where a (re)started attempt begins,
// and the loop that re-joins the job and tries again.
//
// When a collective fails (CommError/TimeoutError: a lost peer, or the coordinator
// announced a newer generation) a worker re-joins the job (WorkerSession::rejoin, a
// new communicator) and runs the attempt again from the last committed checkpoint
// (from step 0 when none was committed). A process restarted by its launcher joins
// the later generation and resumes the same way. Any other error, or a job without
// coordinator, is reported to the coordinator and rethrown.
//
// Not here: what an attempt does (train.cc), the checkpoints (checkpointing.h).
// Thread-safety: the worker's main thread.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>

#include "worker_session.h"

namespace dtrain::cli {

// How an attempt starts: from scratch, or from a committed checkpoint.
struct StartFrom {
  std::string resume = "none";  // none | auto | a checkpoint name
  // Set after a recovery: when the failure was noticed (the first step after it
  // prints how long the recovery took).
  std::optional<std::chrono::steady_clock::time_point> failure_seen;
  bool recovered = false;  // a later generation (a restarted process or a survivor)
};

struct RecoveryOptions {
  std::string ckpt_dir;         // empty: no checkpoints, a recovery starts at step 0
  std::string resume = "none";  // what the job was started with (--resume)
};

// Runs attempt(from) until it returns, re-joining the job after each transient
// failure (see the file comment); rethrows when the job cannot go on.
void run_with_recovery(WorkerSession& session, const RecoveryOptions& options,
                       const std::function<void(const StartFrom&)>& attempt);

}  // namespace dtrain::cli
