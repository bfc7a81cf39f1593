// The CUDA backend. Without a device (or without the backend built) the GPU tests skip
// with the driver's reason and the no-device behaviour itself is tested: every way of
// asking for a CUDA tensor fails with one clear "no CUDA device: <reason>" error.
//
// With a device: every op against the CPU reference in f32, TF32, bf16 and f16
// (check::run_all: random odd shapes, forward and backward, NaN-poisoned allocator
// cache so unwritten outputs fail), plus copies, the caching allocator, a short
// training run against the same run on the CPU, the transformer ops (layer_norm, gelu,
// attention, cat/split) at GPT-like shapes against the CPU, and typed errors on the
// device path.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <thread>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/cuda/op_check.h"
#include "dtrain/engine/cuda/runtime.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/random.h"
#ifdef DTRAIN_WITH_CUDA
#include "dtrain/engine/cuda/allocator.h"
#endif

namespace dtrain {
namespace {

#define DTRAIN_REQUIRE_GPU()                                      \
  do {                                                            \
    if (cuda::device_count() == 0) {                              \
      GTEST_SKIP() << "no CUDA device: " << cuda::device_error(); \
    }                                                             \
  } while (0)

const Device kGpu = Device::cuda(0);

TEST(CudaRuntime, ParseDevice) {
  EXPECT_EQ(cuda::parse_device("cpu"), Device::cpu());
  EXPECT_EQ(cuda::parse_device("cuda"), Device::cuda(0));
  EXPECT_EQ(cuda::parse_device("cuda:3"), Device::cuda(3));
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA:0", ""}) {
    EXPECT_THROW(cuda::parse_device(bad), InvalidArgument) << bad;
  }
}

TEST(CudaRuntime, NoDeviceIsOneClearError) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  const std::string reason = cuda::device_error();
  EXPECT_FALSE(reason.empty());
  const std::string want = "no CUDA device: " + reason;
  try {
    empty({2, 3}, TensorOptions{DType::f32, kGpu});
    FAIL() << "allocating on cuda:0 without a device did not throw";
  } catch (const UnsupportedError& e) {
    EXPECT_EQ(e.message(), want);
  }
  try {
    zeros({4}).to(kGpu);
    FAIL() << "to(cuda:0) without a device did not throw";
  } catch (const UnsupportedError& e) {
    EXPECT_EQ(e.message(), want);
  }
  EXPECT_THROW(cuda::require_device(kGpu), UnsupportedError);
  EXPECT_NO_THROW(cuda::require_device(Device::cpu()));
  EXPECT_TRUE(cuda::devices().empty());
  // The CPU keeps working after the failed requests.
  EXPECT_EQ(sum(ones({3})).item(), 3.0);
}

TEST(CudaRuntime, Tf32GuardIsScopedAndNests) {
  EXPECT_FALSE(cuda::AllowTf32Guard::enabled());
  {
    cuda::AllowTf32Guard on;
    EXPECT_TRUE(cuda::AllowTf32Guard::enabled());
    {
      cuda::AllowTf32Guard off(false);
      EXPECT_FALSE(cuda::AllowTf32Guard::enabled());
    }
    EXPECT_TRUE(cuda::AllowTf32Guard::enabled());
    bool other_thread = true;
    std::thread([&] { other_thread = cuda::AllowTf32Guard::enabled(); }).join();
    EXPECT_FALSE(other_thread);  // thread-local
  }
  EXPECT_FALSE(cuda::AllowTf32Guard::enabled());
}

TEST(CudaRuntime, VersionsAreReported) {
  cuda::Versions v = cuda::versions();
  EXPECT_FALSE(v.runtime.empty());
  EXPECT_FALSE(v.cudnn.empty());
  EXPECT_FALSE(v.nccl.empty());
  if (cuda::built_with_cuda()) {
    EXPECT_EQ(v.cudnn.substr(0, 2), "9.");  // built against cuDNN 9
  }
}

