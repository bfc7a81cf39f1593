#include "recovery.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "dtrain/common/error.h"

namespace dtrain::cli {

namespace {

// After a generation change: the last committed checkpoint when there is one (or
// when the run itself started from one), else step 0 again.
std::string recovery_resume(const RecoveryOptions& options, const WorkerSession& session) {
  if (options.ckpt_dir.empty()) return "none";
  if (!session.last_checkpoint().name.empty() || options.resume != "none") return "auto";
  return "none";
}

}  // namespace

void run_with_recovery(WorkerSession& session, const RecoveryOptions& options,
                       const std::function<void(const StartFrom&)>& attempt) {
  StartFrom from;
  from.resume = options.resume;
  if (session.generation() > 1) {  // a restarted process joining a recovering job
    from.resume = recovery_resume(options, session);
    from.recovered = true;
  }
  for (;;) {
    try {
      attempt(from);
      return;
    } catch (const Error& e) {
      const bool transient = e.kind() == ErrorKind::kComm || e.kind() == ErrorKind::kTimeout;
      const std::string reason = fmt::format("rank {}: {}", session.rank(), e.message());
      if (!transient || !session.has_coordinator()) {
        session.report_failure(reason, /*fatal=*/!transient);
        throw;
      }
      from.failure_seen = std::chrono::steady_clock::now();
      spdlog::warn("dtrain train: {}; re-joining the job", reason);
      // False (or a throw) when the job has failed: recovery off or restarts exhausted.
      if (!session.rejoin(reason)) throw;
      from.resume = recovery_resume(options, session);
      from.recovered = true;
      spdlog::info("dtrain train: rank {} joined generation {}, resuming from {}", session.rank(),
                   session.generation(),
                   from.resume == "auto" ? "the last committed checkpoint" : "step 0");
    }
  }
}

}  // namespace dtrain::cli
