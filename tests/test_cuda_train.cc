// Training on the GPU end to end: nn::Module::to moving a model in place, SGD steps of
// the mlp on cuda against the same steps on the CPU, a checkpoint saved from a device
// model and loaded back, DDP over the nccl backend on two GPUs against one process,
// and the dtrain binary's one-line errors for --device cuda / --backend nccl.
//
// Without a GPU the GPU tests skip with the driver's reason; the CPU tests (Module::to
// of a CPU model, the CLI errors) run everywhere.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/checkpoint.h"
#include "dtrain/engine/cuda/runtime.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/random.h"
#include "subprocess.h"
#ifdef DTRAIN_TEST_NCCL
#include "dtrain/comm/nccl.h"
#include "dtrain/comm/store.h"
#include "dtrain/parallel/ddp.h"
#endif

namespace dtrain {
namespace {

#define REQUIRE_GPUS(n)                                                                        \
  do {                                                                                         \
    if (cuda::device_count() < (n)) {                                                          \
      GTEST_SKIP() << "needs " << (n) << " CUDA device(s), found " << cuda::device_count()     \
                   << (cuda::device_count() == 0 ? ": no CUDA device: " + cuda::device_error() \
                                                 : std::string());                             \
    }                                                                                          \
  } while (0)

// An MNIST-shaped batch: [n,784] inputs in [0,1), labels 0..9.
std::pair<Tensor, Tensor> batch(int64_t n, uint64_t seed) {
  Generator g(seed);
  std::vector<float> x(static_cast<size_t>(n * 784));
  for (float& v : x) v = g.uniform_float();
  std::vector<int64_t> y(static_cast<size_t>(n));
  for (int64_t& v : y) v = static_cast<int64_t>(g.next_u32() % 10);
  return {from_vector<float>(x, {n, 784}), from_vector<int64_t>(y, {n})};
}

std::vector<float> host_values(const Tensor& t) {
  Tensor h = t.to(Device::cpu()).contiguous();
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  std::vector<float> x = host_values(a), y = host_values(b);
  EXPECT_EQ(x.size(), y.size());
  double m = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
    m = std::max(m, static_cast<double>(std::fabs(x[i] - y[i])));
  }
  return m;
}

std::shared_ptr<nn::Module> mlp(uint64_t seed) {
  Generator gen(seed);
  return nn::make_model("mlp", gen);
}

// ---- CPU ----

TEST(ModuleTo, CpuIsANoOpThatKeepsIdentity) {
  auto model = mlp(3);
  std::vector<Tensor> before = model->parameters();
  std::vector<void*> data;
  for (const Tensor& p : before) data.push_back(p.raw_data());
  model->to(Device::cpu());
  std::vector<Tensor> after = model->parameters();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_TRUE(after[i].is_same(before[i])) << i;
    EXPECT_EQ(after[i].raw_data(), data[i]) << i;
    EXPECT_TRUE(after[i].is_leaf());
    EXPECT_TRUE(after[i].requires_grad());
  }
  // An optimizer built before the call still trains the model.
  optim::SGD opt(before, optim::SGDOptions(0.1));
  auto [x, y] = batch(8, 1);
  std::vector<float> w0 = host_values(after[0]);
  cross_entropy(model->forward(x), y).backward();
  opt.step();
  EXPECT_NE(host_values(model->parameters()[0]), w0);
}

TEST(ModuleTo, MissingDeviceIsATypedError) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  auto model = mlp(3);
  std::vector<float> w0 = host_values(model->parameters()[0]);
  EXPECT_THROW(model->to(Device::cuda(0)), UnsupportedError);
  EXPECT_TRUE(model->parameters()[0].device().is_cpu());  // nothing moved
  EXPECT_EQ(host_values(model->parameters()[0]), w0);
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