// The CPU backend passes its own check (f32 against f64): the harness that runs the
// GPU checks below is sound, and `dtrain doctor` shows this table without a GPU.
TEST(BackendCheck, CpuMatchesF64Reference) {
  for (const check::Result& r :
       check::run_all(Device::cpu(), DType::f32, check::Precision::kNative)) {
    EXPECT_FALSE(r.skipped) << r.op << ": " << r.note;
    EXPECT_TRUE(r.passed) << r.op << " fwd " << r.forward_error << " bwd " << r.backward_error
                          << " tol " << r.tolerance << " " << r.note;
  }
}

TEST(BackendCheck, RelativeErrorCatchesNanAndShape) {
  Tensor a = from_vector(std::vector<float>{1.f, 2.f}, {2});
  EXPECT_EQ(check::max_relative_error(a, a), 0.0);
  EXPECT_NEAR(check::max_relative_error(from_vector(std::vector<float>{1.f, 2.2f}, {2}), a), 0.1,
              1e-6);
  EXPECT_TRUE(std::isinf(
      check::max_relative_error(from_vector(std::vector<float>{std::nanf(""), 2.f}, {2}), a)));
  EXPECT_TRUE(std::isinf(check::max_relative_error(a.reshape({1, 2}), a)));
}

void expect_all_pass(DType dt, check::Precision precision) {
  for (const check::Result& r : check::run_all(kGpu, dt, precision)) {
    if (r.skipped) {
      // Only f16/bf16 embedding backward may skip (no atomic add in half types).
      bool known = r.op.rfind("embedding", 0) == 0 && dt != DType::f32;
      EXPECT_TRUE(known) << r.op << " skipped: " << r.note;
      continue;
    }
    EXPECT_TRUE(r.passed) << r.op << " " << r.dtype << " fwd " << r.forward_error << " bwd "
                          << r.backward_error << " tol " << r.tolerance << " " << r.note;
  }
}

TEST(CudaOps, EveryOpMatchesCpuF32) {
  DTRAIN_REQUIRE_GPU();
  expect_all_pass(DType::f32, check::Precision::kNative);
}
TEST(CudaOps, GemmMatchesCpuTf32) {
  DTRAIN_REQUIRE_GPU();
  expect_all_pass(DType::f32, check::Precision::kTf32);
}
TEST(CudaOps, EveryOpMatchesCpuBf16) {
  DTRAIN_REQUIRE_GPU();
  expect_all_pass(DType::bf16, check::Precision::kNative);
}
TEST(CudaOps, EveryOpMatchesCpuF16) {
  DTRAIN_REQUIRE_GPU();
  expect_all_pass(DType::f16, check::Precision::kNative);
}

TEST(CudaTensor, CopiesRoundTripExactly) {
  DTRAIN_REQUIRE_GPU();
  Generator gen(9);
  std::vector<float> v(7 * 13);
  for (auto& e : v) e = static_cast<float>(gen.normal());
  Tensor x = from_vector(v, {7, 13});
  EXPECT_EQ(x.to(kGpu).to(Device::cpu()).to_vector<float>(), v);
  // A transposed (strided) view, to the device and back.
  EXPECT_EQ(x.t().to(kGpu).to(Device::cpu()).to_vector<float>(),
            x.t().contiguous().to_vector<float>());
  // Strided on the device: contiguous() of a transposed device tensor.
  EXPECT_EQ(x.to(kGpu).t().contiguous().to_vector<float>(), x.t().contiguous().to_vector<float>());
  // copy_ into a narrow view on the device leaves the rest alone.
  Tensor d = zeros({7, 13}, TensorOptions{DType::f32, kGpu});
  d.narrow(1, 2, 5).copy_(x.narrow(1, 2, 5));
  std::vector<float> got = d.to_vector<float>();
  for (int64_t i = 0; i < 7; ++i) {
    for (int64_t j = 0; j < 13; ++j) {
      float want = j >= 2 && j < 7 ? v[i * 13 + j] : 0.f;
      ASSERT_EQ(got[i * 13 + j], want) << i << "," << j;
    }
  }
  // Integer and half types.
  Tensor idx = arange(17, TensorOptions{DType::i64, Device::cpu()});
  EXPECT_EQ(idx.to(kGpu).to_vector<int64_t>(), idx.to_vector<int64_t>());
  Tensor h = x.to(DType::bf16);
  EXPECT_EQ(x.to(kGpu).to(DType::bf16).to(Device::cpu()).to(DType::f32).to_vector<float>(),
            h.to(DType::f32).to_vector<float>());
}

