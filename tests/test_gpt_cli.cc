// `dtrain train --model gpt` end to end: the demo under tensor parallelism through
// `dtrain launch` learns the fortunes corpus (validation loss clearly below the
// corpus' unigram baseline, the number a model that ignores context gets), and bad
// meshes or shapes are refused in one line with a non-zero exit, overwriting nothing.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
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
  Result r = dtrain::testing::run_command(bin() + gpt_args(dir) +
                                          " --parallel pp=8 --print-schedule "
                                          "--n-layer 4");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(contains(r.out, "needs 1 x 1 x 8 = 8 ranks")) << r.out;
  Result many =
      dtrain::testing::run_command(bin() + " launch --nproc 8 -- " + bin() + gpt_args(dir) +
                                   " --parallel pp=8 --n-layer 4 --print-schedule");
  EXPECT_NE(many.code, 0);
  EXPECT_TRUE(contains(many.out, "pipeline: 8 stages for a model of 6 layers")) << many.out;
  Result split = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() +
                                              gpt_args(dir) + " --parallel pp=2 --stage-split 0,9");
  EXPECT_NE(split.code, 0);
  EXPECT_TRUE(contains(split.out, "--stage-split '0,9'")) << split.out;
}

// ---- checkpoints across meshes

std::string small_gpt(const fs::path& dir, const std::string& metrics, int steps = 20,
                      int embd = 64) {
  return " train --model gpt --no-progress --data-cache " + (dir / "data").string() +
         " --n-layer 2 --n-embd " + std::to_string(embd) + " --context 32 --batch 16 " +
         "--max-steps " + std::to_string(steps) + " --log-every 1 --metrics " +
         (dir / metrics).string() + " --ckpt-dir " + (dir / "ckpt").string();
}

// step -> the logged (rank-combined) loss, from a metrics.jsonl.
std::map<int, double> logged_losses(const fs::path& path) {
  std::map<int, double> out;
  std::ifstream in(path);
  const std::regex row("\"loss\":([-0-9.e+]+).*\"step\":([0-9]+)");
  std::smatch m;
  for (std::string line; std::getline(in, line);) {
    if (std::regex_search(line, m, row)) out[std::stoi(m[2])] = std::stod(m[1]);
  }
  return out;
}

// Acceptance: saved at (2,2,1) + ZeRO-1, resumed at (1,1,4) and at 1 process; every
// step after the resume logs the uninterrupted run's loss.
TEST(GptCheckpoint, ResumesAtAnotherMesh) {
  fs::path dir = scratch("reshard");
  const std::string launch4 = bin() + " launch --nproc 4 -- " + bin();
  Result a = dtrain::testing::run_command(launch4 + small_gpt(dir, "a.jsonl") +
                                          " --parallel dp=2,tp=2 --zero 1 --ckpt-every 10");
  ASSERT_EQ(a.code, 0) << a.out;
  ASSERT_TRUE(fs::exists(dir / "ckpt" / "step-00000010" / "manifest.json")) << a.out;
  Result b = dtrain::testing::run_command(launch4 + small_gpt(dir, "b.jsonl") +
                                          " --parallel pp=4 --resume step-00000010");
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_TRUE(contains(b.out, "saved at mesh dp=2,tp=2,pp=1, step 10) on mesh dp=1,tp=1,pp=4"))
      << b.out;
  Result c = dtrain::testing::run_command(bin() + small_gpt(dir, "c.jsonl") +
                                          " --resume step-00000010 --keep 0");
  ASSERT_EQ(c.code, 0) << c.out;
  const auto la = logged_losses(dir / "a.jsonl"), lb = logged_losses(dir / "b.jsonl"),
             lc = logged_losses(dir / "c.jsonl");
  ASSERT_EQ(la.size(), 20u);
  ASSERT_EQ(lb.size(), 10u);
  ASSERT_EQ(lc.size(), 10u);
  for (int step = 11; step <= 20; ++step) {
    EXPECT_NEAR(lb.at(step), la.at(step), 1e-5 * la.at(step)) << "pp=4, step " << step;
    EXPECT_NEAR(lc.at(step), la.at(step), 1e-5 * la.at(step)) << "1 process, step " << step;
  }
}

double validation_loss(const Result& r) {
  std::smatch m;
  const std::regex line("validation loss ([0-9.]+)");
  EXPECT_TRUE(std::regex_search(r.out, m, line)) << r.out;
  return m.empty() ? -1 : std::stod(m[1]);
}

