// `dtrain coordinator`: runs the job coordinator (gRPC, proto/coordinator.proto) in
// the foreground until SIGINT or SIGTERM.
//
//   dtrain coordinator --port 29500 --world-size 2 [--bind ADDR] [--job-id ID]
//                      [--token T | env DTRAIN_JOB_TOKEN] [--heartbeat-timeout S]
//                      [--heartbeat-interval S] [--max-restarts N] [--state-dir DIR]
//                      [--min-workers M] [--max-workers N] [--rejoin-timeout S]
//                      [--tls-cert PEM --tls-key PEM]
//
// Any --bind other than loopback requires the token; --tls-cert/--tls-key serve TLS
// (clients: --tls-ca or DTRAIN_TLS_CA, DTRAIN_TLS_SERVER_NAME for a name other than
// the address).
//
// With --max-restarts N > 0 a lost worker starts a new generation (the survivors
// re-join, the lost rank's launcher restarts it) up to N times; after that the job
// FAILS. --state-dir keeps job.json (generation, restarts, state, last committed
// checkpoint): a coordinator restarted on the same folder continues the job.
// --min-workers M (elastic): when fewer than --world-size workers come back within
// --rejoin-timeout after a loss, but at least M, the job goes on with them.
//
// Prints one line with the bound address on stdout ("... listening on HOST:PORT"),
// then the job's events on stderr. Signals: SIGINT and SIGTERM are blocked before
// the server starts its threads (which inherit the mask) and taken synchronously
// with sigwait() on this thread, so no handler and no global state are needed.
// It does not exit by itself when the job ends (the launcher that started it stops it).
#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/coordinator/server.h"
#include "logging.h"

namespace dtrain::cli {

namespace {

struct CoordinatorConfig {
  int port = 29500;
  int world_size = 0;
  std::string bind = "127.0.0.1";
  std::string job_id = "default";
  std::string token;
  std::string tls_cert;  // PEM files; both or neither (plaintext)
  std::string tls_key;
  double heartbeat_timeout_s = 30.0;
  double heartbeat_interval_s = 1.0;
  int max_restarts = 3;
  std::string state_dir;
  int min_workers = 0;
  int max_workers = 0;  // --max-workers: the same as world_size when given
  double rejoin_timeout_s = 10.0;
};

// Blocks SIGINT/SIGTERM on this thread (and every thread started after) for its
// lifetime; wait() takes the next one.
// Thread-safety: use from the thread that constructed it.
class BlockedSignals {
 public:
  BlockedSignals() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    int rc = pthread_sigmask(SIG_BLOCK, &set_, &old_);
    DTRAIN_CHECK(rc == 0, InternalError, "coordinator: cannot block signals: {}",
                 std::strerror(rc));
  }
  ~BlockedSignals() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  BlockedSignals(const BlockedSignals&) = delete;
  BlockedSignals& operator=(const BlockedSignals&) = delete;

  int wait() const {
    int sig = 0;
    int rc = sigwait(&set_, &sig);
    DTRAIN_CHECK(rc == 0, InternalError, "coordinator: sigwait failed: {}", std::strerror(rc));
    return sig;
  }

