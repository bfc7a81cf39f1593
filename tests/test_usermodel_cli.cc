// `dtrain train --model FILE.json` and `--augment` end to end: a file equal to seed-cnn
// logs the same losses as --model seed-cnn for the same seed; a bad file and a bad
// --augment fail before training with the layer/item named; an augmented run logs
// the same losses for any --augment-threads and different ones from a plain run.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dtrain/engine/data/mnist.h"
#include "subprocess.h"

namespace fs = std::filesystem;

namespace {

dtrain::testing::CommandResult run(const std::string& args) {
  return dtrain::testing::run_command(std::string(DTRAIN_BIN) + " " + args, 120);
}

fs::path digits() {
  fs::path dir = dtrain::testing::scratch_dir("dtrain_test_usermodel_cli", "digits");
  dtrain::data::write_mnist_folder(dir.string(),
                                   dtrain::data::generate_synthetic_digits(512, 128, 5));
  return dir;
}

// The per-step losses of a short run (its metrics file).
std::vector<double> losses(const std::string& extra, const std::string& tag) {
  fs::path metrics = dtrain::testing::scratch_dir("dtrain_test_usermodel_cli", tag) / "m.jsonl";
  auto r = run("train --data " + digits().string() +
               " --max-steps 4 --log-every 1 --batch 32 --no-progress --seed 3 --metrics " +
               metrics.string() + " " + extra);
  EXPECT_EQ(r.code, 0) << r.out;
  std::vector<double> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss") && j.contains("step")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

TEST(UserModelCli, ModelFileEqualToSeedCnnTrainsTheSame) {
  std::string file = std::string(DTRAIN_SOURCE_DIR) + "/examples/models/seed-cnn.json";
  auto builtin = losses("--model seed-cnn", "builtin");
  ASSERT_EQ(builtin.size(), 4u);
  EXPECT_EQ(losses("--model " + file, "file"), builtin);
}

TEST(UserModelCli, BadModelFileNamesTheLayer) {
  fs::path f = dtrain::testing::scratch_dir("dtrain_test_usermodel_cli", "bad") / "bad.json";
  std::ofstream(f) << R"({"input":[1,28,28],"classes":10,"layers":[{"type":"flatten"},
      {"type":"linear","in":500,"out":10}]})";
  auto r = run("train --model " + f.string() + " --data " + digits().string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(
      r.out.find(f.string() + ": layer 1 (linear): in = 500, but the previous layer gives 784"),
      std::string::npos)
      << r.out;
  r = run("train --augment crop:2,swirl --data " + digits().string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("unknown or malformed item 'swirl'"), std::string::npos) << r.out;
}

TEST(UserModelCli, AugmentedRunIsTheSameForAnyThreadCount) {
  auto one = losses("--augment crop:2,flip,rotate:10 --augment-threads 1", "aug1");
  ASSERT_EQ(one.size(), 4u);
  EXPECT_EQ(losses("--augment crop:2,flip,rotate:10 --augment-threads 3", "aug3"), one);
  EXPECT_NE(losses("", "plain"), one);
}

}  // namespace
