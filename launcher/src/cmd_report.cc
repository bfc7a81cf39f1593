// `dtrain report RUN_DIR [--out DIR]`: plots and a markdown summary of a run folder.
//
// The folder is a run when it holds metrics.jsonl (what `dtrain train` writes; the
// TensorBoard events sit beside it). The plots (loss.png, throughput.png, lr.png) and
// report.md are drawn by scripts/report.py with matplotlib (plot_script.h): looked up
// next to the binary (<exe>/../share/dtrain/report.py, the install tree), then in the
// source tree; the interpreter is $DTRAIN_PYTHON, else Debian's /usr/bin/python3
// (where python3-matplotlib installs), else python3 on the PATH. A line of
// metrics.jsonl that is cut off is the script's warning (file and line), and the rest
// is rendered. Errors: a folder that is not a run, no script or interpreter, or the
// script failing, each a typed error with one line.
#include <fmt/format.h>

#include <filesystem>
#include <memory>
#include <string>

#include "commands.h"
#include "dtrain/common/error.h"
#include "plot_script.h"
#include "report.h"

namespace dtrain::cli {

namespace fs = std::filesystem;

int run_report(const ReportOptions& o) {
  DTRAIN_CHECK(fs::is_directory(o.run_dir), InvalidArgument,
               "{} is not a folder (expected a run folder holding metrics.jsonl)", o.run_dir);
  DTRAIN_CHECK(fs::is_regular_file(fs::path(o.run_dir) / "metrics.jsonl"), InvalidArgument,
               "{} is not a dtrain run folder (no metrics.jsonl in it)", o.run_dir);
  const std::string out = o.out.empty() ? (fs::path(o.run_dir) / "report").string() : o.out;
  run_plot_script("report.py", {o.run_dir, out});
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
