// The process plumbing of `dtrain launch` (cmd_launch.cc, launch_supervisor.h): owned
// file descriptors and pipes, fork+exec of a child in its own process group, exit
// status in words, the inherited environment, and the coordinator's address in its
// first output line. Linux only; no global state (environ is read, never written).
#pragma once

#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dtrain::cli {

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

Pipe make_pipe();

const char* signal_abbrev(int sig);

// "exited with code 3", "was killed by signal 9 (SIGKILL)".
std::string describe_status(int status);

// A random hex token, so that only this launch's workers can talk to its coordinator.
std::string random_token();

std::string self_exe();

// One child process in its own process group.
struct Child {
  std::string label;  // "rank 2", "coordinator"
  int rank = -1;      // -1 for the coordinator
  pid_t pid = -1;
  bool running = false;
  int status = 0;
};

// Forks and execs argv with env, stdout/stderr on out/err, in a new process group,
// bound to `cpus` (sched_setaffinity before exec) unless it is empty. Everything the
// child needs is prepared before fork().
pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env, int out,
            int err, const sigset_t& child_mask, const std::vector<int>& cpus = {});

// The environment of the current process without the variables in `drop`.
std::vector<std::string> inherited_env(const std::vector<std::string>& drop);

// The HOST:PORT in a line the coordinator prints ("listening on 127.0.0.1:41234");
// the last such token wins, so a timestamp prefix cannot be mistaken for it.
std::optional<std::string> parse_coordinator_address(const std::string& line);

// Re-emits a pipe's output line by line with a prefix.
struct Stream {
  Fd fd;
  FILE* sink = stdout;
  std::string prefix;
  std::string partial;
  size_t child = 0;            // index into Launcher::children_
  bool watch_address = false;  // the coordinator's stdout, until the address is seen
};

}  // namespace dtrain::cli
