#include "progress.h"

#include <fmt/format.h>
#include <unistd.h>

namespace dtrain::cli {

ProgressBar::ProgressBar(std::string label, int64_t total_steps, FILE* out, bool enabled)
    : label_(std::move(label)),
      total_(total_steps),
      out_(out),
      enabled_(enabled),
      tty_(isatty(fileno(out)) != 0),
      start_(std::chrono::steady_clock::now()) {}

static std::string format_duration(double s) {
  if (s < 0 || s > 1e7) return "--:--";
  int64_t t = static_cast<int64_t>(s + 0.5);
  return t >= 3600 ? fmt::format("{}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60)
                   : fmt::format("{:02}:{:02}", t / 60, t % 60);
}

std::string ProgressBar::render(int64_t step, int64_t epoch, double loss,
                                double samples_per_s) const {
  double frac = total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 1.0;
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double eta = frac > 0 ? elapsed * (1.0 - frac) / frac : -1;
  constexpr int kWidth = 24;
  int filled = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  return fmt::format("{} [{}] {:3.0f}% step {}/{} epoch {} loss {:.4f} {:.0f} samples/s ETA {}",
                     label_, bar, frac * 100, step, total_, epoch, loss, samples_per_s,
                     format_duration(eta));
}

void ProgressBar::update(int64_t step, int64_t epoch, double loss, double samples_per_s) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (tty_) {
    if (step != total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    fmt::print(out_, "\r{}\x1b[K", render(step, epoch, loss, samples_per_s));
    std::fflush(out_);
    return;
  }
  int decile = total_ > 0 ? static_cast<int>(10 * step / total_) : 10;
  if (decile == last_decile_ && step != total_) return;
  last_decile_ = decile;
  fmt::print(out_, "{}\n", render(step, epoch, loss, samples_per_s));
  std::fflush(out_);
}

void ProgressBar::finish() {
  if (enabled_ && tty_) {
    fmt::print(out_, "\n");
    std::fflush(out_);
  }
}

}  // namespace dtrain::cli
