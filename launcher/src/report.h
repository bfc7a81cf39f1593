// The run report (`dtrain report`, cmd_report.cc): plots and report.md of a run
// folder, drawn by scripts/report.py. Also what `dtrain train --report` calls on the
// logging rank when training ends.
#pragma once

#include <string>

namespace dtrain::cli {

struct ReportOptions {
  std::string run_dir;  // holds metrics.jsonl
  std::string out;      // empty: RUN_DIR/report
};

// Renders the report; returns 0. Throws InvalidArgument for a folder that is not a
// run, IoError when the script or its interpreter cannot run or the script fails.
int run_report(const ReportOptions& options);

}  // namespace dtrain::cli
