// End-to-end tests of `dtrain prune`, `dtrain quantize` and `dtrain distill` on a
// small generated MNIST folder: a good run of each (checked against the engine: the
// written checkpoint's sparsity and masks), and bad input (a sparsity outside
// [0,1), fewer than one calibration batch, a teacher checkpoint of another model).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "dtrain/engine/compress/prune.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/serialize.h"
#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace fs = std::filesystem;

namespace {

using dtrain::testing::CommandResult;

CommandResult run(const std::string& args) {
  return dtrain::testing::run_command(std::string(DTRAIN_BIN) + " " + args, 120);
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// A generated MNIST folder and a checkpoint of `model` trained briefly on it.
struct Fixture {
  fs::path dir, data, ckpt;
};

Fixture make_fixture(const std::string& name, const std::string& model) {
  Fixture f;
  f.dir = dtrain::testing::scratch_dir("dtrain_test_compress_cli", name);
  f.data = f.dir / "mnist";
  dtrain::data::write_mnist_folder(f.data.string(),
                                   dtrain::data::generate_synthetic_digits(512, 128, 3));
  f.ckpt = f.dir / (model + ".ckpt");
  CommandResult r = run("train --model " + model + " --data " + f.data.string() +
                        " --epochs 1 --max-steps 8 --no-progress --metrics " +
                        (f.dir / "m.jsonl").string() + " --save " + f.ckpt.string());
  EXPECT_EQ(r.code, 0) << r.out;
  return f;
}

TEST(CompressCli, PruneReachesTheSparsityAndKeepsTheMaskThroughFineTuning) {
  Fixture f = make_fixture("prune", "mlp");
  fs::path out = f.dir / "pruned.ckpt";
  CommandResult r = run("prune --ckpt " + f.ckpt.string() + " --sparsity 0.75 --global --out " +
                        out.string() + " --finetune-steps 5 --data " + f.data.string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "fine-tuned 5 steps")) << r.out;
  dtrain::Generator gen(0);
  auto model = dtrain::nn::make_model("mlp", gen);
  auto extra = dtrain::load_checkpoint(out.string(), *model, nullptr);
  auto report = dtrain::compress::weight_sparsity(*model);
  EXPECT_EQ(report.zeros, report.total * 3 / 4);
  auto masks = dtrain::compress::PruneMasks::from_json(extra.at("prune"), *model);
  int64_t masked = 0;
  for (const auto& [n, m] : masks.masks()) {
    for (float v : m.to_vector<float>()) masked += v == 0.0f;
  }
  EXPECT_EQ(masked, report.zeros);  // exactly the masked weights are zero
}

TEST(CompressCli, PruneRejectsASparsityOutsideZeroOne) {
  Fixture f = make_fixture("prune_bad", "mlp");
  for (const char* s : {"1", "-0.5", "1.5"}) {
    CommandResult r = run("prune --ckpt " + f.ckpt.string() + " --sparsity " + s + " --out " +
                          (f.dir / "x.ckpt").string() + " --data " + f.data.string());
    EXPECT_EQ(r.code, 1) << r.out;
    EXPECT_TRUE(contains(r.out, "--sparsity must be in [0, 1)")) << r.out;
    EXPECT_FALSE(fs::exists(f.dir / "x.ckpt"));
  }
}

TEST(CompressCli, QuantizePrintsBothAccuraciesAndRejectsZeroCalibrationBatches) {
  Fixture f = make_fixture("quant", "mlp");
  CommandResult ok = run("quantize --ckpt " + f.ckpt.string() +
                         " --calib-batches 2 --iters 3 --data " + f.data.string());
  ASSERT_EQ(ok.code, 0) << ok.out;
  EXPECT_TRUE(contains(ok.out, "int8 speed-up")) << ok.out;
  EXPECT_TRUE(contains(ok.out, "int8 path: int8 graph")) << ok.out;
  CommandResult bad =
      run("quantize --ckpt " + f.ckpt.string() + " --calib-batches 0 --data " + f.data.string());
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_TRUE(contains(bad.out, "--calib-batches must be >= 1, got 0")) << bad.out;
}

// The accuracy `dtrain infer` prints ("accuracy 0.1234 (").
double printed_accuracy(const std::string& out) {
  size_t at = out.find("accuracy ");
  return at == std::string::npos ? -1.0 : std::stod(out.substr(at + 9));
}

TEST(CompressCli, InferInt8RunsTheInt8GraphNearTheF32Accuracy) {
  Fixture f = make_fixture("infer_int8", "seed-cnn");
  const std::string base =
      "infer --model seed-cnn --ckpt " + f.ckpt.string() + " --data " + f.data.string();
  CommandResult f32 = run(base);
  CommandResult i8 = run(base + " --int8 --calib-batches 2 --batch 64");
  ASSERT_EQ(f32.code, 0) << f32.out;
  ASSERT_EQ(i8.code, 0) << i8.out;
  EXPECT_TRUE(contains(i8.out, "int8 (int8 graph, calibrated on 2 batches")) << i8.out;
  EXPECT_GE(printed_accuracy(f32.out), 0.0) << f32.out;
  EXPECT_NEAR(printed_accuracy(i8.out), printed_accuracy(f32.out), 0.02) << i8.out << f32.out;
  CommandResult bad = run(base + " --int8 --calib-batches 0");
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_TRUE(contains(bad.out, "--calib-batches must be >= 1, got 0")) << bad.out;
}

TEST(CompressCli, DistillRejectsATeacherCheckpointOfAnotherModel) {
  Fixture f = make_fixture("distill", "mlp");
  CommandResult r =
      run("distill --teacher " + f.ckpt.string() +
          " --teacher-model seed-cnn --student-model mlp --max-steps 3 --data " + f.data.string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "holds model 'mlp', not 'seed-cnn'")) << r.out;
  CommandResult ok =
      run("distill --teacher " + f.ckpt.string() +
          " --teacher-model mlp --student-model mlp --max-steps 3 --data " + f.data.string());
  EXPECT_EQ(ok.code, 0) << ok.out;
  EXPECT_TRUE(contains(ok.out, "same student trained alone")) << ok.out;
}

}  // namespace
