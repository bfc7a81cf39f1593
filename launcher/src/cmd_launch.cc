// `dtrain launch`: start N local workers (and, unless one is given, a coordinator)
// and supervise them.
//
//   dtrain launch --nproc N [--coordinator HOST:PORT] [--job-id ID] [--token T]
//                 [--grace-period S] [--max-restarts N] [--heartbeat-interval S]
//                 [--heartbeat-timeout S] [--state-dir DIR]
//                 [--min-workers M [--rejoin-timeout S]] [--max-workers N]
//                 [--log-level L] [--log-dir DIR] [--log-format text|json] -- <command ...>
//
// 1. Without --coordinator it spawns `<this binary> coordinator --port 0
//    --world-size N ...` and reads the address it binds from its stdout (the first
//    line carrying a HOST:PORT, see parse_coordinator_address).
// 2. It spawns N copies of <command> with DTRAIN_RANK, DTRAIN_WORLD_SIZE,
//    DTRAIN_LOCAL_RANK, DTRAIN_COORDINATOR, DTRAIN_JOB_ID and DTRAIN_JOB_TOKEN set
//    (see worker_env.h), each in its own process group, with stdout and stderr on
//    pipes. Every line they print is re-emitted on the same stream prefixed with
//    "[rank k] " (the coordinator's with "[coordinator] ").
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
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/coordinator/client.h"
#include "launch_nodes.h"
#include "logging.h"
#include "signal_checkpoint.h"

extern char** environ;

namespace dtrain::cli {

namespace {

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
  std::vector<std::string> command;
  LogOptions log;  // resolved; handed to the coordinator and the workers

  NodeLayout layout() const {
    return {nnodes, node_rank, nproc, external_coordinator, coordinator, bind};
  }
  int world_size() const { return nnodes * nproc; }
};

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

struct Pipe {
  Fd read;
  Fd write;
};

Pipe make_pipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    DTRAIN_THROW(IoError, "launch: pipe2 failed: {}", std::strerror(errno));
  }
  return {Fd(fds[0]), Fd(fds[1])};
}

const char* signal_abbrev(int sig) {
  const char* name = ::sigabbrev_np(sig);
  return name != nullptr ? name : "?";
}

// "exited with code 3", "was killed by signal 9 (SIGKILL)".
std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    return fmt::format("was killed by signal {} (SIG{})", sig, signal_abbrev(sig));
  }
  return fmt::format("ended with wait status {}", status);
}

// A random hex token, so that only this launch's workers can talk to its coordinator.
std::string random_token() {
  std::random_device rd;
  std::string s;
  for (int i = 0; i < 4; ++i) s += fmt::format("{:08x}", rd());
  return s;
}

std::string self_exe() {
  std::string buf(4096, '\0');
  ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) DTRAIN_THROW(IoError, "launch: cannot find its own binary (/proc/self/exe)");
  buf.resize(static_cast<size_t>(n));
  return buf;
}

// One child process in its own process group.
struct Child {
  std::string label;  // "rank 2", "coordinator"
  int rank = -1;      // -1 for the coordinator
  pid_t pid = -1;
  bool running = false;
  int status = 0;
};

