// A progress bar with ETA for every long step of the CLI: training (steps), the
// evaluation pass (batches), checkpoint writes (bytes, shown as MiB), data
// preparation and benchmark sweeps (sizes, configurations).
//
// On a terminal it redraws one line in place ("\r", at most every 100 ms, always at
// the end) and ends it with one newline when the total is reached (or in finish(),
// for a task that stops early); when the stream is not a terminal (CI, log files, a
// pipe) it prints a plain line whenever another tenth of the total is done (the
// first update, every 10%, the last), never a "\r".
// ETA = remaining units / rate, the rate counted from the units done since the bar
// began (a resumed run starts at `start`). The clock can be injected so that tests
// are deterministic. Callers draw on the logging rank only (enabled = false
// elsewhere). Not here: what a step is (the callers). Not thread-safe: one owner.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>

namespace dtrain::cli {

// Seconds on a monotonic clock.
using ProgressClock = std::function<double()>;
ProgressClock steady_progress_clock();

struct ProgressOptions {
  std::string label;           // "dtrain seed-cnn", "evaluation", "checkpoint step-00000010"
  int64_t total = 0;           // units of the whole task (<= 0: shown as done)
  std::string unit = "steps";  // "bytes" renders counts and rate as MiB
  int64_t start = 0;           // units already done when the bar begins (a resumed run)
  FILE* out = stderr;
  bool enabled = true;
  std::optional<bool> tty = std::nullopt;  // default: isatty(out)
  ProgressClock clock = nullptr;           // default: steady_progress_clock()
  bool show_rate = true;  // "<rate> <unit>/s" (training shows samples/s in its detail)
};

class ProgressBar {
 public:
  explicit ProgressBar(ProgressOptions options);
  // The training bar: label, total steps, "steps" (kept for the existing callers).
  ProgressBar(std::string label, int64_t total_steps, FILE* out = stderr, bool enabled = true);

  // `done` units of the total are finished; `detail` is appended before the ETA.
  void advance(int64_t done, const std::string& detail = {});
  // Training: after each step, with the running loss and throughput.
  void update(int64_t step, int64_t epoch, double loss, double samples_per_s);
  // Ends the redrawn line (terminal) so later output starts on a fresh line.
  void finish();

  // The line for `done` units at `seconds` since the bar began (no "\r", no newline).
  std::string render(int64_t done, double seconds, const std::string& detail) const;
  int64_t total() const { return o_.total; }

 private:
  ProgressOptions o_;
  bool tty_ = false;
  bool drawn_ = false;   // something is on the terminal line
  int last_tenth_ = -1;  // plain lines: the last tenth printed
  double start_s_ = 0;
  double last_draw_s_ = -1;
};

// A progress function for callers that learn their total late (evaluation, a
// checkpoint shard): the first call creates the bar with that total, every call
// advances it, and the call that reaches the total finishes it. A disabled reporter
// is empty (callers test it). The bar is shared by the copies of the function.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;
ProgressFn progress_reporter(ProgressOptions options);
// The same for byte counts (checkpoint writes: save_archive's WriteProgress), unit
// "bytes" (shown as MiB).
std::function<void(uint64_t done, uint64_t total)> bytes_reporter(ProgressOptions options);

// "01:05", "1:02:03", "--:--" (unknown or absurd).
std::string format_duration(double seconds);

}  // namespace dtrain::cli
