// `dtrain train`: the training job, on one worker or data-parallel on many.
//
// Loads the data (the MNIST subset by default, or a user's IDX folder), builds the
// model, trains with SGD + momentum, logs metrics as JSON lines, evaluates on the
// held-out split and prints a one-line summary. Started by `dtrain launch`, mpirun,
// srun or a torchrun-style environment, each process becomes one rank: the global
// batch is split over the ranks, DistributedDataParallel averages the gradients,
// rank 0 alone draws progress and writes metrics, and evaluation combines every
// rank's share of the test set. Errors are thrown as dtrain::Error;
// the CLI turns them into a message and a non-zero exit.
#pragma once

#include <cstdint>
#include <string>

namespace dtrain::cli {

struct TrainConfig {
  std::string model = "seed-cnn";
  std::string data;  // IDX folder; empty: the demo's MNIST subset
  std::string data_cache = "data";
  std::string device = "cpu";
  std::string backend = "auto";  // auto | tcp | mpi
  double timeout_s = 60;         // every collective; a lost peer fails within this
  int64_t epochs = 5;
  int64_t batch = 64;  // global: split evenly over the ranks
  double lr = 0.05;
  double momentum = 0.9;
  double weight_decay = 0.0;
  bool nesterov = false;
  std::string schedule = "cosine";  // cosine | step | constant
  int64_t warmup_steps = 0;
  uint64_t seed = 1;
  int threads = 1;
  bool normalize = true;
  int64_t log_every = 10;
  int64_t max_steps = 0;  // 0: no limit (for quick runs and tests)
  std::string metrics;    // path of the JSON-lines file; empty: runs/<time>/metrics.jsonl
  std::string save;       // checkpoint written at the end; empty: none
  bool progress = true;
};

struct TrainResult {
  int64_t steps = 0;
  double final_loss = 0;
  double test_accuracy = 0;
  double samples_per_s = 0;
  double seconds = 0;
  bool generated_data = false;
  int world_size = 1;
  std::string metrics_path;
};

TrainResult run_train(const TrainConfig& config);

}  // namespace dtrain::cli