std::shared_ptr<data::TensorDataset> small_dataset() {
  std::vector<float> x(23 * 3);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) * 0.5f;
  std::vector<int64_t> y(23);
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<int64_t>(i % 4);
  return std::make_shared<data::TensorDataset>(from_vector(x, {23, 3}), from_vector(y, {23}));
}

TEST(CudaLoader, NoDeviceFailsAtConstruction) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  try {
    data::DataLoader loader(small_dataset(), data::DistributedSampler(23, 0, 1, 5), 4,
                            {.device = kGpu});
    FAIL() << "a loader for cuda:0 was made without a device";
  } catch (const UnsupportedError& e) {
    EXPECT_EQ(e.message(), "no CUDA device: " + cuda::device_error());
  }
}

// Batches delivered on the device (pinned staging, copy stream) equal the host batches.
TEST(CudaLoader, DeviceBatchesEqualHostBatches) {
  DTRAIN_REQUIRE_GPU();
  for (int64_t prefetch : {0, 2}) {
    data::DataLoader host(small_dataset(), data::DistributedSampler(23, 0, 1, 5), 4,
                          {.prefetch = prefetch});
    data::DataLoader dev(small_dataset(), data::DistributedSampler(23, 0, 1, 5), 4,
                         {.prefetch = prefetch, .device = kGpu});
    host.begin_epoch(0);
    dev.begin_epoch(0);
    data::Batch hb, db;
    int batches = 0;
    while (host.next(hb)) {
      ASSERT_TRUE(dev.next(db));
      EXPECT_EQ(db.input.device(), kGpu);
      // Consume on the compute stream right away: the copy must be ordered before it.
      EXPECT_EQ(mul_scalar(db.input, 2.0).to_vector<float>(),
                mul_scalar(hb.input, 2.0).to_vector<float>());
      EXPECT_EQ(db.target.to_vector<int64_t>(), hb.target.to_vector<int64_t>());
      ++batches;
    }
    EXPECT_FALSE(dev.next(db));
    EXPECT_EQ(batches, 6);
  }
}

#ifdef DTRAIN_WITH_CUDA
TEST(CudaAllocator, ReusesBlocksAcrossSteps) {
  DTRAIN_REQUIRE_GPU();
  cuda::CachingDeviceAllocator* a = cuda::device_allocator(0);
  { Tensor warm = empty({1000, 37}, TensorOptions{DType::f32, kGpu}); }
  AllocatorStats before = a->stats();
  for (int i = 0; i < 5; ++i) {
    Tensor t = empty({1000, 37}, TensorOptions{DType::f32, kGpu});
  }
  AllocatorStats after = a->stats();
  EXPECT_EQ(after.system_allocs, before.system_allocs);  // no cudaMalloc per step
  EXPECT_EQ(after.cache_hits - before.cache_hits, 5u);
}

TEST(CudaAllocator, PinnedHostMemoryIsCached) {
  DTRAIN_REQUIRE_GPU();
  cuda::PinnedHostAllocator* p = cuda::pinned_allocator();
  void* a = p->allocate(4096);
  ASSERT_NE(a, nullptr);
  p->deallocate(a, 4096);
  void* b = p->allocate(4000);
  EXPECT_EQ(a, b);  // same size class, served from the cache
  p->deallocate(b, 4000);
}
#endif

