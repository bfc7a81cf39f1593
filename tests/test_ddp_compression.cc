// Gradient compression in DDP (grad_compression.h) over the real tcp backend: ranks
// are threads of this process, each with its own tcp communicator.
//
// Oracles:
// - bf16/fp16: the average of a bucket equals the reference computed here -- every
//   rank's gradient rounded to the 16-bit type, summed in float (rounded to 16 bits
//   after each addition, at most world-1 of them), divided in f32. With 2 ranks there
//   is one addition, so the reference is exact.
// - DDP with bf16 follows uncompressed DDP (the oracle) within a bound for a few steps,
//   and every replica stays identical.
// - PowerSGD: an exactly low-rank gradient is recovered; with error feedback the mean
//   of the transmitted averages converges to the true average of a full-rank gradient
//   that one step's rank-1 approximation misses by far.
// - The demo through dtrain launch (2 workers) reaches the same test accuracy within
//   0.3 points with --grad-compression bf16 as with none.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/random.h"
#include "dtrain/parallel/ddp.h"
#include "dtrain/parallel/grad_compression.h"
#include "rank_threads.h"
#ifdef DTRAIN_BIN
#include "subprocess.h"
#endif

namespace {

using dtrain::DType;
using dtrain::Generator;
using dtrain::Tensor;
using dtrain::comm::Communicator;
using dtrain::parallel::GradCompression;
using dtrain::parallel::GradCompressionOptions;

// Rank r's gradient: normal values of three magnitudes (1, 1e-2, 1e-4).
std::vector<float> rank_gradient(int rank, int64_t n) {
  Generator gen(100 + static_cast<uint64_t>(rank));
  std::vector<float> g(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    g[static_cast<size_t>(i)] = static_cast<float>(gen.normal() * std::pow(10.0, -2 * (i % 3)));
  }
  return g;
}

Tensor tensor_of(const std::vector<float>& v) {
  return dtrain::from_vector<float>(v, {static_cast<int64_t>(v.size())});
}

// v rounded to `dtype` (round to nearest even) and widened back.
std::vector<float> rounded(const std::vector<float>& v, DType dtype) {
  return tensor_of(v).to(dtype).to(DType::f32).to_vector<float>();
}

// One compressed average of every rank's rank_gradient (the bucket: one vector).
std::vector<std::vector<float>> compressed_average(int world, GradCompression kind, int64_t n) {
  std::vector<std::vector<float>> out(static_cast<size_t>(world));
  dtrain::testing::run_tcp_ranks(world, "compress", [&](int r, Communicator& comm) {
    auto c = dtrain::parallel::make_bucket_compressor(GradCompressionOptions{.kind = kind}, {{n}},
                                                      DType::f32, dtrain::Device::cpu());
    Tensor flat = tensor_of(rank_gradient(r, n));
    c->launch(comm, flat)->wait();
    out[static_cast<size_t>(r)] = flat.to_vector<float>();
  });
  return out;
}

void check_half_average(int world, GradCompression kind, DType wire, double unit_roundoff) {
  const int64_t n = 3000;
  std::vector<std::vector<float>> got = compressed_average(world, kind, n);
  std::vector<double> sum(n, 0.0), abs_sum(n, 0.0), f32_avg(n, 0.0);
  for (int r = 0; r < world; ++r) {
    std::vector<float> g = rank_gradient(r, n);
    std::vector<float> h = rounded(g, wire);
    for (int64_t i = 0; i < n; ++i) {
      sum[i] += h[i];
      abs_sum[i] += std::fabs(h[i]);
      f32_avg[i] += static_cast<double>(g[i]) / world;
    }
  }
  // With 2 ranks: one addition, rounded once: exactly round(h0 + h1) / 2.
  std::vector<float> pair_sum(n);
  for (int64_t i = 0; i < n; ++i) pair_sum[i] = static_cast<float>(sum[i]);
  std::vector<float> exact_pair = rounded(pair_sum, wire);
  double max_err = 0, max_from_f32 = 0;
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(got[static_cast<size_t>(r)], got[0]) << "rank " << r << " got another average";
  }
  for (int64_t i = 0; i < n; ++i) {
    const double v = got[0][i];
    max_from_f32 = std::max(max_from_f32, std::fabs(v - f32_avg[i]));
    if (world == 2) {
      ASSERT_EQ(got[0][i], exact_pair[i] * 0.5f) << "element " << i;
      continue;
    }
    // world-1 roundings of partial sums no larger than abs_sum, plus fp16's subnormals.
    const double tol = ((world - 1) * unit_roundoff * abs_sum[i] + 1e-7) / world;
    const double err = std::fabs(v - sum[i] / world);
    max_err = std::max(max_err, err / tol);
    ASSERT_LE(err, tol) << "element " << i << ": got " << v << ", reference " << sum[i] / world;
  }
  // The values really travelled in 16 bits: the f32 average is not what came back.
  EXPECT_GT(max_from_f32, 1e-4) << "the average looks uncompressed";
  std::printf("%s world %d: max |avg - f32 avg| %.3g, max err / tolerance %.3f\n",
              dtrain::parallel::grad_compression_name(kind), world, max_from_f32, max_err);
}