 private:
  sigset_t set_{};
  sigset_t old_{};
};

// Lines name the coordinator; coordinator.log in --log-dir ($DTRAIN_LOG_DIR) when given.
void start_coordinator_log(const LogOptions& given) {
  LogOptions o = resolve_log_options(given, process_env_reader());
  LogContext context;
  context.role = LogRole::kCoordinator;
  configure_process_log(o, context);
  if (!o.dir.empty() && o.dir != "none") open_log_file(o, o.dir);
}

int run_coordinator(CoordinatorConfig c) {
  if (c.world_size == 0) c.world_size = c.max_workers;
  DTRAIN_CHECK(c.max_workers == 0 || c.max_workers == c.world_size, InvalidArgument,
               "coordinator: --max-workers {} differs from --world-size {}: the job starts with "
               "its maximum and can only shrink (to --min-workers)",
               c.max_workers, c.world_size);
  DTRAIN_CHECK(std::isfinite(c.heartbeat_timeout_s) && c.heartbeat_timeout_s >= 0, InvalidArgument,
               "--heartbeat-timeout must be >= 0 seconds, got {}", c.heartbeat_timeout_s);
  coordinator::ServerOptions o;
  o.bind_address = c.bind;
  o.port = c.port;
  o.world_size = c.world_size;
  o.job_id = c.job_id;
  o.token = c.token;
  o.tls_cert_file = c.tls_cert;
  o.tls_key_file = c.tls_key;
  o.heartbeat_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(std::llround(c.heartbeat_timeout_s * 1000)));
  DTRAIN_CHECK(std::isfinite(c.heartbeat_interval_s) && c.heartbeat_interval_s > 0, InvalidArgument,
               "--heartbeat-interval must be > 0 seconds, got {}", c.heartbeat_interval_s);
  o.heartbeat_interval =
      std::chrono::milliseconds(std::max<int64_t>(1, std::llround(c.heartbeat_interval_s * 1000)));
  o.max_restarts = c.max_restarts;
  o.state_dir = c.state_dir;
  DTRAIN_CHECK(std::isfinite(c.rejoin_timeout_s) && c.rejoin_timeout_s >= 0, InvalidArgument,
               "--rejoin-timeout must be >= 0 seconds, got {}", c.rejoin_timeout_s);
  o.min_workers = c.min_workers;
  o.rejoin_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(std::llround(c.rejoin_timeout_s * 1000)));
  o.log = [](const std::string& line) {
    spdlog::info("dtrain coordinator: {}", line);
    std::fflush(stderr);
  };

  BlockedSignals signals;  // before the server starts its threads
  coordinator::CoordinatorServer server(std::move(o));
  fmt::print("dtrain coordinator: job '{}' (world size {}{}) listening on {}\n", c.job_id,
             c.world_size, c.token.empty() ? "" : ", token required", server.address());
  std::fflush(stdout);

  int sig = signals.wait();
  spdlog::info("dtrain coordinator: {} received, shutting down",
               sig == SIGINT ? "SIGINT" : "SIGTERM");
  coordinator::JobStatus st = server.status();
  server.shutdown();
  spdlog::info("dtrain coordinator: stopped; job '{}' was {} with {} of {} workers", st.job_id,
               coordinator::job_state_name(st.state), st.workers.size(), st.world_size);
  return 0;
}

}  // namespace

Command add_coordinator_command(CLI::App& app) {
  auto c = std::make_shared<CoordinatorConfig>();
  CLI::App* cmd =
      app.add_subcommand("coordinator",
                         "Run the job coordinator (rendezvous, barriers, key-value store) until "
                         "SIGINT/SIGTERM");
  cmd->add_option("--port", c->port, "Port to listen on (0: any free port)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  // One of --world-size and --max-workers is required (a usage error otherwise).
  CLI::Option_group* size = cmd->add_option_group("size", "How many workers (one is required)");
  size->add_option("--world-size", c->world_size, "Number of workers in the job")->check(kPositive);
  size->add_option("--max-workers", c->max_workers,
                   "Elastic: the most workers the job runs with (the same as --world-size, "
                   "which it may replace)")
      ->check(kPositive);
  size->require_option(1, 2);
  cmd->add_option("--bind", c->bind, "Address to listen on (0.0.0.0: every interface)")
      ->capture_default_str();
  cmd->add_option("--job-id", c->job_id, "Job id every worker must name")->capture_default_str();
  cmd->add_option("--tls-cert", c->tls_cert,
                  "PEM certificate chain: serve TLS (with --tls-key; clients pass --tls-ca or "
                  "DTRAIN_TLS_CA)");
  cmd->add_option("--tls-key", c->tls_key, "PEM private key of --tls-cert");
  cmd->add_option("--token", c->token, "Job token every call must carry (default: none)")
      ->envname("DTRAIN_JOB_TOKEN");
  cmd->add_option("--heartbeat-timeout", c->heartbeat_timeout_s,
                  "Seconds without a heartbeat after which a worker is lost (0: off)")
      ->capture_default_str();
  cmd->add_option("--heartbeat-interval", c->heartbeat_interval_s,
                  "Seconds between a worker's heartbeats (told to the workers)")
      ->capture_default_str();
  cmd->add_option("--max-restarts", c->max_restarts,
                  "Lost workers to recover from (a new generation each) before the job fails "
                  "(0: the first loss fails it)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--state-dir", c->state_dir,
                  "Folder for job.json; a coordinator restarted on it continues the job "
                  "(default: none)");
  cmd->add_option("--min-workers", c->min_workers,
                  "Elastic: go on with at least this many workers when the others do not "
                  "re-join within --rejoin-timeout (0: off; --world-size is the maximum)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--rejoin-timeout", c->rejoin_timeout_s,
                  "Elastic: seconds a recovering rendezvous waits for every worker")
      ->capture_default_str();
  auto log = std::make_shared<LogOptions>();
  add_log_options(cmd, *log);
  return {cmd, [c, log] {
            start_coordinator_log(*log);
            return run_coordinator(*c);
          }};
}

}  // namespace dtrain::cli