TEST(TrainCudaCli, BackendNcclOnTheCpuIsOneLine) {
  testing::CommandResult r = testing::run_command(
      std::string(DTRAIN_BIN) + " train --backend nccl --epochs 1 --max-steps 1", 120);
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find("--backend nccl"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--device cuda"), std::string::npos) << r.out;
}

TEST(TrainCudaCli, HostBackendWithCudaIsOneLine) {
  testing::CommandResult r = testing::run_command(
      std::string(DTRAIN_BIN) + " train --device cuda --backend tcp --epochs 1", 120);
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find("--backend tcp moves host memory"), std::string::npos) << r.out;
}

TEST(TrainCudaCli, BackendNcclWithoutGpuIsOneLine) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  testing::CommandResult r = testing::run_command(
      std::string(DTRAIN_BIN) + " train --device cuda --backend nccl --epochs 1", 120);
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find("no CUDA device: " + cuda::device_error()), std::string::npos) << r.out;
}

TEST(TrainCudaCli, UnknownBackendIsOneLine) {
  testing::CommandResult r = testing::run_command(
      std::string(DTRAIN_BIN) + " train --backend gloo --epochs 1 --max-steps 1", 120);
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find("expected auto, tcp, mpi or nccl"), std::string::npos) << r.out;
}

// ---- GPU ----

TEST(ModuleTo, MovesParametersInPlace) {
  REQUIRE_GPUS(1);
  auto model = mlp(3);
  auto reference = mlp(3);
  std::vector<Tensor> before = model->parameters();
  optim::SGD opt(before, optim::SGDOptions(0.1));  // built before the move on purpose
  model->to(Device::cuda(0));
  std::vector<Tensor> after = model->parameters();
  std::vector<Tensor> ref = reference->parameters();
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_TRUE(after[i].is_same(before[i])) << i;
    EXPECT_TRUE(after[i].device().is_cuda()) << i;
    EXPECT_TRUE(after[i].is_leaf() && after[i].requires_grad()) << i;
    EXPECT_EQ(max_abs_diff(after[i], ref[i]), 0.0) << i;  // a copy, bit for bit
  }
  auto [x, y] = batch(8, 1);
  cross_entropy(model->forward(x.to(Device::cuda(0))), y.to(Device::cuda(0))).backward();
  EXPECT_TRUE(before[0].grad().defined());
  EXPECT_TRUE(before[0].grad().device().is_cuda());
  opt.step();
  EXPECT_GT(max_abs_diff(after[0], ref[0]), 0.0);
  model->to(Device::cpu());  // and back, gradients included
  EXPECT_TRUE(before[0].device().is_cpu());
  EXPECT_TRUE(before[0].grad().device().is_cpu());
}

TEST(CudaTrain, MlpSgdStepsMatchTheCpu) {
  REQUIRE_GPUS(1);
  const Device gpu = Device::cuda(0);
  auto cpu_model = mlp(11);
  auto gpu_model = mlp(11);
  gpu_model->to(gpu);
  auto opts = optim::SGDOptions(0.05).momentum(0.9);
  optim::SGD cpu_opt(cpu_model->parameters(), opts);
  optim::SGD gpu_opt(gpu_model->parameters(), opts);
  for (int step = 0; step < 5; ++step) {
    auto [x, y] = batch(32, 100 + static_cast<uint64_t>(step));
    cpu_opt.zero_grad();
    gpu_opt.zero_grad();
    Tensor lc = cross_entropy(cpu_model->forward(x), y);
    Tensor lg = cross_entropy(gpu_model->forward(x.to(gpu)), y.to(gpu));
    EXPECT_NEAR(lg.item(), lc.item(), 1e-4) << "step " << step;
    lc.backward();
    lg.backward();
    cpu_opt.step();
    gpu_opt.step();
  }
  std::vector<Tensor> pc = cpu_model->parameters(), pg = gpu_model->parameters();
  for (size_t i = 0; i < pc.size(); ++i) EXPECT_LT(max_abs_diff(pc[i], pg[i]), 1e-4) << i;
}

