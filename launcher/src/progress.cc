#include "progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

namespace dtrain::cli {

namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr double kRedrawSeconds = 0.1;  // terminal: at most ten redraws a second
constexpr int kBarWidth = 24;

std::string count_text(const ProgressOptions& o, int64_t done) {
  if (o.unit == "bytes") {
    return fmt::format("{:.1f}/{:.1f} MiB", static_cast<double>(done) / kMiB,
                       static_cast<double>(o.total) / kMiB);
  }
  return fmt::format("{}/{} {}", done, o.total, o.unit);
}

std::string rate_text(const ProgressOptions& o, double per_s) {
  if (o.unit == "bytes") return fmt::format("{:.1f} MiB/s", per_s / kMiB);
  return fmt::format("{:.1f} {}/s", per_s, o.unit);
}

}  // namespace

ProgressClock steady_progress_clock() {
  return [] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
}

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e7) return "--:--";
  int64_t t = static_cast<int64_t>(s + 0.5);
  return t >= 3600 ? fmt::format("{}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60)
                   : fmt::format("{:02}:{:02}", t / 60, t % 60);
}

ProgressBar::ProgressBar(ProgressOptions options) : o_(std::move(options)) {
  if (!o_.clock) o_.clock = steady_progress_clock();
  tty_ = o_.tty.value_or(o_.out != nullptr && isatty(fileno(o_.out)) != 0);
  start_s_ = o_.clock();
}

ProgressBar::ProgressBar(std::string label, int64_t total_steps, FILE* out, bool enabled)
    : ProgressBar(ProgressOptions{.label = std::move(label),
                                  .total = total_steps,
                                  .out = out,
                                  .enabled = enabled,
                                  .show_rate = false}) {}

std::string ProgressBar::render(int64_t done, double seconds, const std::string& detail) const {
  const double frac =
      o_.total > 0 ? std::clamp(static_cast<double>(done) / static_cast<double>(o_.total), 0.0, 1.0)
                   : 1.0;
  const double rate =
      seconds > 0 && done > o_.start ? static_cast<double>(done - o_.start) / seconds : 0.0;
  const double remaining = static_cast<double>(std::max<int64_t>(0, o_.total - done));
  const double eta = remaining == 0 ? 0.0 : rate > 0 ? remaining / rate : -1.0;
  std::string bar(static_cast<size_t>(frac * kBarWidth), '#');
  bar.resize(kBarWidth, '.');
  // Floored: 99.6% is not shown as 100% before the end.
  std::string line = fmt::format("{} [{}] {:3.0f}% {}", o_.label, bar, std::floor(frac * 100),
                                 count_text(o_, done));
  if (!detail.empty()) line += " " + detail;
  if (o_.show_rate) line += " " + rate_text(o_, rate);
  return line + " ETA " + format_duration(eta);
}

void ProgressBar::advance(int64_t done, const std::string& detail) {
  if (!o_.enabled || o_.out == nullptr) return;
  const double now = o_.clock();
  if (tty_) {
    if (done < o_.total && last_draw_s_ >= 0 && now - last_draw_s_ < kRedrawSeconds) return;
    last_draw_s_ = now;
    // The last draw ends the line at once, so what follows (another bar, a log
    // line) starts on a fresh one.
    const bool last = done >= o_.total;
    fmt::print(o_.out, "\r{}\x1b[K{}", render(done, now - start_s_, detail), last ? "\n" : "");
    drawn_ = !last;
    std::fflush(o_.out);
    return;
  }
  const int tenth =
      o_.total > 0 ? static_cast<int>(std::clamp<int64_t>(10 * done / o_.total, 0, 10)) : 10;
  if (tenth == last_tenth_) return;
  last_tenth_ = tenth;
  fmt::print(o_.out, "{}\n", render(done, now - start_s_, detail));
  std::fflush(o_.out);
}

void ProgressBar::update(int64_t step, int64_t epoch, double loss, double samples_per_s) {
  advance(step, fmt::format("epoch {} loss {:.4f} {:.0f} samples/s", epoch, loss, samples_per_s));
}

void ProgressBar::finish() {
  if (o_.enabled && tty_ && drawn_) {
    fmt::print(o_.out, "\n");
    std::fflush(o_.out);
  }
  drawn_ = false;
}

ProgressFn progress_reporter(ProgressOptions options) {
  if (!options.enabled) return {};
  auto bar = std::make_shared<std::optional<ProgressBar>>();
  return [bar, options](int64_t done, int64_t total) {
    if (!*bar) {
      ProgressOptions o = options;
      o.total = total;
      bar->emplace(std::move(o));
    }
    (*bar)->advance(done);
    if (done >= total) {
      (*bar)->finish();
      bar->reset();  // a later pass (the next checkpoint, evaluation) starts a new bar
    }
  };
}

std::function<void(uint64_t, uint64_t)> bytes_reporter(ProgressOptions options) {
  options.unit = "bytes";
  ProgressFn fn = progress_reporter(std::move(options));
  if (!fn) return {};
  return [fn](uint64_t done, uint64_t total) {
    fn(static_cast<int64_t>(done), static_cast<int64_t>(total));
  };
}

}  // namespace dtrain::cli
