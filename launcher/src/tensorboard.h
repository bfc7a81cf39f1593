// TensorBoard event files for `dtrain train --tensorboard DIR`, written by hand.
//
// A file is a sequence of TFRecords: uint64 length (little endian), masked
// CRC32C of the length's 8 bytes, the data, masked CRC32C of the data (mask:
// ((crc >> 15) | (crc << 17)) + 0xa282ead8). Each record's data is one serialised
// tensorflow.Event (tensorflow/core/util/event.proto, summary.proto): the first
// carries file_version "brain.Event:2", the others a Summary of scalars
// (Value{tag = 1, simple_value = 2}) with step and wall_time. The few fields are
// encoded here directly (no protobuf dependency): Event{wall_time = 1 (double),
// step = 2 (int64), file_version = 3, summary = 5, session_log = 7}, Summary{value = 1},
// SessionLog{status = 1}. A resumed run's file starts with a SessionLog START at the
// resumed step, so TensorBoard discards what the previous attempt logged past it.
//
// Scalars (TensorBoardCallback): train/loss (combined over the ranks), train/lr,
// train/samples_per_s, train/grad_norm (the global L2 norm of the gradients the
// optimizer step used; when the callback is given the model), train/sync_ms (the
// mean wall time a step waited for the gradient all-reduce, when a plan measures
// it), test/* at evaluation (test_accuracy -> test/accuracy, test_loss -> test/loss).
//
// Not here: images, histograms, graphs, the loss scale (the MNIST path has no
// mixed precision). Thread-safety: one thread (the training thread).
#pragma once

#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dtrain/engine/nn/module.h"
#include "trainer.h"

namespace dtrain::cli {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses it.
uint32_t crc32c(std::string_view data);
// TFRecord's masked form of crc32c(data).
uint32_t masked_crc32c(std::string_view data);
// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
std::string frame_record(std::string_view data);

struct Scalar {
  std::string tag;
  float value = 0;
};
// Serialised tensorflow.Event messages (field order and encoding as protobuf's).
std::string file_version_event(double wall_time);
std::string scalars_event(double wall_time, int64_t step, const std::vector<Scalar>& scalars);
// Event{step, session_log (7) {status: START (1)}}: TensorBoard drops the events of
// steps >= step written before it (a resumed run repeats them).
std::string session_start_event(double wall_time, int64_t step);

// events.out.tfevents.<unix seconds>.<host>.<pid>.rank<r>
std::string event_file_name(int64_t unix_seconds, std::string_view host, int pid, int rank);

// One event file: opened (truncated) and given its file_version record at
// construction. Throws IoError naming the path when it cannot be created or written.
class EventWriter {
 public:
  explicit EventWriter(std::string path);
  // One Event with every scalar in its Summary; wall_time in unix seconds.
  void add_scalars(int64_t step, const std::vector<Scalar>& scalars, double wall_time);
  void add_session_start(int64_t step, double wall_time);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(std::string_view event);
  std::string path_;
  std::ofstream out_;
};

// Where the scalars beyond the StepEnd fields come from; each is optional.
struct TensorBoardSources {
  std::shared_ptr<nn::Module> model;     // train/grad_norm from its gradients
  std::function<double()> sync_seconds;  // total seconds waited for gradient sync
};

// Writes one event file in `dir` (created if missing) for this rank: scalars at
// every log and at evaluation, flushed each time and at the end.
class TensorBoardCallback final : public Callback {
 public:
  TensorBoardCallback(std::string dir, int rank, TensorBoardSources sources = {});
  void on_train_begin(const TrainBegin& begin) override;
  void on_log(const StepEnd& log) override;
  void on_train_end(const TrainStats& stats) override;
  void on_eval(const TrainStats& stats) override;
  // The event file (empty before on_train_begin).
  std::string path() const { return writer_ ? writer_->path() : std::string(); }

 private:
  std::string dir_;
  int rank_;
  TensorBoardSources sources_;
  std::unique_ptr<EventWriter> writer_;
  int64_t last_log_step_ = 0;
  double last_sync_seconds_ = 0;
};

// The folder of `--tensorboard FLAG`: "none" -> empty (off), "" -> the metrics
// file's folder (the run folder), anything else -> itself.
std::string tensorboard_dir(const std::string& flag, const std::string& metrics_path);

// The global L2 norm of the module's gradients (parameters without one count 0).
double gradient_norm(const nn::Module& model);

}  // namespace dtrain::cli
