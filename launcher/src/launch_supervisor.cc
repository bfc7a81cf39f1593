#include "launch_supervisor.h"

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

#include "dtrain/common/error.h"
#include "dtrain/coordinator/client.h"
#include "launch_nodes.h"
#include "logging.h"
#include "signal_checkpoint.h"

namespace dtrain::cli {

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
                           const std::vector<std::string>& env, const CpuList& cpus) {
  Pipe out = make_pipe();
  Pipe err = make_pipe();
  Child c;
  c.label = std::move(label);
  c.rank = rank;
  c.pid = spawn(argv, env, out.write.get(), err.write.get(), old_mask_, cpus);
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
  const auto local_rank = static_cast<size_t>(r - opt_.layout().first_rank());
  add_child(fmt::format("rank {}", r), r, worker_command(), env, binding_.cpus.at(local_rank));
}

void Launcher::plan_worker_binding() {
  binding_ = plan_binding(opt_.bind_to, opt_.nproc, read_cpu_topology());
  const std::string line = describe_binding(binding_, opt_.layout().first_rank(), opt_.bind_to);
  if (binding_.resolved == BindTo::kNone) {
    spdlog::debug("dtrain launch: {}", line);
  } else {
    spdlog::info("dtrain launch: {}", line);
  }
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
  plan_worker_binding();
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

}  // namespace dtrain::cli
