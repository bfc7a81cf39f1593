#include "scaling_report.h"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>

#include "dtrain/common/error.h"
#include "plot_script.h"

namespace dtrain::cli {

namespace fs = std::filesystem;

namespace {

std::string md_row(const std::vector<std::string>& cells) {
  std::string line = "|";
  for (const std::string& c : cells) line += " " + c + " |";
  return line + "\n";
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  out.close();
  DTRAIN_CHECK(out.good(), IoError, "--out: cannot write {}", path.string());
}

nlohmann::json series_json(const ScalingSeries& s) {
  return {{"name", s.name},
          {"measured", s.measured},
          {"ranks", s.ranks},
          {"step_ms", s.step_ms},
          {"efficiency", s.efficiency}};
}

TableReport as_table(const ScalingReport& r) {
  TableReport t{"scaling", "scaling_plot.py", r.title, r.notes, r.columns, r.rows, {}};
  t.plot = {{"title", r.title}, {"series", nlohmann::json::array()}};
  for (const ScalingSeries& s : r.series) t.plot["series"].push_back(series_json(s));
  return t;
}

}  // namespace

std::string table_markdown(const TableReport& r) {
  std::string md = fmt::format("# {}\n\n", r.title);
  for (const std::string& n : r.notes) md += fmt::format("- {}\n", n);
  if (!r.notes.empty()) md += "\n";
  md += md_row(r.columns);
  md += md_row(std::vector<std::string>(r.columns.size(), "---:"));
  for (const auto& row : r.rows) md += md_row(row);
  md += fmt::format("\n![the table's figures as a plot]({}.png)\n", r.stem);
  return md;
}

void write_table_report(const std::string& dir, const TableReport& r) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  DTRAIN_CHECK(!ec, IoError, "--out {}: cannot create the folder: {}", dir, ec.message());
  write_text(fs::path(dir) / (r.stem + ".md"), table_markdown(r));
  const fs::path data = fs::path(dir) / (r.stem + ".json");
  write_text(data, r.plot.dump(1) + "\n");
  run_plot_script(r.script, {data.string(), (fs::path(dir) / (r.stem + ".png")).string()});
}

std::string scaling_markdown(const ScalingReport& r) { return table_markdown(as_table(r)); }

void write_scaling_report(const std::string& dir, const ScalingReport& r) {
  write_table_report(dir, as_table(r));
}

}  // namespace dtrain::cli