// Forks and execs argv with env, stdout/stderr on out/err, in a new process group.
// Everything the child needs is prepared before fork().
pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env, int out,
            int err, const sigset_t& child_mask) {
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::vector<char*> cenv;
  for (const std::string& e : env) cenv.push_back(const_cast<char*>(e.c_str()));
  cenv.push_back(nullptr);
  const std::string exec_error = fmt::format("dtrain launch: cannot execute '{}': ", argv[0]);
  pid_t parent = ::getpid();

  pid_t pid = ::fork();
  if (pid < 0) DTRAIN_THROW(IoError, "launch: fork failed: {}", std::strerror(errno));
  if (pid == 0) {
    // Child: async-signal-safe calls only, then exec.
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    ::dup2(out, STDOUT_FILENO);
    ::dup2(err, STDERR_FILENO);
    // Launch forwards SIGINT/SIGTERM itself, so the workers must act on them even
    // when launch was started with them ignored (a background job of a shell).
    struct sigaction dfl = {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGINT, &dfl, nullptr);
    ::sigaction(SIGTERM, &dfl, nullptr);
    ::sigprocmask(SIG_SETMASK, &child_mask, nullptr);
    ::execvpe(cargv[0], cargv.data(), cenv.data());
    ssize_t ignored = ::write(STDERR_FILENO, exec_error.data(), exec_error.size());
    const char* why = ::strerrordesc_np(errno);
    if (why != nullptr) ignored = ::write(STDERR_FILENO, why, std::strlen(why));
    ignored = ::write(STDERR_FILENO, "\n", 1);
    (void)ignored;
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also here, so the group exists before we may signal it
  return pid;
}

// The environment of the current process without the variables in `drop`.
std::vector<std::string> inherited_env(const std::vector<std::string>& drop) {
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string kv = *e;
    std::string key = kv.substr(0, kv.find('='));
    if (std::find(drop.begin(), drop.end(), key) == drop.end()) out.push_back(std::move(kv));
  }
  return out;
}

// The HOST:PORT in a line the coordinator prints ("listening on 127.0.0.1:41234");
// the last such token wins, so a timestamp prefix cannot be mistaken for it.
std::optional<std::string> parse_coordinator_address(const std::string& line) {
  static const std::regex kAddr(
      R"((\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]*):([0-9]{1,5})\b)");
  std::optional<std::string> found;
  for (auto it = std::sregex_iterator(line.begin(), line.end(), kAddr);
       it != std::sregex_iterator(); ++it) {
    int port = std::stoi((*it)[2].str());
    if (port >= 1 && port <= 65535) found = (*it)[0].str();
  }
  return found;
}

// Re-emits a pipe's output line by line with a prefix.
struct Stream {
  Fd fd;
  FILE* sink = stdout;
  std::string prefix;
  std::string partial;
  size_t child = 0;            // index into Launcher::children_
  bool watch_address = false;  // the coordinator's stdout, until the address is seen
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
                   const std::vector<std::string>& env);
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

void Launcher::block_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGCHLD, SIGINT, SIGTERM, SIGUSR1}) sigaddset(&set, s);
  // SIGHUP only when not ignored (nohup): then the workers keep ignoring it too.
  struct sigaction hup = {};
  if (::sigaction(SIGHUP, nullptr, &hup) == 0 && hup.sa_handler != SIG_IGN) {
    sigaddset(&set, SIGHUP);
  }
  if (::sigprocmask(SIG_BLOCK, &set, &old_mask_) != 0) {
    DTRAIN_THROW(IoError, "launch: sigprocmask failed: {}", std::strerror(errno));
  }
  mask_set_ = true;
  sigfd_ = Fd(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (sigfd_.get() < 0) DTRAIN_THROW(IoError, "launch: signalfd failed: {}", std::strerror(errno));
}

size_t Launcher::add_child(std::string label, int rank, const std::vector<std::string>& argv,
                           const std::vector<std::string>& env) {
  Pipe out = make_pipe();
  Pipe err = make_pipe();
  Child c;
  c.label = std::move(label);
  c.rank = rank;
  c.pid = spawn(argv, env, out.write.get(), err.write.get(), old_mask_);
  c.running = true;
  children_.push_back(c);
  size_t index = children_.size() - 1;
  std::string prefix = "[" + children_[index].label + "] ";
  streams_.push_back(Stream{std::move(out.read), stdout, prefix, "", index, false});
  streams_.push_back(Stream{std::move(err.read), stderr, prefix, "", index, false});
  return index;
}