constexpr double kBf16Roundoff = 1.0 / 256;   // 2^-8: bf16 keeps 8 significant bits
constexpr double kFp16Roundoff = 1.0 / 2048;  // 2^-11

TEST(DdpCompression, Bf16AverageMatchesOracleTwoRanks) {
  check_half_average(2, GradCompression::kBf16, DType::bf16, kBf16Roundoff);
}
TEST(DdpCompression, Bf16AverageMatchesOracleThreeRanks) {
  check_half_average(3, GradCompression::kBf16, DType::bf16, kBf16Roundoff);
}
TEST(DdpCompression, Fp16AverageMatchesOracleTwoRanks) {
  check_half_average(2, GradCompression::kFp16, DType::f16, kFp16Roundoff);
}
TEST(DdpCompression, Fp16AverageMatchesOracleThreeRanks) {
  check_half_average(3, GradCompression::kFp16, DType::f16, kFp16Roundoff);
}

TEST(DdpCompression, ParseNamesTheAcceptedValues) {
  EXPECT_EQ(dtrain::parallel::parse_grad_compression("bf16"), GradCompression::kBf16);
  EXPECT_EQ(dtrain::parallel::parse_grad_compression("powersgd"), GradCompression::kPowerSgd);
  try {
    dtrain::parallel::parse_grad_compression("bf17");
    FAIL() << "bf17 accepted";
  } catch (const dtrain::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("expected none, bf16, fp16 or powersgd"),
              std::string::npos)
        << e.what();
  }
}

// ---- DDP training: compressed vs uncompressed ----

constexpr int kSteps = 8;
constexpr int64_t kGlobalBatch = 16;

struct Trained {
  std::vector<Tensor> params;
  std::vector<double> losses;  // rank 0's local loss per step
};

std::vector<Tensor> snapshot(const dtrain::nn::Module& m) {
  std::vector<Tensor> out;
  for (const Tensor& p : m.parameters()) out.push_back(p.clone());
  return out;
}

// kSteps of DDP over `world` tcp ranks; every rank's final parameters.
std::vector<Trained> train_ddp(int world, const GradCompressionOptions& compression) {
  Generator data_gen(1234);
  dtrain::nn::Batch data = dtrain::nn::make_random_batch("mlp", kSteps * kGlobalBatch, data_gen);
  std::vector<Trained> out(static_cast<size_t>(world));
  dtrain::testing::run_tcp_ranks(world, "ddp_compress", [&](int r, Communicator& comm) {
    Generator gen(42);
    auto model = dtrain::nn::make_model("mlp", gen);
    dtrain::parallel::DdpOptions options;
    options.first_bucket_bytes = 4096;  // several buckets, so some launch in backward
    options.compression = compression;
    dtrain::parallel::DistributedDataParallel ddp(model, comm, options);
    dtrain::optim::SGD opt(model->parameters(), dtrain::optim::SGDOptions(0.05).momentum(0.9));
    const int64_t local = kGlobalBatch / world;
    Trained& t = out[static_cast<size_t>(r)];
    for (int s = 0; s < kSteps; ++s) {
      opt.zero_grad();
      const int64_t start = s * kGlobalBatch + r * local;
      Tensor loss = dtrain::cross_entropy(ddp(data.input.narrow(0, start, local).clone()),
                                          data.target.narrow(0, start, local).clone());
      loss.backward();
      ddp.finish_gradient_sync();
      opt.step();
      t.losses.push_back(loss.item());
    }
    EXPECT_GT(ddp.stats().buckets_launched_in_backward, 0) << "no overlap with backward";
    t.params = snapshot(*model);
  });
  return out;
}

// max |a - b| and max |b - init| over every parameter.
std::pair<double, double> max_diff_and_update(const std::vector<Tensor>& a,
                                              const std::vector<Tensor>& b,
                                              const std::vector<Tensor>& init) {
  double diff = 0, update = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    std::vector<float> x = a[k].to_vector<float>(), y = b[k].to_vector<float>(),
                       z = init[k].to_vector<float>();
    for (size_t i = 0; i < x.size(); ++i) {
      diff = std::max(diff, std::fabs(double(x[i]) - y[i]));
      update = std::max(update, std::fabs(double(y[i]) - z[i]));
    }
  }
  return {diff, update};
}

std::vector<Tensor> initial_params() {
  Generator gen(42);
  return snapshot(*dtrain::nn::make_model("mlp", gen));
}

