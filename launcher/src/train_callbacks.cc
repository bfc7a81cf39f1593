#include "train_callbacks.h"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "dtrain/common/error.h"

namespace dtrain::cli {

namespace fs = std::filesystem;

namespace {

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Keeps the metrics lines of steps <= step (a resumed run rewrites what follows).
void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("step") && !j.contains("test_accuracy") &&
        j["step"].get<int64_t>() <= step) {
      kept += line + "\n";
    }
  }
  in.close();
  std::ofstream out(path, std::ios::trunc);
  out << kept;
  DTRAIN_CHECK(out.good(), IoError, "rewriting the metrics file {} failed", path);
}

}  // namespace

std::string default_metrics_path() {
  return default_metrics_path(
      std::chrono::system_clock::to_time_t(std::chrono::system_clock::now()));
}

std::string default_metrics_path(int64_t unix_seconds) {
  std::string stamp =
      fmt::format("{:%Y%m%d-%H%M%S}", fmt::localtime(static_cast<std::time_t>(unix_seconds)));
  return (fs::path("runs") / ("train-" + stamp) / "metrics.jsonl").string();
}

void GenerationWatch::on_step_begin(int64_t /*step*/, int64_t /*epoch*/) {
  if (session_.generation_over()) {
    DTRAIN_THROW(CommError, "rank {}: generation {} of the job is over (a worker was lost)",
                 session_.rank(), session_.generation());
  }
}

void HeartbeatProgress::on_step_end(const StepEnd& end) {
  last_.step = end.step;
  session_.report_progress(last_);
}

void HeartbeatProgress::on_log(const StepEnd& log) {
  last_ = {log.step, log.samples_per_s, log.loss};
  session_.report_progress(last_);
}

void TestKillSwitch::on_step_end(const StepEnd& end) {
  if (this_rank_ != kill_rank_ || end.step != kill_step_) return;
  spdlog::warn(
      "dtrain train: rank {}: DTRAIN_TEST_KILL_AT reached at step {}: SIGKILL; unix "
      "time {:.3f}",
      this_rank_, end.step, unix_seconds());
  std::fflush(stderr);
  ::raise(SIGKILL);
}

void RecoveryNotice::on_step_end(const StepEnd& end) {
  if (end.step != first_step_ + 1 || !(from_.recovered || from_.failure_seen)) return;
  std::string after;
  if (from_.failure_seen) {
    after = fmt::format(
        ", {:.2f} s after the failure was noticed",
        std::chrono::duration<double>(std::chrono::steady_clock::now() - *from_.failure_seen)
            .count());
  }
  spdlog::info(
      "dtrain train: rank {}: training again at step {} (generation {}){}; unix "
      "time {:.3f}",
      session_.rank(), end.step, session_.generation(), after, unix_seconds());
}

void ProgressCallback::on_train_begin(const TrainBegin& begin) {
  bar_.emplace(ProgressOptions{
      .label = label_, .total = begin.total_steps, .start = begin.start_step, .show_rate = false});
}

void ProgressCallback::on_step_end(const StepEnd& end) {
  if (bar_) bar_->update(end.step, end.epoch, end.loss, end.samples_per_s);
}

void ProgressCallback::on_train_end(const TrainStats& /*stats*/) {
  if (bar_) bar_->finish();
}

// Opens the file: appending when resumed (after dropping the lines past the start).
void MetricsCallback::on_train_begin(const TrainBegin& begin) {
  if (path_.empty()) path_ = default_metrics_path();
  if (begin.start_step > 0) truncate_metrics(path_, begin.start_step);
  fs::path p(path_);
  if (p.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(p.parent_path(), ec);
    DTRAIN_CHECK(!ec, IoError, "cannot create folder {} for the metrics file: {}",
                 p.parent_path().string(), ec.message());
  }
  out_.open(path_, begin.start_step > 0 ? std::ios::app : std::ios::trunc);
  DTRAIN_CHECK(out_.good(), IoError, "cannot write the metrics file {}", path_);
}

void MetricsCallback::on_log(const StepEnd& log) {
  write({{"step", log.step},
         {"epoch", log.epoch},
         {"loss", log.loss},
         {"lr", log.lr},
         {"samples_per_s", log.samples_per_s}});
}

void MetricsCallback::on_eval(const TrainStats& stats) {
  nlohmann::json line = extra_;
  for (const auto& [name, value] : stats.eval) line[name] = value;
  line["steps"] = stats.steps;
  line["train_seconds"] = stats.seconds;
  line["samples_per_s"] = stats.samples_per_s;
  write(line);
}

void MetricsCallback::write(const nlohmann::json& line) {
  DTRAIN_CHECK(out_.is_open(), InvalidArgument, "MetricsCallback: write before on_train_begin");
  out_ << line.dump() << '\n';
  out_.flush();
  DTRAIN_CHECK(out_.good(), IoError, "writing the metrics file {} failed", path_);
}

}  // namespace dtrain::cli
