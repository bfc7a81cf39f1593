#include "launch_process.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <regex>

#include "dtrain/common/error.h"

extern char** environ;

namespace dtrain::cli {

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

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    return fmt::format("was killed by signal {} (SIG{})", sig, signal_abbrev(sig));
  }
  return fmt::format("ended with wait status {}", status);
}

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

namespace {

cpu_set_t cpu_set_of(const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) {
    DTRAIN_CHECK(c >= 0 && c < CPU_SETSIZE, InvalidArgument, "launch: CPU {} is out of range", c);
    CPU_SET(c, &set);
  }
  return set;
}

// In the child, before exec (async-signal-safe calls only).
void child_write(const std::string& head, const char* why) {
  ssize_t ignored = ::write(STDERR_FILENO, head.data(), head.size());
  if (why != nullptr) ignored = ::write(STDERR_FILENO, why, std::strlen(why));
  ignored = ::write(STDERR_FILENO, "\n", 1);
  (void)ignored;
}

}  // namespace

pid_t spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env, int out,
            int err, const sigset_t& child_mask, const std::vector<int>& cpus) {
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::vector<char*> cenv;
  for (const std::string& e : env) cenv.push_back(const_cast<char*>(e.c_str()));
  cenv.push_back(nullptr);
  const std::string exec_error = fmt::format("dtrain launch: cannot execute '{}': ", argv[0]);
  const cpu_set_t cpu_set = cpu_set_of(cpus);
  const std::string bind_error =
      fmt::format("dtrain launch: cannot bind '{}' to its CPUs: ", argv[0]);
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
    if (!cpus.empty() && ::sched_setaffinity(0, sizeof cpu_set, &cpu_set) != 0) {
      child_write(bind_error, ::strerrordesc_np(errno));
      ::_exit(126);
    }
    ::execvpe(cargv[0], cargv.data(), cenv.data());
    child_write(exec_error, ::strerrordesc_np(errno));
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also here, so the group exists before we may signal it
  return pid;
}

std::vector<std::string> inherited_env(const std::vector<std::string>& drop) {
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string kv = *e;
    std::string key = kv.substr(0, kv.find('='));
    if (std::find(drop.begin(), drop.end(), key) == drop.end()) out.push_back(std::move(kv));
  }
  return out;
}

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

}  // namespace dtrain::cli
