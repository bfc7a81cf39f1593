// `dtrain bench scaling ... --out DIR`: the printed table again as DIR/scaling.md,
// its numbers as DIR/scaling.json, and DIR/scaling.png (weak-scaling efficiency and
// step time against the rank/GPU count: the predicted curve, the measured points
// where there are any), drawn by scripts/scaling_plot.py (plot_script.h), the way
// `dtrain report` draws a run.
//
// The table's cells are kept as the strings the console table prints, so that the
// markdown says exactly what the terminal said. Not here: the numbers (the scaling
// model, the measurement). Thread-safety: none needed (plain data, one writer).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dtrain::cli {

// One curve or set of points of the plot.
struct ScalingSeries {
  std::string name;  // "predicted", "measured (this host)"
  bool measured = false;
  std::vector<int> ranks;
  std::vector<double> step_ms;
  std::vector<double> efficiency;  // fractions: 1 = perfect weak scaling
};

struct ScalingReport {
  std::string title;               // the table's "# ..." line, without the '#'
  std::vector<std::string> notes;  // further "# ..." lines (the links), without the '#'
  std::vector<std::string> columns;
  std::vector<std::vector<std::string>> rows;  // cells as printed
  std::vector<ScalingSeries> series;
};

// The markdown: the title, the notes as a list, then the table.
std::string scaling_markdown(const ScalingReport& r);
// Creates DIR and writes scaling.md, scaling.json and scaling.png (IoError naming
// the file that cannot be written, or the plotting script's failure).
void write_scaling_report(const std::string& dir, const ScalingReport& r);

// The same for any printed bench table: DIR/STEM.md (title, notes, the table, the
// plot's link), DIR/STEM.json (`plot`, what the script reads) and DIR/STEM.png drawn
// by scripts/SCRIPT (`bench allreduce --out`: allreduce_plot.py).
struct TableReport {
  std::string stem, script, title;
  std::vector<std::string> notes, columns;
  std::vector<std::vector<std::string>> rows;
  nlohmann::json plot;
};
std::string table_markdown(const TableReport& r);
void write_table_report(const std::string& dir, const TableReport& r);

}  // namespace dtrain::cli