std::vector<std::string> Launcher::coordinator_argv(int port) const {
  return {self_exe(),
          "coordinator",
          "--port",
          std::to_string(port),
          "--world-size",
          std::to_string(opt_.world_size()),
          "--job-id",
          opt_.job_id,
          "--max-restarts",
          std::to_string(opt_.max_restarts),
          "--heartbeat-interval",
          fmt::format("{}", opt_.heartbeat_interval),
          "--heartbeat-timeout",
          fmt::format("{}", opt_.heartbeat_timeout),
          "--state-dir",
          opt_.state_dir,
          "--min-workers",
          std::to_string(opt_.min_workers),
          "--rejoin-timeout",
          fmt::format("{}", opt_.rejoin_timeout),
          "--bind",
          coordinator_bind_,
          "--tls-cert",
          opt_.tls_cert,
          "--tls-key",
          opt_.tls_key};
}

// The token travels in the environment, not on a command line `ps` shows; so do the
// log settings.
std::vector<std::string> Launcher::coordinator_env() const {
  std::vector<std::string> env = inherited_env(
      {"DTRAIN_JOB_TOKEN", "DTRAIN_LOG_LEVEL", "DTRAIN_LOG_DIR", "DTRAIN_LOG_FORMAT"});
  if (!opt_.token.empty()) env.push_back("DTRAIN_JOB_TOKEN=" + opt_.token);
  for (std::string& kv : log_env(opt_.log)) env.push_back(std::move(kv));
  return env;
}

// "; its last error (in DIR/rank-1.log): ..." for the rank that failed: from its log
// file when launch knows the folder, else from what it printed on stderr.
std::string Launcher::last_error_note() const {
  if (failed_rank_ < 0) return "";
  std::vector<std::string> errors;
  std::string where;
  if (!opt_.log.dir.empty() && opt_.log.dir != "none") {
    LogContext c;
    c.role = LogRole::kRank;
    c.rank = failed_rank_;
    where = (std::filesystem::path(opt_.log.dir) / log_file_name(c)).string();
    errors = last_error_messages(where, 2);
  }
  if (errors.empty()) {
    auto it = stderr_errors_.find(failed_rank_);
    if (it == stderr_errors_.end()) return "";
    errors = it->second;
    where = "stderr";
  }
  return fmt::format("; its last error (in {}): {}", where, fmt::join(errors, " | "));
}

void Launcher::start_coordinator(int port) {
  if (opt_.state_dir.empty()) {
    std::string tmpl = (std::filesystem::temp_directory_path() / "dtrain-launch-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) {
      DTRAIN_THROW(IoError, "launch: cannot create a state folder {}: {}", tmpl,
                   std::strerror(errno));
    }
    private_state_dir_ = opt_.state_dir = tmpl;
  }
  std::vector<std::string> argv = coordinator_argv(port);
  // The token travels in the environment, not on a command line `ps` shows.
  std::vector<std::string> env = coordinator_env();
  coordinator_ = add_child("coordinator", -1, argv, env);
  streams_[streams_.size() - 2].watch_address = true;

  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (coordinator_address_.empty()) {
    if (!children_[*coordinator_].running || failure_ || interrupted_by_ != 0) break;
    if (Clock::now() >= deadline) {
      failure_ = "the coordinator printed no address within 30 s";
      break;
    }
    poll_once(std::chrono::milliseconds(100));
  }
  if (coordinator_address_.empty() && !failure_ && interrupted_by_ == 0) {
    // Show what it said (its error) before reporting.
    const auto drain_until = Clock::now() + std::chrono::seconds(1);
    while (Clock::now() < drain_until &&
           std::any_of(streams_.begin(), streams_.end(),
                       [](const Stream& s) { return s.fd.get() >= 0; })) {
      poll_once(std::chrono::milliseconds(50));
    }
    failure_ = fmt::format("the coordinator {} before printing its address",
                           describe_status(children_[*coordinator_].status));
  }
}

// `dtrain launch --nproc 2 -- dtrain train` runs this very binary for "dtrain", so the
// workers match the launcher whether or not a dtrain is on PATH.
std::vector<std::string> Launcher::worker_command() const {
  std::vector<std::string> cmd = opt_.command;
  if (!cmd.empty() && cmd[0] == "dtrain") cmd[0] = self_exe();
  return cmd;
}

