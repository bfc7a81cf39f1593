// The mobilenet model end to end: `dtrain train --model mobilenet` on the MNIST subset
// lowers the loss below a stated bound, the --save checkpoint carries every
// BatchNorm2d's running statistics (which training moved), eval mode is
// deterministic and independent of the batch (train mode is not), a checkpoint
// round trip keeps the statistics, and a bad group count is one clear error.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/batchnorm.h"
#include "dtrain/engine/nn/mobilenet.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/serialize.h"
#include "gradcheck.h"
#include "subprocess.h"

namespace dtrain {
namespace {

namespace fs = std::filesystem;
using testing::max_rel_error;

std::vector<std::shared_ptr<nn::BatchNorm2d>> batchnorms(const nn::Module& m) {
  std::vector<std::shared_ptr<nn::BatchNorm2d>> out;
  for (const auto& c : m.children()) {
    if (auto bn = std::dynamic_pointer_cast<nn::BatchNorm2d>(c)) out.push_back(bn);
  }
  return out;
}

TEST(MobileNet, StructureParametersAndMultiplyAdds) {
  Generator gen(1);
  auto m = nn::make_model("mobilenet", gen);
  EXPECT_EQ(batchnorms(*m).size(), 11u);  // stem + 5 blocks x 2
  // By hand: stem 144 + 32; blocks 752, 2528, 4928, 9152, 18048; linear 1290.
  EXPECT_EQ(m->num_parameters(), 36874);
  // stem 28*28*16*9; per block dw + pw; linear 128*10.
  int64_t macs = 28 * 28 * 16 * 9 + (28 * 28 * 16 * 9 + 28 * 28 * 16 * 32) +
                 (14 * 14 * 32 * 9 + 14 * 14 * 32 * 64) + (14 * 14 * 64 * 9 + 14 * 14 * 64 * 64) +
                 (7 * 7 * 64 * 9 + 7 * 7 * 64 * 128) + (7 * 7 * 128 * 9 + 7 * 7 * 128 * 128) + 1280;
  EXPECT_EQ(nn::count_multiply_adds(*m, {1, 28, 28}, DType::f32), macs);
  EXPECT_TRUE(m->is_training()) << "count_multiply_adds must restore the mode";
}

TEST(MobileNet, TrainsAndCheckpointKeepsRunningStats) {
  fs::path dir = testing::scratch_dir("dtrain_test_mobilenet", "train");
  fs::path metrics = dir / "metrics.jsonl", ckpt = dir / "final.dtrn";
  testing::CommandResult r = testing::run_command(
      std::string(DTRAIN_BIN) + " train --no-progress --model mobilenet --data-cache " +
          DTRAIN_DATA_CACHE + " --max-steps 40 --batch 32 --lr 0.1 --log-every 5 --metrics " +
          metrics.string() + " --save " + ckpt.string(),
      120);
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream in(metrics);
  std::vector<double> losses;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) losses.push_back(j["loss"].get<double>());
  }
  ASSERT_EQ(losses.size(), 8u) << r.out;
  // Chance is ln 10 = 2.30; 40 steps of 32 reach ~1.8 (seed 1).
  EXPECT_LT(losses.back(), 1.95) << r.out;
  EXPECT_GT(losses.front(), 2.1) << r.out;

  Generator gen(2);  // other initial weights: the checkpoint must overwrite them all
  auto m = nn::make_model("mobilenet", gen);
  load_checkpoint(ckpt.string(), *m, nullptr);
  Archive a = load_archive(ckpt.string());
  auto bns = batchnorms(*m);
  ASSERT_FALSE(bns.empty());
  for (const auto& bn : bns) {
    SCOPED_TRACE(bn->name());
    Tensor saved = a.tensors.at("model." + bn->name() + ".running_var");
    EXPECT_EQ(max_rel_error(bn->running_var, saved), 0.0);
    EXPECT_GT(max_rel_error(bn->running_var, ones(bn->running_var.shape())), 1e-3)
        << "training did not move the running variance";
  }
  // Round trip: save the loaded model, load into a third one: the same stats.
  save_checkpoint((dir / "again.dtrn").string(), *m, nullptr);
  Generator gen3(3);
  auto m3 = nn::make_model("mobilenet", gen3);
  load_checkpoint((dir / "again.dtrn").string(), *m3, nullptr);
  for (size_t i = 0; i < bns.size(); ++i) {
    EXPECT_EQ(max_rel_error(batchnorms(*m3)[i]->running_mean, bns[i]->running_mean), 0.0);
  }

  // Eval: deterministic and per-sample (a sample's logits do not depend on its batch).
  NoGradGuard ng;
  Generator dg(4);
  Tensor x = testing::randn({4, 1, 28, 28}, dg);
  m->eval();
  Tensor y = m->forward(x), y_again = m->forward(x);
  EXPECT_EQ(max_rel_error(y, y_again), 0.0);
  EXPECT_LE(max_rel_error(m->forward(x.narrow(0, 0, 2)), y.narrow(0, 0, 2)), 1e-5);
  m3->eval();
  EXPECT_EQ(max_rel_error(m3->forward(x), y), 0.0) << "the reloaded model differs in eval mode";
  m->train();
  Tensor t = m->forward(x);
  EXPECT_GT(max_rel_error(m->forward(x.narrow(0, 0, 2)), t.narrow(0, 0, 2)), 1e-4)
      << "train mode should use the batch statistics";
}

TEST(MobileNet, GroupsNotDividingChannelsIsOneError) {
  Generator gen(1);
  try {
    nn::Conv2d conv(nn::Conv2dOptions(6, 8, 3).groups(4), gen);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("groups 4 must divide in channels 6 and out channels 8"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace dtrain
