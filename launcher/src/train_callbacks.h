// The trainer callbacks of `dtrain train`: progress line, metrics.jsonl, the
// recovery notices and the test seams. Each is a Trainer Callback (trainer.h);
// train.cc registers them in this order: GenerationWatch, TestKillSwitch,
// RecoveryNotice, ProgressCallback, MetricsCallback, TensorBoardCallback
// (tensorboard.h), then the run's own banner.
// The logging ones (progress, metrics) only on the logging rank.
//
// Not here: checkpoints (checkpointing.h). Thread-safety: the training thread.
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "progress.h"
#include "recovery.h"
#include "trainer.h"
#include "worker_session.h"

namespace dtrain::cli {

// runs/train-<local time>/metrics.jsonl, of now or of a unix time (seconds).
std::string default_metrics_path();
std::string default_metrics_path(int64_t unix_seconds);

// Throws CommError before a step once the coordinator has moved to a newer
// generation (a worker was lost): the step would fail in its collectives anyway.
class GenerationWatch final : public Callback {
 public:
  explicit GenerationWatch(const WorkerSession& session) : session_(session) {}
  void on_step_begin(int64_t step, int64_t epoch) override;

 private:
  const WorkerSession& session_;
};

// Hands the step, the samples/s and the logged loss to the session, whose
// heartbeats carry them to the coordinator (`dtrain status`). Every rank.
class HeartbeatProgress final : public Callback {
 public:
  explicit HeartbeatProgress(WorkerSession& session) : session_(session) {}
  void on_step_end(const StepEnd& end) override;
  void on_log(const StepEnd& log) override;

 private:
  WorkerSession& session_;
  coordinator::WorkerProgress last_;
};

// DTRAIN_TEST_KILL_AT (train.h): rank `rank` kills itself (SIGKILL) after step `step`.
class TestKillSwitch final : public Callback {
 public:
  TestKillSwitch(int this_rank, int kill_rank, int64_t kill_step)
      : this_rank_(this_rank), kill_rank_(kill_rank), kill_step_(kill_step) {}
  void on_step_end(const StepEnd& end) override;

 private:
  int this_rank_, kill_rank_;
  int64_t kill_step_;
};

// After a recovery: one line at the first step, with how long the recovery took.
class RecoveryNotice final : public Callback {
 public:
  RecoveryNotice(const WorkerSession& session, const StartFrom& from)
      : session_(session), from_(from) {}
  void on_train_begin(const TrainBegin& begin) override { first_step_ = begin.start_step; }
  void on_step_end(const StepEnd& end) override;

 private:
  const WorkerSession& session_;
  StartFrom from_;
  int64_t first_step_ = 0;
};

// The progress bar (progress.h), labelled with the model's name.
class ProgressCallback final : public Callback {
 public:
  explicit ProgressCallback(std::string label) : label_(std::move(label)) {}
  void on_train_begin(const TrainBegin& begin) override;
  void on_step_end(const StepEnd& end) override;
  void on_train_end(const TrainStats& stats) override;

 private:
  std::string label_;
  std::optional<ProgressBar> bar_;
};

// metrics.jsonl: {step, epoch, loss, lr, samples_per_s} at every log, and after
// the evaluation one summary line: the eval metrics, steps, train_seconds,
// samples_per_s and `summary_extra` (the run's own fields). A resumed run keeps
// the lines of the steps up to its start and rewrites what follows.
// An empty path: default_metrics_path() when training begins.
class MetricsCallback final : public Callback {
 public:
  MetricsCallback(std::string path, nlohmann::json summary_extra)
      : path_(std::move(path)), extra_(std::move(summary_extra)) {}
  void on_train_begin(const TrainBegin& begin) override;
  void on_log(const StepEnd& log) override;
  void on_eval(const TrainStats& stats) override;
  const std::string& path() const { return path_; }

 private:
  void write(const nlohmann::json& line);
  std::string path_;
  nlohmann::json extra_;
  std::ofstream out_;
};

}  // namespace dtrain::cli