void Launcher::start_workers() {
  const int first = opt_.layout().first_rank();
  for (int r = first; r < first + opt_.nproc; ++r) start_worker(r, 0);
  spdlog::info("dtrain launch: started ranks {}..{} of {} (job '{}', coordinator {})", first,
               first + opt_.nproc - 1, opt_.world_size(), opt_.job_id, coordinator_address_);
}

void Launcher::start_worker(int r, int restart) {
  std::vector<std::string> env =
      inherited_env({"DTRAIN_RANK", "DTRAIN_WORLD_SIZE", "DTRAIN_LOCAL_RANK", "DTRAIN_COORDINATOR",
                     "DTRAIN_JOB_ID", "DTRAIN_JOB_TOKEN", "DTRAIN_RESTART_COUNT",
                     "DTRAIN_LOG_LEVEL", "DTRAIN_LOG_DIR", "DTRAIN_LOG_FORMAT"});
  for (std::string& kv : log_env(opt_.log)) env.push_back(std::move(kv));
  env.push_back(fmt::format("DTRAIN_RANK={}", r));
  env.push_back(fmt::format("DTRAIN_WORLD_SIZE={}", opt_.world_size()));
  env.push_back(fmt::format("DTRAIN_LOCAL_RANK={}", r - opt_.layout().first_rank()));
  if (!opt_.bind.empty()) {
    env.push_back("DTRAIN_TCP_BIND=" + opt_.bind);
    env.push_back("DTRAIN_TCP_ADVERTISE=" + opt_.bind);
  }
  if (!opt_.tls_ca.empty()) env.push_back("DTRAIN_TLS_CA=" + opt_.tls_ca);
  env.push_back("DTRAIN_COORDINATOR=" + coordinator_address_);
  env.push_back("DTRAIN_JOB_ID=" + opt_.job_id);
  if (!opt_.token.empty()) env.push_back("DTRAIN_JOB_TOKEN=" + opt_.token);
  if (restart > 0) env.push_back(fmt::format("DTRAIN_RESTART_COUNT={}", restart));
  add_child(fmt::format("rank {}", r), r, worker_command(), env);
}

coordinator::CoordinatorClient* Launcher::client() {
  if (coordinator_address_.empty()) return nullptr;
  try {
    if (!client_) {
      client_.emplace(
          coordinator::CoordinatorClient::connect(client_options(std::chrono::milliseconds(1000))));
    }
  } catch (const Error&) {
    return nullptr;  // not reachable now (restarting, or not a dtrain coordinator)
  }
  return &*client_;
}

coordinator::ClientOptions Launcher::client_options(std::chrono::milliseconds connect) const {
  coordinator::ClientOptions co;
  co.address = coordinator_address_;
  co.job_id = opt_.job_id;
  co.token = opt_.token;
  co.connect_timeout = connect;
  co.call_timeout = std::chrono::milliseconds(3000);
  co.tls_from_env();
  if (!opt_.tls_ca.empty()) co.tls_ca_file = opt_.tls_ca;
  return co;
}

// A node joining a multi-node job: is the coordinator there, and is it our job?
void Launcher::check_coordinator() {
  const auto wait = std::chrono::milliseconds(static_cast<int64_t>(opt_.connect_timeout * 1000));
  try {
    check_coordinator_job(client_options(wait), opt_.world_size(),
                          opt_.min_workers > 0 && opt_.min_workers < opt_.world_size());
  } catch (const Error& e) {
    failure_ = fmt::format("node {} of {}: {}", opt_.node_rank, opt_.nnodes, e.what());
  }
}

std::optional<std::string> Launcher::coordinator_failure() {
  try {
    if (coordinator::CoordinatorClient* c = client()) {
      coordinator::JobStatus st = c->status();
      if (st.state == coordinator::JobState::kFailed) return st.reason;
    }
  } catch (const Error&) {
    // Not reachable: launch's own count decides.
  }
  return std::nullopt;
}

