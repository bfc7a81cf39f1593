#include "signal_checkpoint.h"

#include <sys/signalfd.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "dtrain/common/error.h"
#include "dtrain/engine/threading.h"
#include "host_values.h"

namespace dtrain::cli {

namespace {

struct NamedSignal {
  const char* name;
  int number;
};

// The signals a job may be asked to stop with (SIGKILL and SIGSTOP cannot be caught).
constexpr NamedSignal kStopSignals[] = {{"USR1", SIGUSR1}, {"USR2", SIGUSR2}, {"TERM", SIGTERM},
                                        {"INT", SIGINT},   {"HUP", SIGHUP},   {"QUIT", SIGQUIT}};

int parse_one_signal(std::string name) {
  if (name.rfind("SIG", 0) == 0) name = name.substr(3);
  for (const NamedSignal& s : kStopSignals) {
    if (name == s.name) return s.number;
  }
  DTRAIN_THROW(InvalidArgument,
               "--checkpoint-signals: unknown signal '{}' (expected a list of USR1, USR2, "
               "TERM, INT, HUP, QUIT, or none)",
               name);
}

// The SigBlk mask of one thread, from /proc/self/task/<tid>/status (all bits when
// unreadable: the thread has exited meanwhile).
unsigned long long blocked_mask(const std::filesystem::path& task) {
  std::ifstream in(task / "status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("SigBlk:", 0) == 0) return std::strtoull(line.c_str() + 7, nullptr, 16);
  }
  return ~0ULL;  // gone: it takes no signal any more
}

std::string thread_name(const std::filesystem::path& task) {
  std::ifstream in(task / "comm");
  std::string name;
  std::getline(in, name);
  return name;
}

// Every thread of the process blocks every signal of `signals`, else InternalError.
void check_all_threads_block(const std::vector<int>& signals) {
  unsigned long long want = 0;
  for (int s : signals) want |= 1ULL << (s - 1);
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    if ((blocked_mask(task.path()) & want) == want) continue;
    DTRAIN_THROW(InternalError,
                 "thread {} ({}) was started before the checkpoint signals were blocked: a "
                 "signal it took would kill the worker instead of checkpointing "
                 "(--checkpoint-signals none turns the final checkpoint off)",
                 task.path().filename().string(), thread_name(task.path()));
  }
}

}  // namespace

std::vector<int> parse_signal_list(const std::string& list) {
  std::vector<int> out;
  if (list == "none" || list.empty()) return out;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(parse_one_signal(item));
  return out;
}

std::string signal_name(int sig) {
  for (const NamedSignal& s : kStopSignals) {
    if (s.number == sig) return fmt::format("SIG{}", s.name);
  }
  return fmt::format("signal {}", sig);
}

StopSignals::StopSignals(const std::vector<int>& signals) {
  DTRAIN_CHECK(!signals.empty(), InvalidArgument, "StopSignals: no signals given");
  sigemptyset(&set_);
  for (int s : signals) sigaddset(&set_, s);
  const int rc = ::pthread_sigmask(SIG_BLOCK, &set_, &old_mask_);
  DTRAIN_CHECK(rc == 0, IoError, "pthread_sigmask failed: {}", std::strerror(rc));
  restart_blas_threads();  // its pool predates main: start it again with the mask
  fd_ = ::signalfd(-1, &set_, SFD_CLOEXEC | SFD_NONBLOCK);
  if (fd_ < 0) {
    const int err = errno;
    ::pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
    DTRAIN_THROW(IoError, "signalfd failed: {}", std::strerror(err));
  }
  check_all_threads_block(signals);
}

StopSignals::~StopSignals() {
  while (poll()) {
  }
  ::close(fd_);
  ::pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
}

std::optional<int> StopSignals::poll() {
  signalfd_siginfo info;
  if (::read(fd_, &info, sizeof info) != static_cast<ssize_t>(sizeof info)) return std::nullopt;
  return static_cast<int>(info.ssi_signo);
}

bool SignalStop::stop_requested(const StepEnd& end) {
  if (comm_.rank() == test_rank_ && end.step == test_step_) ::kill(::getpid(), SIGUSR1);
  std::optional<int> seen = signals_.poll();
  if (seen) {
    spdlog::info("dtrain train: rank {} got {} at step {}", comm_.rank(), signal_name(*seen),
                 end.step);
  }
  int32_t agreed = seen.value_or(0);
  if (comm_.size() > 1) {
    on_host_values(device_, &agreed, 1, DType::i32,
                   [&](void* p) { comm_.allreduce(p, 1, DType::i32, comm::ReduceOp::kMax); });
  }
  if (agreed == 0) return false;
  signal_ = agreed;
  return true;
}

std::pair<int, int64_t> read_test_signal_seam() {
  const char* at = std::getenv("DTRAIN_TEST_SIGNAL_AT");
  if (at == nullptr) return {-1, -1};
  int rank = -1;
  long long step = -1;
  DTRAIN_CHECK(std::sscanf(at, "%d:%lld", &rank, &step) == 2 && step >= 1, InvalidArgument,
               "DTRAIN_TEST_SIGNAL_AT={}: expected rank:step (step >= 1)", at);
  return {rank, step};
}

}  // namespace dtrain::cli