// ZeRO-3 through `dtrain train`: parameters live as shards, so training and the
// validation pass both gather per block; both follow the 1-process run.
TEST(GptCli, ZeroThreeTrainsAndEvaluatesLikeOneProcess) {
  fs::path dir = scratch("zero3");
  Result z3 = dtrain::testing::run_command(bin() + " launch --nproc 2 -- " + bin() +
                                           small_gpt(dir, "z3.jsonl", 10) + " --zero 3 --keep 0");
  ASSERT_EQ(z3.code, 0) << z3.out;
  EXPECT_TRUE(contains(z3.out, "mesh dp=2,tp=1,pp=1, zero 3")) << z3.out;
  Result one = dtrain::testing::run_command(bin() + small_gpt(dir, "one.jsonl", 10) + " --keep 0");
  ASSERT_EQ(one.code, 0) << one.out;
  const auto lz = logged_losses(dir / "z3.jsonl"), l1 = logged_losses(dir / "one.jsonl");
  ASSERT_EQ(lz.size(), 10u);
  for (const auto& [step, loss] : l1) EXPECT_NEAR(lz.at(step), loss, 1e-5 * loss) << step;
  EXPECT_NEAR(validation_loss(z3), validation_loss(one), 2e-4) << z3.out << one.out;
}

// --save from a split model is the 1-process model: greedy samples from both agree.
TEST(GptCheckpoint, SaveFromAMeshFeedsGenerate) {
  fs::path dir = scratch("save_generate");
  const std::string one = (dir / "one.dtrn").string(), mesh = (dir / "mesh.dtrn").string();
  Result a = dtrain::testing::run_command(bin() + small_gpt(dir, "a.jsonl") + " --save " + one);
  ASSERT_EQ(a.code, 0) << a.out;
  Result b = dtrain::testing::run_command(bin() + " launch --nproc 4 -- " + bin() +
                                          small_gpt(dir, "b.jsonl") +
                                          " --parallel tp=2,pp=2 --save " + mesh);
  ASSERT_EQ(b.code, 0) << b.out;
  const std::string gen = " generate --prompt 'The ' --tokens 24 --top-k 1 --ckpt ";
  Result ga = dtrain::testing::run_command(bin() + gen + one + " 2>/dev/null");
  Result gb = dtrain::testing::run_command(bin() + gen + mesh + " 2>/dev/null");
  ASSERT_EQ(ga.code, 0) << ga.out;
  ASSERT_EQ(gb.code, 0) << gb.out;
  EXPECT_EQ(ga.out.rfind("The ", 0), 0u) << ga.out;
  EXPECT_GE(ga.out.size(), 28u) << ga.out;
  EXPECT_EQ(ga.out, gb.out);
  Result bad = dtrain::testing::run_command(bin() + gen + (dir / "nope.dtrn").string());
  EXPECT_NE(bad.code, 0);
  EXPECT_TRUE(contains(bad.out, "nope.dtrn")) << bad.out;
}

// A checkpoint that does not fit, a corrupt shard, a missing name: one line each,
// non-zero, and the checkpoints stay as they were.
TEST(GptCheckpoint, BadCheckpointsAreRefused) {
  fs::path dir = scratch("bad_ckpt");
  Result a = dtrain::testing::run_command(bin() + small_gpt(dir, "a.jsonl", 4));
  ASSERT_EQ(a.code, 0) << a.out;
  const fs::path ck = dir / "ckpt" / "step-00000004";
  Result shape =
      dtrain::testing::run_command(bin() + small_gpt(dir, "b.jsonl", 20, 32) + " --resume auto");
  EXPECT_NE(shape.code, 0);
  EXPECT_TRUE(contains(shape.out, "\"n_embd\":64")) << shape.out;
  Result missing =
      dtrain::testing::run_command(bin() + small_gpt(dir, "b.jsonl") + " --resume step-00000099");
  EXPECT_NE(missing.code, 0);
  EXPECT_TRUE(contains(missing.out, "--resume step-00000099: no checkpoint")) << missing.out;
  const fs::path shard = ck / "shard-0.dtrn";
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(shard) - 8));
    f.put('\x5a');
  }
  Result corrupt =
      dtrain::testing::run_command(bin() + small_gpt(dir, "b.jsonl") + " --resume auto");
  EXPECT_NE(corrupt.code, 0);
  EXPECT_TRUE(contains(corrupt.out, "shard-0.dtrn")) << corrupt.out;
  EXPECT_TRUE(fs::exists(ck / "manifest.json"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir / "ckpt"), fs::directory_iterator{}), 1);
}

}  // namespace