void Launcher::kill_lost_workers() {
  coordinator::JobStatus st;
  try {
    coordinator::CoordinatorClient* c = client();
    if (c == nullptr) return;
    st = c->status();
  } catch (const Error&) {
    return;
  }
  if (st.generation <= seen_generation_) return;
  seen_generation_ = st.generation;
  if (st.failed_pid == 0) return;
  for (const Child& c : children_) {
    if (c.rank < 0 || !c.running || c.pid != st.failed_pid) continue;
    spdlog::warn("dtrain launch: the coordinator declared {} (pid {}) lost ({}); killing it",
                 c.label, c.pid, st.reason);
    std::fflush(stderr);
    signal_group(c, SIGKILL);  // reaped and restarted like any dead worker
  }
}

void Launcher::run_restarts() {
  if (restart_coordinator_) {
    restart_coordinator_ = false;
    size_t colon = coordinator_address_.rfind(':');
    int port = std::stoi(coordinator_address_.substr(colon + 1));
    coordinator_ = add_child("coordinator", -1, coordinator_argv(port), coordinator_env());
    client_.reset();
  }
  std::vector<int> ranks = std::move(restart_ranks_);
  restart_ranks_.clear();
  for (int r : ranks) {
    if (stopping_ || failure_) break;
    start_worker(r, worker_restarts_);
  }
}

void Launcher::emit_line(Stream& s, const std::string& line) {
  if (s.watch_address) {
    if (std::optional<std::string> addr = parse_coordinator_address(line)) {
      coordinator_address_ = *addr;
      s.watch_address = false;
    }
  }
  const int rank = children_[s.child].rank;
  if (rank >= 0 && s.sink == stderr) {
    if (std::optional<std::string> msg = error_message(line)) {
      std::vector<std::string>& errors = stderr_errors_[rank];
      errors.push_back(std::move(*msg));
      if (errors.size() > 2) errors.erase(errors.begin());
    }
  }
  std::string out = s.prefix + line + "\n";
  std::fwrite(out.data(), 1, out.size(), s.sink);
  std::fflush(s.sink);
}

void Launcher::flush_partial(Stream& s) {
  if (!s.partial.empty()) emit_line(s, s.partial);
  s.partial.clear();
}

void Launcher::read_stream(Stream& s) {
  char buf[65536];
  ssize_t n = ::read(s.fd.get(), buf, sizeof buf);
  if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
  if (n <= 0) {  // EOF (or an error: treat as closed)
    flush_partial(s);
    s.fd.reset();
    return;
  }
  s.partial.append(buf, static_cast<size_t>(n));
  size_t start = 0;
  for (size_t nl; (nl = s.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
    emit_line(s, s.partial.substr(start, nl - start));
  }
  s.partial.erase(0, start);
  if (s.partial.size() > 65536) flush_partial(s);  // a very long line: emit in pieces
}

void Launcher::signal_group(const Child& c, int sig) {
  if (c.running) ::kill(-c.pid, sig);
}

void Launcher::stop_workers(int sig) {
  stopping_ = true;
  for (const Child& c : children_) {
    if (c.rank >= 0) signal_group(c, sig);
  }
  if (sig != SIGKILL && !kill_at_) {
    kill_at_ =
        Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(opt_.grace_period * 1000));
  }
}