TEST(CudaTraining, SgdStepsMatchCpu) {
  DTRAIN_REQUIRE_GPU();
  Generator gen(21);
  auto rnd = [&](const Shape& s) {
    std::vector<float> v(static_cast<size_t>(shape_numel(s)));
    for (auto& e : v) e = static_cast<float>(gen.uniform(-0.5, 0.5));
    return from_vector(v, s);
  };
  Tensor w1 = rnd({16, 12}), b1 = rnd({16}), w2 = rnd({5, 16}), x = rnd({9, 12});
  Tensor y = from_vector(std::vector<int64_t>{0, 1, 2, 3, 4, 0, 1, 2, 3}, {9});
  auto run = [&](const Device& dev) {
    std::vector<Tensor> ps = {w1.to(dev).clone(), b1.to(dev).clone(), w2.to(dev).clone()};
    for (auto& p : ps) p.set_requires_grad(true);
    optim::SGD opt(ps, optim::SGDOptions(0.2).momentum(0.9));
    Tensor xd = x.to(dev), yd = y.to(dev);
    std::vector<double> losses;
    for (int step = 0; step < 4; ++step) {
      for (auto& p : ps) p.set_grad(Tensor());
      Tensor loss = cross_entropy(linear(relu(linear(xd, ps[0], ps[1])), ps[2], Tensor()), yd);
      losses.push_back(loss.item());
      loss.backward();
      opt.step();
    }
    return std::make_pair(losses, ps[0].detach().to(Device::cpu()));
  };
  auto [cpu_losses, cpu_w] = run(Device::cpu());
  auto [gpu_losses, gpu_w] = run(kGpu);
  for (size_t i = 0; i < cpu_losses.size(); ++i) {
    EXPECT_NEAR(gpu_losses[i], cpu_losses[i], 1e-5 * std::fabs(cpu_losses[i])) << "step " << i;
  }
  EXPECT_LE(check::max_relative_error(gpu_w, cpu_w), 1e-5);
}

// matmul under AllowTf32Guard: TF32 accuracy (1e-3), and not bit-identical to strict f32
// on a product whose inputs have more than TF32's 10 mantissa bits.
TEST(CudaOps, MatmulHonoursTf32Guard) {
  DTRAIN_REQUIRE_GPU();
  Generator gen(8);
  std::vector<float> av(64 * 96), bv(96 * 48);
  for (auto& e : av) e = static_cast<float>(gen.uniform(-1, 1));
  for (auto& e : bv) e = static_cast<float>(gen.uniform(-1, 1));
  Tensor a = from_vector(av, {64, 96}), b = from_vector(bv, {96, 48});
  Tensor want = matmul(a, b);
  Tensor strict = matmul(a.to(kGpu), b.to(kGpu));
  Tensor tf32;
  {
    cuda::AllowTf32Guard allow;
    tf32 = matmul(a.to(kGpu), b.to(kGpu));
  }
  EXPECT_LE(check::max_relative_error(strict, want), 1e-5);
  EXPECT_LE(check::max_relative_error(tf32, want), 1e-3);
  EXPECT_GT(check::max_relative_error(tf32, want), 1e-6);
}

// The transformer ops at GPT-like shapes (several tiles, Dh 64/128, D 768) against the
// CPU kernels on the same inputs; f64 with Dh 128 takes the kernels past the 48 KiB
// default shared memory. (check::run_all above covers them at small shapes in every
// dtype.)
std::vector<Tensor> transformer_grads(const std::vector<Tensor>& inputs,
                                      const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                      const Device& d, uint64_t seed) {
  std::vector<Tensor> in;
  for (const Tensor& t : inputs) {
    Tensor x = t.to(d);
    x.set_requires_grad(true);
    in.push_back(x);
  }
  Tensor y = f(in);
  Generator gen(seed);
  std::vector<double> w(static_cast<size_t>(y.numel()));
  for (double& e : w) e = gen.uniform(-1, 1);
  Tensor wt = from_vector(w, y.shape()).to(y.dtype()).to(d);
  sum(mul(y, wt)).backward();
  std::vector<Tensor> out{y.to(Device::cpu())};
  for (const Tensor& x : in) out.push_back(x.grad().to(Device::cpu()));
  return out;
}

Tensor uniform_tensor(const Shape& s, Generator& gen, DType dt) {
  std::vector<double> v(static_cast<size_t>(shape_numel(s)));
  for (double& e : v) e = gen.uniform(-1, 1);
  return from_vector(v, s).to(dt);
}

