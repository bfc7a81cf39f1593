// The supervisor of `dtrain launch` (what cmd_launch.cc's header describes): starts
// the coordinator and the workers, re-emits their output with a prefix, restarts
// failed workers, forwards signals and stops everything on failure. One thread; one
// poll() loop over the output pipes and a signalfd.
#pragma once

#include <signal.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/coordinator/client.h"
#include "launch_binding.h"
#include "launch_nodes.h"
#include "launch_process.h"
#include "logging.h"

namespace dtrain::cli {

using Clock = std::chrono::steady_clock;

struct LaunchOptions {
  int nproc = 1;  // workers on this node
  int nnodes = 1;
  int node_rank = 0;
  bool external_coordinator = false;
  std::string bind;  // workers' tcp address (and node 0's coordinator's); see launch_nodes.h
  std::string tls_cert, tls_key, tls_ca;
  double connect_timeout = 60.0;  // seconds a node waits for the coordinator to answer
  std::string coordinator;        // empty: start one
  std::string job_id = "default";
  std::string token;
  double grace_period = 5.0;  // seconds between SIGTERM and SIGKILL
  double failure_wait = 3.0;  // seconds the survivors get to report a failure themselves
  int max_restarts = 3;       // worker restarts (and coordinator restarts) before failing
  double heartbeat_interval = 1.0;
  double heartbeat_timeout = 30.0;
  std::string state_dir;  // the coordinator's; empty: a private temporary folder
  int min_workers = 0;    // elastic when 0 < min_workers < nproc
  int max_workers = 0;    // --max-workers: the same as nproc when given
  double rejoin_timeout = 10.0;
  BindTo bind_to = BindTo::kAuto;  // --bind-to (launch_binding.h)
  std::vector<std::string> command;
  LogOptions log;  // resolved; handed to the coordinator and the workers

  NodeLayout layout() const {
    return {nnodes, node_rank, nproc, external_coordinator, coordinator, bind};
  }
  int world_size() const { return nnodes * nproc; }
};

class Launcher {
 public:
  explicit Launcher(LaunchOptions o) : opt_(std::move(o)) {}
  ~Launcher() { cleanup(); }
  Launcher(const Launcher&) = delete;
  Launcher& operator=(const Launcher&) = delete;

  int run();

 private:
  void block_signals();
  void start_coordinator(int port);
  void check_coordinator();
  coordinator::ClientOptions client_options(std::chrono::milliseconds connect_timeout) const;
  std::vector<std::string> coordinator_argv(int port) const;
  std::vector<std::string> coordinator_env() const;
  std::string last_error_note() const;
  void start_workers();
  void start_worker(int rank, int restart);
  // Restarts queued by on_exit (children_ cannot grow while reap() walks it).
  void run_restarts();
  // The coordinator's reason when it says the job FAILED; nullopt otherwise or
  // when it cannot be asked.
  std::optional<std::string> coordinator_failure();
  // Kills a local worker the coordinator declared lost while it still runs.
  void kill_lost_workers();
  coordinator::CoordinatorClient* client();  // nullptr when the coordinator cannot be reached
  std::vector<std::string> worker_command() const;
  size_t add_child(std::string label, int rank, const std::vector<std::string>& argv,
                   const std::vector<std::string>& env, const CpuList& cpus = {});
  // --bind-to resolved against this node's cores (before anything starts), and logged.
  void plan_worker_binding();
  // One poll round (at most `max_wait`): output, signals, exits, kill deadlines.
  void poll_once(std::chrono::milliseconds max_wait);
  void read_stream(Stream& s);
  void emit_line(Stream& s, const std::string& line);
  void flush_partial(Stream& s);
  void handle_signals();
  void reap();
  void on_exit(Child& c);
  void stop_workers(int sig);
  void signal_group(const Child& c, int sig);
  bool workers_running() const;
  bool worker_streams_open() const;
  void stop_coordinator();
  void cleanup();

  LaunchOptions opt_;
  BindingPlan binding_;  // the CPUs of each local rank, restarts included
  sigset_t old_mask_{};
  bool mask_set_ = false;
  Fd sigfd_;
  std::vector<Child> children_;  // the coordinator (when started) first
  std::vector<Stream> streams_;
  std::optional<size_t> coordinator_;
  std::string coordinator_address_;
  std::optional<std::string> failure_;  // the first failure, as printed
  int interrupted_by_ = 0;
  bool stopped_at_checkpoint_ = false;  // a worker exited kExitStoppedBySignal
  bool stopping_ = false;
  std::optional<Clock::time_point> kill_at_;
  // After a worker fails, the others get until term_at_ to notice (their collectives
  // fail naming the lost rank) and exit by themselves before launch sends SIGTERM.
  std::optional<Clock::time_point> term_at_;
  int worker_restarts_ = 0;
  int coordinator_restarts_ = 0;
  std::vector<int> restart_ranks_;  // ranks to start again after this poll round
  bool restart_coordinator_ = false;
  std::string private_state_dir_;               // created by launch, removed at exit
  std::string coordinator_bind_ = "127.0.0.1";  // where a coordinator launch starts listens
  std::optional<coordinator::CoordinatorClient> client_;
  Clock::time_point next_status_ = Clock::now();
  uint64_t seen_generation_ = 1;
  int failed_rank_ = -1;  // the worker whose exit failed the job
  // The last error lines each rank printed on stderr (for the failure message).
  std::map<int, std::vector<std::string>> stderr_errors_;
};

}  // namespace dtrain::cli
