// `dtrain launch`: start N local workers (and, unless one is given, a coordinator)
// and supervise them.
//
//   dtrain launch --nproc N [--coordinator HOST:PORT] [--job-id ID] [--token T]
//                 [--grace-period S] [--max-restarts N] [--heartbeat-interval S]
//                 [--heartbeat-timeout S] [--state-dir DIR]
//                 [--min-workers M [--rejoin-timeout S]] [--max-workers N]
//                 [--bind-to auto|none|core]
//                 [--log-level L] [--log-dir DIR] [--log-format text|json] -- <command ...>
//
// 1. Without --coordinator it spawns `<this binary> coordinator --port 0
//    --world-size N ...` and reads the address it binds from its stdout (the first
//    line carrying a HOST:PORT, see parse_coordinator_address).
// 2. It spawns N copies of <command> with DTRAIN_RANK, DTRAIN_WORLD_SIZE,
//    DTRAIN_LOCAL_RANK, DTRAIN_COORDINATOR, DTRAIN_JOB_ID and DTRAIN_JOB_TOKEN set
//    (see worker_env.h), each in its own process group, with stdout and stderr on
//    pipes. Every line they print is re-emitted on the same stream prefixed with
//    "[rank k] " (the coordinator's with "[coordinator] "). --bind-to places each
//    worker on its own cores (launch_binding.h; default auto: as mpirun, one core each
//    for up to 2 workers, unbound for more); the binding is logged at info level.
// 3. Recovery: when a worker exits non-zero or is killed while restarts are left
//    (--max-restarts, default 3) and the coordinator has not failed the job, it is
//    started again with the same rank and identity (plus DTRAIN_RESTART_COUNT); the
//    survivors re-join the next generation by themselves (see train.cc) and every
//    rank resumes from the last committed checkpoint. A coordinator launch started
//    that dies is started again on the same port and state folder (--state-dir;
//    default a private folder removed at exit), so the job goes on. Elastic
//    (--min-workers M < N): a worker past its restarts is left out instead of failing
//    the job, and the coordinator goes on with the workers that re-join within
//    --rejoin-timeout while at least M remain. Once a second launch asks the
//    coordinator for the job's status: a local worker it declared lost (missed
//    heartbeats: hung, or stopped) is killed, so that it is restarted like a dead one.
// 4. Past the restarts, when a worker exits non-zero or is killed, it says which rank failed and
// how
//    ("rank 1 was killed by signal 9 (SIGKILL)"), gives the other workers
//    --failure-wait seconds to notice and exit by themselves (their collectives fail
//    naming the lost rank), then sends SIGTERM to every remaining worker's process group, SIGKILL
//    after --grace-period, stops the coordinator and exits 1. SIGINT/SIGTERM/SIGHUP sent to launch
//    are forwarded to the workers (a second one kills them); launch then exits 128 + the signal
//    number. Workers start with SIGINT/SIGTERM at their defaults (launch forwards them even when
//    its own shell ignored them); a SIGHUP ignored by nohup stays ignored. SIGUSR1 is forwarded
//    as it is (a final checkpoint, signal_checkpoint.h); a worker exiting 75 after one is not
//    restarted, and launch exits 75 when workers did so and none failed.
//
// One thread does everything: children are forked before any reading starts and
// one poll() loop serves the output pipes and a signalfd (signals are blocked and
// read as events, so there is no signal handler and no global state). Children get
// PR_SET_PDEATHSIG, so workers do not outlive a launch that is itself killed.
// Logs (logging.h): launch's own lines say "launch"; --log-dir gives launch.log,
// coordinator.log and every rank's rank-<r>.log there (handed on as DTRAIN_LOG_*), and
// the failure line quotes the failed rank's last error line from its file.
// Linux only. Several nodes (--nnodes, --node-rank): one launch per node, each
// restarting its own workers; node 0 starts the coordinator (see launch_nodes.h).
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "dtrain/common/error.h"
#include "launch_supervisor.h"
#include "logging.h"

