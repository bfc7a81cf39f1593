// `dtrain train --model gpt` end to end: the demo under tensor parallelism through
// `dtrain launch` learns the fortunes corpus (validation loss clearly below the
// corpus' unigram baseline, the number a model that ignores context gets), and bad
// meshes or shapes are refused in one line with a non-zero exit, overwriting nothing.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace fs = std::filesystem;

namespace {

using Result = dtrain::testing::CommandResult;

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_gpt_cli", name);
}

std::string bin() { return DTRAIN_BIN; }

std::string gpt_args(const fs::path& dir) {
  return " train --model gpt --no-progress --data-cache " + (dir / "data").string() +
         " --metrics " + (dir / "metrics.jsonl").string();
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// Acceptance: dp=1,tp=2 through dtrain launch; 300 steps take about a minute here.
TEST(GptDemo, TensorParallelRunBeatsTheUnigramBaseline) {
  fs::path dir = scratch("demo_tp2");
  Result r = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() + gpt_args(dir) +
                                          " --parallel dp=1,tp=2 --max-steps 300");
  ASSERT_EQ(r.code, 0) << r.out;
  std::smatch m;
  const std::regex line(
      "validation loss ([0-9.]+) \\(perplexity [0-9.]+\\) vs unigram baseline ([0-9.]+)");
  ASSERT_TRUE(std::regex_search(r.out, m, line)) << r.out;
  const double val = std::stod(m[1]), unigram = std::stod(m[2]);
  EXPECT_NEAR(unigram, 3.3756, 1e-3) << "the fortunes corpus changed?";
  EXPECT_LT(val, unigram - 0.6) << r.out;
  EXPECT_TRUE(contains(r.out, "mesh dp=1,tp=2,pp=1")) << r.out;
}

TEST(GptCli, ImpossibleMeshIsOneLineAndOverwritesNothing) {
  fs::path dir = scratch("bad_mesh");
  const fs::path save = dir / "keep.dtrn";
  std::ofstream(save) << "precious";
  Result r = dtrain::testing::run_command(bin() + gpt_args(dir) + " --parallel dp=2,tp=2 --save " +
                                          save.string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "mesh dp=2,tp=2,pp=1 needs 2 x 2 x 1 = 4 ranks, the world has 1"))
      << r.out;
  std::ifstream in(save);
  std::string kept((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(kept, "precious");
}

TEST(GptCli, BadMeshSpecAndShapesAreNamed) {
  fs::path dir = scratch("bad_spec");
  Result spec = dtrain::testing::run_command(bin() + gpt_args(dir) + " --parallel dp=2,xp=2");
  EXPECT_EQ(spec.code, 1);
  EXPECT_TRUE(contains(spec.out, "'xp=2' is not dp=N, tp=N or pp=N")) << spec.out;
  Result heads = dtrain::testing::run_command(bin() + gpt_args(dir) + " --n-head 3");
  EXPECT_EQ(heads.code, 1);
  EXPECT_TRUE(contains(heads.out, "3 heads do not divide the hidden size 128")) << heads.out;
  Result zero = dtrain::testing::run_command(bin() + gpt_args(dir) + " --zero 4");
  EXPECT_EQ(zero.code, 1);
  EXPECT_TRUE(contains(zero.out, "--zero 4")) << zero.out;
  Result mnist = dtrain::testing::run_command(bin() + " train --parallel tp=2");
  EXPECT_EQ(mnist.code, 1);
  EXPECT_TRUE(contains(mnist.out, "--parallel and --zero are for --model gpt")) << mnist.out;
}

// tp must divide the heads: refused on every rank, the job ends non-zero.
TEST(GptCli, TensorParallelSizeThatDoesNotDivideTheHeadsIsRefused) {
  fs::path dir = scratch("bad_tp");
  Result r = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() + gpt_args(dir) +
                                          " --parallel tp=2 --n-head 3 --n-embd 96");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.out, "tp=2 does not divide the 3 heads")) << r.out;
}

// Pipeline parallel through dtrain launch: it trains, and it reports the measured
// bubble next to (p-1)/(m+p-1).
TEST(GptDemo, PipelineRunReportsItsBubble) {
  fs::path dir = scratch("demo_pp2");
  Result r = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() + gpt_args(dir) +
                                          " --parallel pp=2 --microbatches 4 --max-steps 40");
  ASSERT_EQ(r.code, 0) << r.out;
  std::smatch m;
  const std::regex bubble("measured bubble ([0-9.]+)% .* = ([0-9.]+)%");
  ASSERT_TRUE(std::regex_search(r.out, m, bubble)) << r.out;
  EXPECT_NEAR(std::stod(m[2]), 100.0 * (2 - 1) / (4 + 2 - 1), 0.05);
  EXPECT_GT(std::stod(m[1]), 0.0);
  EXPECT_LT(std::stod(m[1]), 100.0);
  const std::regex line("final train loss ([0-9.]+), validation loss ([0-9.]+)");
  ASSERT_TRUE(std::regex_search(r.out, m, line)) << r.out;
  EXPECT_LT(std::stod(m[2]), 3.3756) << "40 steps should already beat the unigram baseline";
}

// --print-schedule: the stages and the timeline, no training.
TEST(GptCli, PrintScheduleShowsStagesAndTimeline) {
  fs::path dir = scratch("print_schedule");
  Result r = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() + gpt_args(dir) +
                                          " --parallel pp=2 --microbatches 3 --pp-schedule gpipe "
                                          "--stage-split 0,2 --print-schedule");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "stage 0: layers 0..1")) << r.out;
  EXPECT_TRUE(contains(r.out, "stage 1: layers 2..5")) << r.out;
  EXPECT_TRUE(contains(r.out, "gpipe schedule, 3 micro-batches")) << r.out;
  EXPECT_TRUE(contains(r.out, "stage 1: .  F0 F1 F2 B0 B1 B2")) << r.out;
  EXPECT_FALSE(contains(r.out, "validation loss")) << r.out;
}

// More stages than layers (4 blocks + embedding + head = 6), a bad split: one line.
TEST(GptCli, StageCountAboveTheLayersIsRefused) {
  fs::path dir = scratch("bad_pp");
  Result r = dtrain::testing::run_command(bin() + gpt_args(dir) + " --parallel pp=8 --print-schedule "
                                          "--n-layer 4");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.out, "needs 1 x 1 x 8 = 8 ranks")) << r.out;
  Result many = dtrain::testing::run_command(bin() + " launch --nproc 8 -- " + bin() + gpt_args(dir) +
                                             " --parallel pp=8 --n-layer 4 --print-schedule");
  EXPECT_NE(many.code, 0);
  EXPECT_TRUE(contains(many.out, "pipeline: 8 stages for a model of 6 layers")) << many.out;
  Result split = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() +
                                              gpt_args(dir) + " --parallel pp=2 --stage-split 0,9");
  EXPECT_NE(split.code, 0);
  EXPECT_TRUE(contains(split.out, "--stage-split '0,9'")) << split.out;
}

}  // namespace