void expect_gpu_matches_cpu(const std::string& name, const std::vector<Tensor>& inputs,
                            const std::function<Tensor(const std::vector<Tensor>&)>& f,
                            double tol) {
  std::vector<Tensor> want = transformer_grads(inputs, f, Device::cpu(), 5);
  check::poison_allocator_cache(kGpu);
  std::vector<Tensor> got = transformer_grads(inputs, f, kGpu, 5);
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_LE(check::max_relative_error(got[i], want[i]), tol)
        << name << (i == 0 ? " forward" : " grad of input " + std::to_string(i - 1));
  }
}

TEST(CudaTransformer, AttentionMatchesCpuAtGptShapes) {
  DTRAIN_REQUIRE_GPU();
  Generator gen(21);
  for (bool causal : {true, false}) {
    // [B,T,H,Dh] viewed as [B,H,T,Dh], as a GPT block hands them over.
    Shape s{2, 200, 4, 64};
    std::vector<Tensor> in{uniform_tensor(s, gen, DType::f32), uniform_tensor(s, gen, DType::f32),
                           uniform_tensor(s, gen, DType::f32)};
    expect_gpu_matches_cpu(
        causal ? "sdpa causal f32" : "sdpa f32", in,
        [causal](const std::vector<Tensor>& x) {
          return scaled_dot_product_attention(x[0].transpose(1, 2), x[1].transpose(1, 2),
                                              x[2].transpose(1, 2), causal);
        },
        2e-5);
  }
  Shape s{1, 3, 45, 128};
  std::vector<Tensor> in{uniform_tensor(s, gen, DType::f64), uniform_tensor(s, gen, DType::f64),
                         uniform_tensor(s, gen, DType::f64)};
  expect_gpu_matches_cpu(
      "sdpa causal f64 Dh=128", in,
      [](const std::vector<Tensor>& x) {
        return scaled_dot_product_attention(x[0], x[1], x[2], true);
      },
      1e-12);
}

TEST(CudaTransformer, LayerNormGeluCatSplitMatchCpu) {
  DTRAIN_REQUIRE_GPU();
  Generator gen(22);
  std::vector<Tensor> in{uniform_tensor({3, 70, 768}, gen, DType::f32),
                         uniform_tensor({768}, gen, DType::f32),
                         uniform_tensor({768}, gen, DType::f32)};
  expect_gpu_matches_cpu(
      "layer_norm -> gelu [3,70,768]", in,
      [](const std::vector<Tensor>& x) { return gelu(layer_norm(x[0], x[1], x[2], 1e-5)); }, 1e-5);
  std::vector<Tensor> qkv{uniform_tensor({2, 9, 3 * 48}, gen, DType::f32)};
  expect_gpu_matches_cpu(
      "split -> cat", qkv,
      [](const std::vector<Tensor>& x) {
        std::vector<Tensor> c = split(x[0], 48, -1);
        return cat({c[1], c[2] * 2.0, c[0]}, 1);
      },
      1e-6);
}

TEST(CudaErrors, TypedErrorsOnTheDevicePath) {
  DTRAIN_REQUIRE_GPU();
  Tensor logits = zeros({2, 3}, TensorOptions{DType::f32, kGpu});
  Tensor bad = from_vector(std::vector<int64_t>{1, 3}, {2}).to(kGpu);
  try {
    cross_entropy(logits, bad);
    FAIL() << "out-of-range target accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("target 3 at position 1"), std::string::npos) << e.message();
  }
  Tensor w = zeros({4, 2}, TensorOptions{DType::f32, kGpu});
  EXPECT_THROW(embedding(w, from_vector(std::vector<int64_t>{0, 4}, {2}).to(kGpu)),
               InvalidArgument);
  EXPECT_THROW(add(zeros({2}), zeros({2}, TensorOptions{DType::f32, kGpu})), InvalidArgument);
  LstmWeights lw{zeros({8, 3}), zeros({8, 2}), Tensor(), Tensor()};  // on the CPU
  EXPECT_THROW(lstm(zeros({1, 4, 3}, TensorOptions{DType::f32, kGpu}), lw), InvalidArgument);
}

}  // namespace
}  // namespace dtrain
