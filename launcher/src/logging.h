// The process log of the dtrain binary: spdlog lines that name who wrote them.
//
//   2026-12-07 12:00:01.123 I rank 1/2 local 1 gen 2 host h0] dtrain train: ...
//   2026-12-07 12:00:01.123 W launch host h0] dtrain launch: rank 1 was killed ...
//   2026-12-07 12:00:01.123 I coordinator host h0] dtrain coordinator: ...
//
// (UTC; "gen -" until the worker has joined a generation). JSON lines carry the same
// fields: {"time", "level", "rank", "local_rank", "generation", "host", "msg"} (rank,
// local_rank and generation are null where they do not apply).
//
// main() installs one logger as spdlog's default logger, once, before any command
// runs (install_process_logger): the only process-wide logger, so that code anywhere
// in the binary logs with spdlog::info(...) without a logger object travelling
// through every call. Until a command configures it, it writes the bare message to
// stderr at level info, exactly what these lines printed before they were spdlog
// calls. `train`, `launch` and `coordinator` configure it at start-up
// (configure_process_log: level, context) and may add one file (open_log_file:
// rank-<r>.log, launch.log, coordinator.log, in --log-format). The console (stderr)
// always gets text lines at the configured level, so errors and warnings reach the
// terminal (and launch, which prefixes them "[rank k] ") with or without files.
// Every line is flushed as it is written: a worker killed by SIGKILL keeps its log.
//
// Library code (engine, comm) never needs any of this: spdlog works unconfigured.
// Thread-safety: every function may be called from any thread (the sinks are _mt, the
// context sits behind a mutex); install_process_logger() runs once, first.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "worker_env.h"

namespace CLI {
class App;
}

namespace dtrain::cli {

// --log-level / --log-dir / --log-format as given; empty: $DTRAIN_LOG_LEVEL /
// $DTRAIN_LOG_DIR / $DTRAIN_LOG_FORMAT, then the defaults (info, the command's
// default folder, text). --log-dir none: no files.
struct LogOptions {
  std::string level;
  std::string dir;
  std::string format;
};

// Who writes: a worker, launch, the coordinator, or any other command (bare message).
enum class LogRole { kPlain, kRank, kLaunch, kCoordinator };

struct LogContext {
  LogRole role = LogRole::kPlain;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  uint64_t generation = 0;  // 0: not joined yet
  std::string host;         // empty: this machine's host name
};

// Registers --log-level, --log-dir and --log-format on `app` (CLI11 rejects an unknown
// level or format: exit 2).
void add_log_options(CLI::App* app, LogOptions& options);

// Fills what was not given from the environment and checks it; InvalidArgument naming
// the variable or flag otherwise.
LogOptions resolve_log_options(LogOptions given, const EnvReader& env);

// The variables that hand `o` (resolved) to a child process.
std::vector<std::string> log_env(const LogOptions& o);

// main(), once, before any command runs: spdlog's default logger (see the file comment).
void install_process_logger();

// At a command's start-up: the level and who is writing.
void configure_process_log(const LogOptions& o, const LogContext& context);

// The context of a worker with identity `id` (generation: not joined yet).
LogContext worker_log_context(const WorkerIdentity& id);

// "rank-1.log", "launch.log", "coordinator.log".
std::string log_file_name(const LogContext& context);

// Creates `dir` and adds the file dir/<log_file_name> (appended to, so a restarted
// worker continues its rank's file) in o.format; returns its path. IoError naming the
// folder when it cannot be written.
std::string open_log_file(const LogOptions& o, const std::string& dir);

// A worker joined `generation` as `rank` of `world_size`: the following lines say so.
void set_log_membership(uint64_t generation, int rank, int world_size);

// The message of a log line (text or JSON) at level error or critical; nullopt for
// any other line.
std::optional<std::string> error_message(const std::string& line);

// The messages of the last `n` error (or critical) lines of a log file in either
// format; empty when there is none or the file cannot be read.
std::vector<std::string> last_error_messages(const std::string& path, size_t n);

}  // namespace dtrain::cli