void expect_replicas_identical(const std::vector<Trained>& runs) {
  for (size_t r = 1; r < runs.size(); ++r) {
    auto [diff, update] = max_diff_and_update(runs[r].params, runs[0].params, runs[0].params);
    EXPECT_EQ(diff, 0.0) << "rank " << r << " drifted from rank 0";
  }
}

TEST(DdpCompression, Bf16TrainingFollowsUncompressedDdp) {
  std::vector<Trained> plain = train_ddp(2, {});
  std::vector<Trained> bf16 = train_ddp(2, {.kind = GradCompression::kBf16});
  expect_replicas_identical(bf16);
  auto [diff, update] = max_diff_and_update(bf16[0].params, plain[0].params, initial_params());
  std::printf("bf16 DDP after %d steps: max |w_bf16 - w| %.3g, max |w - w0| %.3g\n", kSteps, diff,
              update);
  EXPECT_GT(diff, 0.0) << "bf16 changed nothing: was the compression applied?";
  EXPECT_LE(diff, 0.02 * update) << "bf16 DDP drifted from uncompressed DDP";
  for (int s = 0; s < kSteps; ++s) {
    EXPECT_NEAR(bf16[0].losses[s], plain[0].losses[s], 0.01 * plain[0].losses[s]) << "step " << s;
  }
}

TEST(DdpCompression, PowerSgdTrainingKeepsReplicasEqualAndStaysNearUncompressed) {
  std::vector<Trained> plain = train_ddp(2, {});
  std::vector<Trained> psgd =
      train_ddp(2, {.kind = GradCompression::kPowerSgd, .powersgd_rank = 2});
  expect_replicas_identical(psgd);
  auto [diff, update] = max_diff_and_update(psgd[0].params, plain[0].params, initial_params());
  std::printf("powersgd DDP after %d steps: max |w_psgd - w| %.3g, max |w - w0| %.3g\n", kSteps,
              diff, update);
  // Rank 2 of every matrix plus error feedback: off the uncompressed path, but much
  // nearer to it than to where training started.
  EXPECT_GT(diff, 0.0);
  EXPECT_LT(diff, 0.5 * update) << "PowerSGD DDP does not follow uncompressed DDP";
}

// ---- PowerSGD on one bucket: [8, 6] matrix + [6] bias ----

constexpr int64_t kRows = 8, kCols = 6;

// Rank r's gradient: matrix then bias. low_rank: u v^T (the same on every rank,
// scaled by r + 1) instead of full-rank noise.
std::vector<float> psgd_gradient(int r, bool low_rank) {
  Generator gen(low_rank ? 7 : 7 + static_cast<uint64_t>(r));
  std::vector<float> g(kRows * kCols + kCols);
  std::vector<double> u(kRows), v(kCols);
  for (double& x : u) x = gen.normal();
  for (double& x : v) x = gen.normal();
  for (int64_t i = 0; i < kRows * kCols; ++i) {
    g[i] = low_rank ? static_cast<float>((r + 1) * u[i / kCols] * v[i % kCols])
                    : static_cast<float>(gen.normal());
  }
  for (int64_t i = 0; i < kCols; ++i) g[kRows * kCols + i] = static_cast<float>(gen.normal());
  return g;
}

// `steps` PowerSGD averages (rank 1) of the same gradient; rank 0's outputs.
std::vector<std::vector<float>> psgd_outputs(bool low_rank, int steps) {
  std::vector<std::vector<float>> outs;
  dtrain::testing::run_tcp_ranks(2, "psgd", [&](int r, Communicator& comm) {
    auto c = dtrain::parallel::make_bucket_compressor(
        {.kind = GradCompression::kPowerSgd, .powersgd_rank = 1}, {{kRows, kCols}, {kCols}},
        DType::f32, dtrain::Device::cpu());
    for (int s = 0; s < steps; ++s) {
      Tensor flat = tensor_of(psgd_gradient(r, low_rank));
      c->launch(comm, flat)->wait();
      if (r == 0) outs.push_back(flat.to_vector<float>());
    }
  });
  return outs;
}

std::vector<float> true_average(bool low_rank) {
  std::vector<float> a = psgd_gradient(0, low_rank), b = psgd_gradient(1, low_rank);
  for (size_t i = 0; i < a.size(); ++i) a[i] = (a[i] + b[i]) * 0.5f;
  return a;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b, size_t end) {
  double m = 0;
  for (size_t i = 0; i < end; ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]));
  return m;
}

TEST(DdpCompression, PowerSgdRecoversALowRankGradientAndAveragesTheBias) {
  std::vector<std::vector<float>> outs = psgd_outputs(/*low_rank=*/true, 2);
  std::vector<float> want = true_average(true);
  const size_t m = kRows * kCols;
  EXPECT_LE(max_abs_diff(outs[0], want, m), 1e-4) << "rank-1 gradient not recovered";
  for (size_t i = m; i < want.size(); ++i) EXPECT_EQ(outs[0][i], want[i]) << "bias " << i - m;
}

