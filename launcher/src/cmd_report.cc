// `dtrain report RUN_DIR [--out DIR]`: plots and a markdown summary of a run folder.
//
// The folder is a run when it holds metrics.jsonl (what `dtrain train` writes; the
// TensorBoard events sit beside it). The plots (loss.png, throughput.png, lr.png) and
// report.md are drawn by scripts/report.py with matplotlib: the script is looked up
// next to the binary (<exe>/../share/dtrain/report.py, the install tree), then in the
// source tree; the interpreter is $DTRAIN_PYTHON, else Debian's /usr/bin/python3
// (where python3-matplotlib installs), else python3 on the PATH. A line of
// metrics.jsonl that is cut off is the script's warning (file and line), and the rest
// is rendered. Errors: a folder that is not a run, no script or interpreter, or the
// script failing, each a typed error with one line.
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "dtrain/common/error.h"
#include "report.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace dtrain::cli {

namespace {

namespace fs = std::filesystem;

std::string report_script() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  std::vector<fs::path> candidates;
  if (!ec) candidates.push_back(exe.parent_path().parent_path() / "share/dtrain/report.py");
  candidates.push_back(fs::path(DTRAIN_SOURCE_DIR) / "scripts/report.py");
  for (const fs::path& p : candidates) {
    if (fs::exists(p)) return p.string();
  }
  DTRAIN_THROW(IoError, "the plotting script report.py is in neither {} nor {}",
               candidates.front().string(), candidates.back().string());
}

std::string python_interpreter() {
  if (const char* env = std::getenv("DTRAIN_PYTHON"); env != nullptr && *env != '\0') return env;
  if (::access("/usr/bin/python3", X_OK) == 0) return "/usr/bin/python3";
  return "python3";
}

// Runs argv (no shell) and returns its exit status (127: it could not be started).
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

}  // namespace

int run_report(const ReportOptions& o) {
  DTRAIN_CHECK(fs::is_directory(o.run_dir), InvalidArgument,
               "{} is not a folder (expected a run folder holding metrics.jsonl)", o.run_dir);
  DTRAIN_CHECK(fs::is_regular_file(fs::path(o.run_dir) / "metrics.jsonl"), InvalidArgument,
               "{} is not a dtrain run folder (no metrics.jsonl in it)", o.run_dir);
  const std::string out = o.out.empty() ? (fs::path(o.run_dir) / "report").string() : o.out;
  const std::string python = python_interpreter();
  const int rc = run_program({python, report_script(), o.run_dir, out});
  DTRAIN_CHECK(rc != 127, IoError, "cannot run {} (set DTRAIN_PYTHON)", python);
  DTRAIN_CHECK(rc == 0, IoError, "the plotting script failed (exit {})", rc);
  return 0;
}

Command add_report_command(CLI::App& app) {
  auto o = std::make_shared<ReportOptions>();
  CLI::App* r = app.add_subcommand(
      "report", "Plots (loss, throughput, learning rate) and report.md of a run folder");
  r->add_option("run_dir", o->run_dir, "The run folder (holding metrics.jsonl)")->required();
  r->add_option("--out", o->out, "Output folder (default: RUN_DIR/report)");
  return {r, [o] { return run_report(*o); }};
}

}  // namespace dtrain::cli