TEST(CudaTrain, CheckpointFromADeviceModelLoadsBack) {
  REQUIRE_GPUS(1);
  const Device gpu = Device::cuda(0);
  auto model = mlp(5);
  model->to(gpu);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.05).momentum(0.9));
  for (int step = 0; step < 2; ++step) {
    auto [x, y] = batch(16, 7 + static_cast<uint64_t>(step));
    opt.zero_grad();
    cross_entropy(model->forward(x.to(gpu)), y.to(gpu)).backward();
    opt.step();
  }
  ckpt::CheckpointStore store(testing::scratch_dir("dtrain_test_cuda_train", "ckpt").string());
  ckpt::Manifest m;
  m.name = ckpt::checkpoint_name(2);
  m.step = 2;
  m.epoch = 0;
  m.world_size = 1;
  m.config = {{"model", "mlp"}};
  ckpt::TrainingState s;
  s.model = model.get();
  s.optimizer = &opt;
  s.step = 2;
  m.shards.push_back(ckpt::write_shard(store, m.name, s, 0, 1));
  store.commit(m, 0);

  // Into a fresh device model (and its optimizer), then one more step on both.
  auto loaded = mlp(99);
  loaded->to(gpu);
  optim::SGD opt2(loaded->parameters(), optim::SGDOptions(0.05).momentum(0.9));
  ckpt::TrainingState s2;
  s2.model = loaded.get();
  s2.optimizer = &opt2;
  ckpt::load(store, store.read_manifest(m.name), s2, 0, 1);
  std::vector<Tensor> a = model->parameters(), b = loaded->parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(b[i].device().is_cuda());
    EXPECT_EQ(max_abs_diff(a[i], b[i]), 0.0) << i;
  }
  auto [x, y] = batch(16, 9);
  for (auto* pair : {&opt, &opt2}) pair->zero_grad();
  cross_entropy(model->forward(x.to(gpu)), y.to(gpu)).backward();
  cross_entropy(loaded->forward(x.to(gpu)), y.to(gpu)).backward();
  opt.step();
  opt2.step();  // uses the loaded momentum buffers, which must be on the device
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(max_abs_diff(a[i], b[i]), 0.0) << i;
}

TEST(CudaTrain, DdpOverNcclOnTwoGpusMatchesOneProcess) {
  REQUIRE_GPUS(2);
#ifndef DTRAIN_TEST_NCCL
  GTEST_SKIP() << "the nccl backend is not built (dtrain_comm_nccl)";
#else
  // Reference: one process, the whole batch of 32, on the CPU.
  auto ref = mlp(21);
  optim::SGD ref_opt(ref->parameters(), optim::SGDOptions(0.1));
  auto [x, y] = batch(32, 4);
  cross_entropy(ref->forward(x), y).backward();
  ref_opt.step();

  comm::MemoryStore store;
  std::vector<std::vector<std::vector<float> > > got(2);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      try {
        const Device dev = Device::cuda(r);
        comm::NcclOptions no;
        no.device = r;
        no.compute_stream = cuda::compute_stream(dev);
        auto comm = comm::make_nccl_communicator(store, r, 2, no);
        auto model = mlp(21);
        model->to(dev);
        parallel::DistributedDataParallel ddp(model, *comm);
        optim::SGD opt(model->parameters(), optim::SGDOptions(0.1));
        Tensor xs = x.narrow(0, 16 * r, 16).contiguous().to(dev);
        Tensor ys = y.narrow(0, 16 * r, 16).contiguous().to(dev);
        cross_entropy(ddp.forward(xs), ys).backward();
        ddp.finish_gradient_sync();
        opt.step();
        for (const Tensor& p : model->parameters())
          got[static_cast<size_t>(r)].push_back(host_values(p));
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  std::vector<Tensor> pr = ref->parameters();
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(got[static_cast<size_t>(r)].size(), pr.size());
    for (size_t i = 0; i < pr.size(); ++i) {
      std::vector<float> want = host_values(pr[i]);
      const auto& have = got[static_cast<size_t>(r)][i];
      double m = 0;
      for (size_t k = 0; k < want.size(); ++k)
        m = std::max(m, std::fabs(double(want[k]) - have[k]));
      EXPECT_LT(m, 1e-5) << "rank " << r << " parameter " << i;
    }
  }
#endif
}

}  // namespace
}  // namespace dtrain