TEST(DdpCompression, PowerSgdErrorFeedbackRecoversTheMeanOverSteps) {
  const int steps = 300;
  std::vector<std::vector<float>> outs = psgd_outputs(/*low_rank=*/false, steps);
  std::vector<float> want = true_average(false);
  const size_t m = kRows * kCols;
  std::vector<float> mean(want.size(), 0.0f);
  for (const auto& o : outs) {
    for (size_t i = 0; i < o.size(); ++i) mean[i] += o[i] / steps;
  }
  double scale = 0;
  for (size_t i = 0; i < m; ++i) scale = std::max(scale, std::fabs(double(want[i])));
  const double one_step = max_abs_diff(outs[0], want, m);
  const double averaged = max_abs_diff(mean, want, m);
  std::printf("powersgd rank 1: one step off by %.3g, mean of %d steps off by %.3g (max %.3g)\n",
              one_step, steps, averaged, scale);
  EXPECT_GT(one_step, 0.2 * scale) << "a full-rank gradient should not fit rank 1";
  EXPECT_LT(averaged, 0.03 * scale) << "error feedback did not carry the remainder";
}

TEST(DdpCompression, PowerSgdRefusesNonCpuAndBadRank) {
  EXPECT_THROW(dtrain::parallel::make_bucket_compressor(
                   {.kind = GradCompression::kPowerSgd, .powersgd_rank = 0}, {{4, 4}}, DType::f32,
                   dtrain::Device::cpu()),
               dtrain::InvalidArgument);
  EXPECT_THROW(dtrain::parallel::make_bucket_compressor({.kind = GradCompression::kBf16}, {{4}},
                                                        DType::f64, dtrain::Device::cpu()),
               dtrain::InvalidArgument);
}

#ifdef DTRAIN_BIN
// ---- The accuracy figure: the demo through dtrain launch ----

// The test_accuracy of the metrics file's final line; -1 when there is none.
double final_accuracy(const std::filesystem::path& metrics) {
  std::ifstream in(metrics);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = text.rfind("\"test_accuracy\":");
  if (at == std::string::npos) return -1;
  return std::strtod(text.c_str() + at + std::string("\"test_accuracy\":").size(), nullptr);
}

double launch_demo(const std::string& compression, int seed) {
  std::filesystem::path metrics =
      dtrain::testing::scratch_dir("dtrain_test_compress", compression + std::to_string(seed)) /
      "metrics.jsonl";
  auto r = dtrain::testing::run_command(
      std::string(DTRAIN_BIN) + " launch --nproc 2 -- dtrain train --no-progress --data-cache " +
      DTRAIN_DATA_CACHE + " --metrics " + metrics.string() + " --grad-compression " + compression +
      " --seed " + std::to_string(seed));
  EXPECT_EQ(r.code, 0) << r.out;
  if (compression != "none") {
    EXPECT_NE(r.out.find("backend tcp, " + compression + " gradients"), std::string::npos) << r.out;
  }
  return final_accuracy(metrics);
}

// Acceptance (issue 11): bf16 all-reduce reaches the same test accuracy within 0.3 points,
// as the mean over seeds 1-3: one seed alone is not the accuracy (uncompressed runs
// measured 98.40, 97.90 and 98.20% for seeds 1-3 on one machine, a 0.5-point spread).
TEST(DdpCompressionCli, Bf16DemoMatchesUncompressedAccuracy) {
  double none = 0, bf16 = 0;
  for (int seed = 1; seed <= 3; ++seed) {
    const double a = launch_demo("none", seed), b = launch_demo("bf16", seed);
    std::printf("seed %d: test accuracy none %.4f, bf16 %.4f\n", seed, a, b);
    EXPECT_GE(a, 0.97) << "seed " << seed;
    none += a / 3, bf16 += b / 3;
  }
  std::printf(
      "seed-cnn demo, 2 workers, mean of seeds 1-3: test accuracy none %.4f, bf16 %.4f (diff "
      "%.2f points)\n",
      none, bf16, 100 * (bf16 - none));
  RecordProperty("test_accuracy_none", std::to_string(none));
  RecordProperty("test_accuracy_bf16", std::to_string(bf16));
  EXPECT_GE(none, 0.97);
  EXPECT_LE(std::fabs(bf16 - none), 0.003);
}

TEST(DdpCompressionCli, BadValueIsRefusedNamingTheFlag) {
  auto r = dtrain::testing::run_command(std::string(DTRAIN_BIN) +
                                        " train --grad-compression bf17 --max-steps 1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("--grad-compression bf17: expected none, bf16, fp16 or powersgd"),
            std::string::npos)
      << r.out;
}
#endif

}  // namespace
