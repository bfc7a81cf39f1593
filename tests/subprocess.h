// Test helper: run a shell command with a time limit, capturing its output.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

namespace dtrain::testing {

struct CommandResult {
  int code = -1;    // exit status, or 128 + signal
  std::string out;  // stdout and stderr together
};

// `timeout` turns a hang into a failure instead of a stuck suite.
inline CommandResult run_command(const std::string& cmd, int timeout_s = 600) {
  CommandResult r;
  std::string full = "timeout " + std::to_string(timeout_s) + " " + cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

// A fresh, empty folder under the system temp folder, unique to this process.
inline std::filesystem::path scratch_dir(const std::string& suite, const std::string& name) {
  namespace fs = std::filesystem;
  fs::path p = fs::temp_directory_path() / (suite + "_" + std::to_string(getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

}  // namespace dtrain::testing