void Launcher::on_exit(Child& c) {
  c.running = false;
  bool ok = WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0;
  if (c.rank < 0) {  // the coordinator
    if (!stopping_ && !failure_ && workers_running() &&
        coordinator_restarts_ < std::max(1, opt_.max_restarts)) {
      ++coordinator_restarts_;
      spdlog::warn("dtrain launch: the coordinator {}; starting it again on {} (restart {})",
                   describe_status(c.status), coordinator_address_, coordinator_restarts_);
      std::fflush(stderr);
      restart_coordinator_ = true;
      return;
    }
    if (!stopping_ && !failure_ && workers_running()) {
      failure_ = fmt::format("the coordinator {}", describe_status(c.status));
      spdlog::error("dtrain launch: {}; stopping the workers", *failure_);
      stop_workers(SIGTERM);
    }
    return;
  }
  if (WIFEXITED(c.status) && WEXITSTATUS(c.status) == kExitStoppedBySignal) {
    stopped_at_checkpoint_ = true;  // it committed a final checkpoint: not a failure
    return;
  }
  if (ok || stopping_ || failure_) return;
  std::optional<std::string> job_failed = coordinator_failure();
  if (!job_failed && worker_restarts_ < opt_.max_restarts) {
    ++worker_restarts_;
    spdlog::warn("dtrain launch: {} {}; starting it again (restart {} of {})", c.label,
                 describe_status(c.status), worker_restarts_, opt_.max_restarts);
    std::fflush(stderr);
    restart_ranks_.push_back(c.rank);
    return;
  }
  const bool elastic = opt_.min_workers > 0 && opt_.min_workers < opt_.world_size();
  int left = 0;
  for (const Child& w : children_) left += (w.rank >= 0 && w.running) ? 1 : 0;
  if (!job_failed && elastic && left >= opt_.min_workers) {
    spdlog::warn(
        "dtrain launch: {} {}; restarts exhausted: not started again, the job goes on "
        "with {} worker(s) (elastic, --min-workers {})",
        c.label, describe_status(c.status), left, opt_.min_workers);
    std::fflush(stderr);
    return;
  }
  failure_ = fmt::format("{} {}", c.label, describe_status(c.status));
  failed_rank_ = c.rank;
  if (opt_.max_restarts > 0 && worker_restarts_ >= opt_.max_restarts) {
    *failure_ +=
        fmt::format("; restarts exhausted ({} of {})", worker_restarts_, opt_.max_restarts);
  }
  if (job_failed) *failure_ += fmt::format("; the job FAILED: {}", *job_failed);
  spdlog::error("dtrain launch: {}; stopping the other workers", *failure_);
  std::fflush(stderr);
  term_at_ =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(opt_.failure_wait * 1000));
}

void Launcher::reap() {
  for (;;) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (Child& c : children_) {
      if (c.pid == pid && c.running) {
        c.status = status;
        on_exit(c);
      }
    }
  }
}

void Launcher::handle_signals() {
  signalfd_siginfo info;
  while (::read(sigfd_.get(), &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
    int sig = static_cast<int>(info.ssi_signo);
    if (sig == SIGCHLD) continue;  // reap() runs after every poll round
    if (sig == SIGUSR1) {          // not a stop: the workers checkpoint and exit 75
      spdlog::info("dtrain launch: got SIGUSR1, forwarding it to the workers");
      for (const Child& c : children_) {
        if (c.rank >= 0) signal_group(c, sig);
      }
      continue;
    }
    if (interrupted_by_ != 0 || stopping_) {
      spdlog::warn("dtrain launch: got SIG{} again, killing the workers", signal_abbrev(sig));
      if (interrupted_by_ == 0) interrupted_by_ = sig;
      stop_workers(SIGKILL);
      continue;
    }
    interrupted_by_ = sig;
    spdlog::warn("dtrain launch: got SIG{}, forwarding it to the workers", signal_abbrev(sig));
    stop_workers(sig);
  }
}

void Launcher::poll_once(std::chrono::milliseconds max_wait) {
  for (const auto& at : {kill_at_, term_at_}) {
    if (!at) continue;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*at - Clock::now());
    max_wait = std::clamp(left, std::chrono::milliseconds(0), max_wait);
  }
  std::vector<pollfd> fds;
  std::vector<Stream*> owners;
  fds.push_back({sigfd_.get(), POLLIN, 0});
  owners.push_back(nullptr);
  for (Stream& s : streams_) {
    if (s.fd.get() < 0) continue;
    fds.push_back({s.fd.get(), POLLIN, 0});
    owners.push_back(&s);
  }
  int n = ::poll(fds.data(), fds.size(), static_cast<int>(max_wait.count()));
  if (n < 0 && errno != EINTR) {
    DTRAIN_THROW(IoError, "launch: poll failed: {}", std::strerror(errno));
  }
  for (size_t i = 0; n > 0 && i < fds.size(); ++i) {
    if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
    if (owners[i] == nullptr) {
      handle_signals();
    } else {
      read_stream(*owners[i]);
    }
  }
  reap();
  run_restarts();
  if (!stopping_ && !failure_ && Clock::now() >= next_status_ && workers_running()) {
    kill_lost_workers();
    // Not reachable: ask again much later (a connection attempt blocks this loop).
    next_status_ = Clock::now() + std::chrono::seconds(client_ ? 1 : 10);
  }
  if (term_at_ && Clock::now() >= *term_at_) {
    term_at_.reset();
    if (workers_running()) stop_workers(SIGTERM);
  }
  if (kill_at_ && Clock::now() >= *kill_at_) {
    kill_at_.reset();
    stop_workers(SIGKILL);
  }
}