namespace dtrain::cli {

namespace {

// --bind-to's text to BindTo; a bad value is a usage error naming it (exit code 2).
const CLI::Validator kBindTo(
    [](std::string& v) -> std::string {
      try {
        v = std::to_string(static_cast<int>(parse_bind_to(v)));
        return "";
      } catch (const InvalidArgument&) {
        return "must be none, core or auto, got '" + v + "'";
      }
    },
    "auto|none|core");

// Resolves the log options (for launch and, through the environment, its children) and
// opens launch.log in --log-dir when one is given.
void start_launch_log(LogOptions& o) {
  o = resolve_log_options(o, process_env_reader());
  LogContext context;
  context.role = LogRole::kLaunch;
  configure_process_log(o, context);
  if (!o.dir.empty() && o.dir != "none") open_log_file(o, o.dir);
}

}  // namespace

Command add_launch_command(CLI::App& app) {
  auto o = std::make_shared<LaunchOptions>();
  CLI::App* l = app.add_subcommand(
      "launch",
      "Start N local workers (and a coordinator) running a command: launch --nproc N -- cmd ...");
  // One of --nproc and --max-workers is required (a usage error otherwise).
  CLI::Option_group* size = l->add_option_group("size", "How many workers (one is required)");
  CLI::Option* nproc = size->add_option("--nproc,--nproc-per-node", o->nproc,
                                        "Number of worker processes on this node")
                           ->check(kPositive);
  CLI::Option* max_workers =
      size->add_option("--max-workers", o->max_workers,
                       "Elastic: the most workers the job runs with; launch starts this many "
                       "(the same as --nproc, which it may replace)")
          ->check(kPositive);
  size->require_option(1, 2);
  l->add_option("--coordinator", o->coordinator,
                "HOST:PORT of a running coordinator (default: start one on loopback); with "
                "--nnodes > 1, where node 0 starts it");
  l->add_option("--nnodes", o->nnodes, "Nodes in the job, one launch on each")
      ->capture_default_str()
      ->check(kPositive);
  l->add_option("--node-rank", o->node_rank, "This node's index, 0..nnodes-1")
      ->capture_default_str();
  l->add_flag("--external-coordinator", o->external_coordinator,
              "Multi-node: the coordinator runs already; node 0 does not start one");
  l->add_option("--bind", o->bind,
                "Address the workers listen on (and node 0's coordinator, if it starts one); "
                "multi-node default: this node's address towards the coordinator");
  l->add_option("--connect-timeout", o->connect_timeout,
                "Multi-node: seconds to wait for the coordinator to answer")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  l->add_option("--tls-cert", o->tls_cert, "PEM certificate of the coordinator launch starts");
  l->add_option("--tls-key", o->tls_key, "PEM private key of the coordinator launch starts");
  l->add_option("--tls-ca", o->tls_ca,
                "PEM CA the coordinator's certificate must chain to (also given to the workers "
                "as DTRAIN_TLS_CA)");
  l->add_option("--job-id", o->job_id, "Job id the workers join with")->capture_default_str();
  l->add_option("--token", o->token,
                "Job token every coordinator call carries (default: $DTRAIN_JOB_TOKEN, or a "
                "fresh random token for the coordinator launch starts)");
  l->add_option("--failure-wait", o->failure_wait,
                "Seconds the other workers get to exit by themselves after one fails")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  l->add_option("--grace-period", o->grace_period,
                "Seconds between SIGTERM and SIGKILL when stopping workers")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  l->add_option("--max-restarts", o->max_restarts,
                "Times a failed worker (or the coordinator) is started again before the job "
                "fails (0: never)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  l->add_option("--heartbeat-interval", o->heartbeat_interval,
                "Seconds between a worker's heartbeats")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  l->add_option("--heartbeat-timeout", o->heartbeat_timeout,
                "Seconds without a heartbeat after which a worker is lost (0: off)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  l->add_option("--state-dir", o->state_dir,
                "The coordinator's state folder (job.json); default: a private temporary "
                "folder removed at exit");
  l->add_option("--min-workers", o->min_workers,
                "Elastic: go on with at least this many workers when others cannot come back "
                "(0: off; --nproc / --max-workers is the maximum)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  l->add_option("--rejoin-timeout", o->rejoin_timeout,
                "Elastic: seconds the coordinator waits for every worker to re-join")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  l->add_option("--bind-to", o->bind_to,
                "Worker CPU binding: core (each worker its own whole cores, cores/N each), none "
                "(inherit launch's), auto (core for up to 2 workers and enough cores, else none, "
                "as mpirun)")
      ->transform(kBindTo)
      ->default_str("auto");
  l->add_option("command", o->command, "The worker command, after --")->required();
  add_log_options(l, o->log);
  return {l, [o, nproc, max_workers] {
            start_launch_log(o->log);
            if (*max_workers && !*nproc) o->nproc = o->max_workers;
            DTRAIN_CHECK(!*max_workers || o->max_workers == o->nproc, InvalidArgument,
                         "launch: --max-workers {} differs from --nproc {}: launch starts the "
                         "maximum, so give one of them (the job can shrink to --min-workers, "
                         "never grow past the workers it started with)",
                         o->max_workers, o->nproc);
            DTRAIN_CHECK(o->min_workers <= o->world_size(), InvalidArgument,
                         "launch: --min-workers {} is more than the {} workers launch starts",
                         o->min_workers, o->world_size());
            if (o->token.empty()) {
              if (const char* t = std::getenv("DTRAIN_JOB_TOKEN")) o->token = t;
            }
            validate(o->layout());
            Launcher launcher(*o);
            return launcher.run();
          }};
}

}  // namespace dtrain::cli
