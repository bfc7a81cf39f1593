// BatchNorm2d, ReLU6 and GlobalAvgPool2d: f64 gradient checks in training and eval
// mode; torch.nn.BatchNorm2d's outputs, gradients and running statistics for the same
// input (tests/batchnorm_torch.py, run with the system python3 and its torch); the
// running statistics as module buffers through state_dict; SyncBatchNorm with two
// ranks holding half the batch each against one rank holding all of it.
#include <gtest/gtest.h>

#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/batch_norm.h"
#include "dtrain/engine/nn/batchnorm.h"
#include "dtrain/engine/ops.h"
#include "dtrain/parallel/sync_batchnorm.h"
#include "gradcheck.h"
#include "rank_threads.h"
#include "subprocess.h"

namespace dtrain {
namespace {

using testing::gradcheck;
using testing::max_rel_error;
using testing::randn;

TEST(BatchNorm, GradcheckTrainingAndEval) {
  Generator gen(1);
  Tensor x = randn({3, 4, 5, 3}, gen).set_requires_grad(true);
  Tensor w = randn({4}, gen).set_requires_grad(true);
  Tensor b = randn({4}, gen).set_requires_grad(true);
  for (bool training : {true, false}) {
    Tensor rm = randn({4}, gen, DType::f64, 0.1);
    Tensor rv = testing::uniform({4}, gen, 0.5, 2.0, DType::f64);
    gradcheck(
        training ? "batch_norm2d train" : "batch_norm2d eval",
        [&](auto& in) { return batch_norm2d(in[0], in[1], in[2], rm, rv, {.training = training}); },
        {x, w, b});
  }
}

TEST(BatchNorm, Relu6AndGlobalAvgPoolGradcheck) {
  Generator gen(2);
  Tensor x = testing::uniform({2, 3, 4, 5}, gen, -3.0, 9.0).set_requires_grad(true);
  gradcheck("relu6", [](auto& in) { return relu6(in[0]); }, {x});
  Tensor y = relu6(x);
  for (double v : y.to_vector<double>()) EXPECT_TRUE(v >= 0 && v <= 6) << v;
  nn::GlobalAvgPool2d pool;
  gradcheck("global avg pool", [&](auto& in) { return pool(in[0]); }, {x});
  EXPECT_EQ(pool(x).shape(), (Shape{2, 3, 1, 1}));
}

std::map<std::string, std::vector<double>> torch_fixture() {
  testing::CommandResult r = testing::run_command(
      std::string("/usr/bin/python3 ") + DTRAIN_TESTS_DIR + "/batchnorm_torch.py", 120);
  EXPECT_EQ(r.code, 0) << r.out;
  std::map<std::string, std::vector<double>> out;
  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream in(line);
    std::string name;
    in >> name;
    for (double v; in >> v;) out[name].push_back(v);
  }
  return out;
}

Tensor t64(const std::vector<double>& v, const Shape& s) { return from_vector<double>(v, s); }

TEST(BatchNorm, MatchesTorchTrainEvalAndRunningStats) {
  auto f = torch_fixture();
  ASSERT_EQ(f["x"].size(), 3u * 4 * 5 * 3);
  const Shape xs{3, 4, 5, 3}, cs{4};
  // The functional op in f64 (to 1e-10 of torch's float64), then the f32 module.
  nn::BatchNorm2d bn(4);
  bn.load_state_dict({{"weight", t64(f["weight"], cs).to(DType::f32)},
                      {"bias", t64(f["bias"], cs).to(DType::f32)},
                      {"running_mean", zeros(cs)},
                      {"running_var", ones(cs)}});
  Tensor x = t64(f["x"], xs), w = t64(f["weight"], cs).set_requires_grad(true);
  Tensor b = t64(f["bias"], cs).set_requires_grad(true),
         rm = zeros(cs, TensorOptions{}.with_dtype(DType::f64));
  Tensor rv = ones(cs, TensorOptions{}.with_dtype(DType::f64));
  Tensor xr = x.clone().set_requires_grad(true);
  Tensor y = batch_norm2d(xr, w, b, rm, rv, {.training = true});
  std::vector<Tensor> g = grad({y}, {xr, w, b}, {t64(f["dy"], xs)});
  EXPECT_LE(max_rel_error(y, t64(f["y_train"], xs)), 1e-10);
  EXPECT_LE(max_rel_error(g[0], t64(f["dx"], xs)), 1e-10);
  EXPECT_LE(max_rel_error(g[1], t64(f["dweight"], cs)), 1e-10);
  EXPECT_LE(max_rel_error(g[2], t64(f["dbias"], cs)), 1e-10);
  EXPECT_LE(max_rel_error(rm, t64(f["running_mean1"], cs)), 1e-12);
  EXPECT_LE(max_rel_error(rv, t64(f["running_var1"], cs)), 1e-12);
  Tensor y2 = batch_norm2d(x * 2.0 + 1.0, w, b, rm, rv, {.training = true});
  EXPECT_LE(max_rel_error(y2, t64(f["y_train2"], xs)), 1e-10);
  EXPECT_LE(max_rel_error(rm, t64(f["running_mean2"], cs)), 1e-12);
  EXPECT_LE(max_rel_error(rv, t64(f["running_var2"], cs)), 1e-12);
  Tensor ye = batch_norm2d(x, w, b, rm, rv, {.training = false});
  EXPECT_LE(max_rel_error(ye, t64(f["y_eval"], xs)), 1e-10);
  EXPECT_LE(max_rel_error(rm, t64(f["running_mean2"], cs)), 0.0) << "eval changed the stats";

  // The f32 module: same numbers to f32 precision, the stats as buffers in state_dict.
  Tensor xf = x.to(DType::f32);
  bn.train();
  bn(xf);
  bn(xf * 2.0 + 1.0);
  nn::StateDict sd = bn.state_dict();
  ASSERT_EQ(sd.count("running_mean"), 1u);
  EXPECT_LE(max_rel_error(sd["running_mean"], t64(f["running_mean2"], cs)), 1e-6);
  EXPECT_LE(max_rel_error(sd["running_var"], t64(f["running_var2"], cs)), 1e-6);
  bn.eval();
  EXPECT_LE(max_rel_error(bn(xf), t64(f["y_eval"], xs)), 1e-5);
}

TEST(BatchNorm, TrainingWithOneValuePerChannelIsAnError) {
  Tensor rm = zeros({2}), rv = ones({2});
  EXPECT_THROW(batch_norm2d(zeros({1, 2, 1, 1}), ones({2}), zeros({2}), rm, rv, {}),
               InvalidArgument);
  nn::BatchNorm2d bn(3);
  EXPECT_THROW(bn(zeros({2, 4, 3, 3})), ShapeError);
}

// One BatchNorm2d step on x with upstream gradient dy: output, input gradient, weight
// and bias gradients, running stats.
struct BnStep {
  Tensor y, dx, dw, db, rm, rv;
};

BnStep bn_step(nn::BatchNorm2d& bn, const Tensor& x, const Tensor& dy) {
  Tensor xr = x.clone().set_requires_grad(true);
  Tensor y = bn(xr);
  std::vector<Tensor> g = grad({y}, {xr, bn.weight, bn.bias}, {dy});
  return {y.detach(), g[0], g[1], g[2], bn.running_mean.clone(), bn.running_var.clone()};
}

TEST(SyncBatchNorm, TwoRanksWithHalfTheBatchEqualOneRankWithAll) {
  Generator gen(9);
  const Shape xs{6, 3, 4, 5};
  Tensor x = randn(xs, gen, DType::f32, 2.0) + 0.5, dy = randn(xs, gen);
  Tensor w = randn({3}, gen), b = randn({3}, gen);
  auto make_bn = [&] {
    auto bn = std::make_shared<nn::BatchNorm2d>(3);
    NoGradGuard ng;
    bn->weight.copy_(w);
    bn->bias.copy_(b);
    return bn;
  };
  auto full_bn = make_bn();
  BnStep full = bn_step(*full_bn, x, dy);
  std::vector<BnStep> half(2);
  testing::run_tcp_ranks(2, "syncbn", [&](int rank, comm::Communicator& c) {
    auto bn = make_bn();
    EXPECT_EQ(parallel::convert_sync_batchnorm(*bn, c), 1);
    half[static_cast<size_t>(rank)] =
        bn_step(*bn, x.narrow(0, 3 * rank, 3).contiguous(), dy.narrow(0, 3 * rank, 3).contiguous());
  });
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const BnStep& h = half[static_cast<size_t>(r)];
    ASSERT_TRUE(h.y.defined());
    EXPECT_LE(max_rel_error(h.y, full.y.narrow(0, 3 * r, 3)), 1e-5);
    EXPECT_LE(max_rel_error(h.dx, full.dx.narrow(0, 3 * r, 3)), 1e-5);
    EXPECT_LE(max_rel_error(h.rm, full.rm), 1e-6);
    EXPECT_LE(max_rel_error(h.rv, full.rv), 1e-6);
  }
  // Parameter gradients stay local: their sum over ranks (DDP's all-reduce) is the whole's.
  EXPECT_LE(max_rel_error(half[0].dw + half[1].dw, full.dw), 1e-5);
  EXPECT_LE(max_rel_error(half[0].db + half[1].db, full.db), 1e-5);
  // Without the sync the halves' statistics differ (the test can fail).
  auto local = make_bn();
  BnStep l = bn_step(*local, x.narrow(0, 0, 3).contiguous(), dy.narrow(0, 0, 3).contiguous());
  EXPECT_GT(max_rel_error(l.rm, full.rm), 1e-3);
}

}  // namespace
}  // namespace dtrain
