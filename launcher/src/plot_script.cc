#include "plot_script.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "dtrain/common/error.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace dtrain::cli {

namespace fs = std::filesystem;

std::string plot_script(const std::string& name) {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  std::vector<fs::path> candidates;
  if (!ec) candidates.push_back(exe.parent_path().parent_path() / "share/dtrain" / name);
  candidates.push_back(fs::path(DTRAIN_SOURCE_DIR) / "scripts" / name);
  for (const fs::path& p : candidates) {
    if (fs::exists(p)) return p.string();
  }
  DTRAIN_THROW(IoError, "the plotting script {} is in neither {} nor {}", name,
               candidates.front().string(), candidates.back().string());
}

std::string python_interpreter() {
  if (const char* env = std::getenv("DTRAIN_PYTHON"); env != nullptr && *env != '\0') return env;
  if (::access("/usr/bin/python3", X_OK) == 0) return "/usr/bin/python3";
  return "python3";
}

int run_program(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  DTRAIN_CHECK(pid >= 0, IoError, "fork failed");
  if (pid == 0) {
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

void run_plot_script(const std::string& name, const std::vector<std::string>& args) {
  const std::string python = python_interpreter();
  std::vector<std::string> argv = {python, plot_script(name)};
  argv.insert(argv.end(), args.begin(), args.end());
  const int rc = run_program(argv);
  DTRAIN_CHECK(rc != 127, IoError, "cannot run {} (set DTRAIN_PYTHON)", python);
  DTRAIN_CHECK(rc == 0, IoError, "the plotting script {} failed (exit {})", name, rc);
}

}  // namespace dtrain::cli
