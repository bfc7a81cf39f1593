// A terminal progress bar for training: step, loss, samples/s and ETA.
//
// On a terminal it redraws one line in place; when stderr is not a terminal (CI,
// log files) it prints a plain line every `every` percent instead, so logs stay
// readable. Not thread-safe: owned by the training loop.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace dtrain::cli {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total_steps, FILE* out = stderr, bool enabled = true);
  // Call after each step with the running loss and throughput.
  void update(int64_t step, int64_t epoch, double loss, double samples_per_s);
  // Ends the line (terminal) so later output starts on a fresh line.
  void finish();

 private:
  std::string render(int64_t step, int64_t epoch, double loss, double samples_per_s) const;
  std::string label_;
  int64_t total_;
  FILE* out_;
  bool enabled_;
  bool tty_;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace dtrain::cli
