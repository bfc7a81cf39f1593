// Running the project's matplotlib scripts (scripts/*.py) from the CLI: `dtrain
// report` (report.py) and `dtrain bench scaling --out` (scaling_plot.py).
//
// A script is looked up next to the binary (<exe>/../share/dtrain/NAME, the install
// tree), then in the source tree (DTRAIN_SOURCE_DIR/scripts/NAME); the interpreter is
// $DTRAIN_PYTHON, else Debian's /usr/bin/python3 (where python3-matplotlib installs),
// else python3 on the PATH. Not here: what the scripts draw.
#pragma once

#include <string>
#include <vector>

namespace dtrain::cli {

// The path of scripts/NAME (IoError naming both places when it is in neither).
std::string plot_script(const std::string& name);
std::string python_interpreter();
// Runs argv (no shell) and returns its exit status (127: it could not be started).
int run_program(const std::vector<std::string>& args);
// python_interpreter() plot_script(name) args...; IoError when it cannot start or fails.
void run_plot_script(const std::string& name, const std::vector<std::string>& args);

}  // namespace dtrain::cli