bool Launcher::workers_running() const {
  return std::any_of(children_.begin(), children_.end(),
                     [](const Child& c) { return c.rank >= 0 && c.running; });
}

bool Launcher::worker_streams_open() const {
  return std::any_of(streams_.begin(), streams_.end(), [&](const Stream& s) {
    return s.fd.get() >= 0 && children_[s.child].rank >= 0;
  });
}

void Launcher::stop_coordinator() {
  if (!coordinator_) return;
  Child& c = children_[*coordinator_];
  signal_group(c, SIGTERM);
  const auto deadline =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(opt_.grace_period * 1000));
  while (c.running && Clock::now() < deadline) poll_once(std::chrono::milliseconds(50));
  signal_group(c, SIGKILL);
  while (c.running) poll_once(std::chrono::milliseconds(50));
}

void Launcher::cleanup() {
  // Only reached with children still running when run() threw: kill and reap them.
  for (Child& c : children_) {
    if (!c.running) continue;
    ::kill(-c.pid, SIGKILL);
    ::waitpid(c.pid, &c.status, 0);
    c.running = false;
  }
  if (mask_set_) ::sigprocmask(SIG_SETMASK, &old_mask_, nullptr);
  mask_set_ = false;
  if (!private_state_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(private_state_dir_, ec);  // best effort
    private_state_dir_.clear();
  }
}

int Launcher::run() {
  block_signals();
  const NodeLayout nodes = opt_.layout();
  if (nodes.multi_node() && opt_.bind.empty()) opt_.bind = local_address_towards(opt_.coordinator);
  if (opt_.coordinator.empty()) {
    if (opt_.token.empty()) opt_.token = random_token();
    start_coordinator(0);
  } else if (nodes.hosts_coordinator()) {
    auto [host, port] = split_host_port(opt_.coordinator);
    coordinator_bind_ = host;
    start_coordinator(port);
  } else {
    coordinator_address_ = opt_.coordinator;
  }
  if (nodes.multi_node() && !failure_ && interrupted_by_ == 0) check_coordinator();
  if (!failure_ && interrupted_by_ == 0) start_workers();

  // Supervise until every worker has exited and its output is drained. Output still
  // open a second after the last exit belongs to a leftover grandchild: kill it.
  std::optional<Clock::time_point> drain_until;
  while (workers_running() || worker_streams_open()) {
    if (!workers_running()) {
      if (!drain_until) drain_until = Clock::now() + std::chrono::seconds(1);
      if (Clock::now() >= *drain_until) break;
    }
    poll_once(std::chrono::milliseconds(200));
  }
  for (Stream& s : streams_) {
    if (s.fd.get() >= 0 && children_[s.child].rank >= 0) {
      flush_partial(s);
      s.fd.reset();
      // A process the worker left behind still holds the pipe: end its group (the
      // group, and so its id, lives on while any member does).
      ::kill(-children_[s.child].pid, SIGKILL);
    }
  }
  client_.reset();  // an open channel would hold the coordinator's shutdown up
  stop_coordinator();
  cleanup();

  if (failure_) {
    spdlog::error("dtrain launch: failed: {}{}", *failure_, last_error_note());
    return 1;
  }
  if (stopped_at_checkpoint_) return kExitStoppedBySignal;
  if (interrupted_by_ != 0) return 128 + interrupted_by_;
  return 0;
}

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
