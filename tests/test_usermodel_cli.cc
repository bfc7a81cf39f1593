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

#include "dtrain/engine/data/image_folder.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/data/records.h"
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
      r.out.find(f.string() + ":2: layer 1 (linear): in = 500, but the previous layer gives 784"),
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

// The same 320 generated digits as an image folder (class folders "0".."9") and as
// a record file in the folder's order (class, then file name).
struct SameDigits {
  fs::path folder, records;
};
SameDigits same_digits() {
  fs::path root = dtrain::testing::scratch_dir("dtrain_test_usermodel_cli", "same_digits");
  auto d = dtrain::data::generate_synthetic_digits(320, 10, 9).train;
  std::vector<std::vector<int64_t>> by_class(10);
  for (int64_t i = 0; i < d.labels.size(0); ++i) by_class[d.labels.data<uint8_t>()[i]].push_back(i);
  dtrain::Tensor img =
      dtrain::empty({320, 1, 28, 28}, dtrain::TensorOptions{}.with_dtype(dtrain::DType::u8));
  dtrain::Tensor lab = dtrain::empty({320}, dtrain::TensorOptions{}.with_dtype(dtrain::DType::i64));
  int64_t row = 0;
  for (int64_t c = 0; c < 10; ++c) {
    fs::create_directories(root / "folder" / std::to_string(c));
    for (size_t k = 0; k < by_class[c].size(); ++k, ++row) {
      const uint8_t* px = d.images.data<uint8_t>() + by_class[c][k] * 784;
      dtrain::data::Image im{1, 28, 28, std::vector<uint8_t>(px, px + 784)};
      char name[16];
      std::snprintf(name, sizeof(name), "%04zu.pgm", k);
      dtrain::data::write_pnm((root / "folder" / std::to_string(c) / name).string(), im);
      std::copy(px, px + 784, img.data<uint8_t>() + row * 784);
      lab.data<int64_t>()[row] = c;
    }
  }
  dtrain::data::write_records((root / "digits.rec").string(), img, lab, 10);
  return {root / "folder", root / "digits.rec"};
}

std::vector<double> losses_on(const std::string& data, const std::string& tag) {
  fs::path metrics = dtrain::testing::scratch_dir("dtrain_test_usermodel_cli", tag) / "m.jsonl";
  auto r = run("train --data " + data + " --max-steps 4 --log-every 1 --batch 32 --no-progress " +
               "--metrics " + metrics.string());
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("test accuracy"), std::string::npos) << r.out;
  std::vector<double> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss") && j.contains("step")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

TEST(UserModelCli, ImageFolderAndRecordsOfTheSameImagesTrainTheSame) {
  SameDigits d = same_digits();
  auto folder = losses_on("imagefolder:" + d.folder.string(), "folder");
  ASSERT_EQ(folder.size(), 4u);
  EXPECT_EQ(losses_on("records:" + d.records.string(), "records"), folder);
}

TEST(UserModelCli, WrongSizeImageIsOneClearError) {
  SameDigits d = same_digits();
  fs::path odd = d.folder / "3" / "9999.pgm";
  dtrain::data::write_pnm(odd.string(), {1, 32, 32, std::vector<uint8_t>(1024, 0)});
  auto r = run("train --data imagefolder:" + d.folder.string() + " --max-steps 1");
  fs::remove(odd);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find(odd.string() + " is 1x32x32 (CxHxW), but "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("is 1x28x28 (CxHxW)"), std::string::npos) << r.out;
}

}  // namespace
