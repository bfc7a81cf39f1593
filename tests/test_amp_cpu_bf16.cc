// bf16 autocast on the CPU through oneDNN (amp_cpu.h).
//
// Oracle: the emulation (operands rounded to bf16, products on the f32 kernels,
// incoming gradient rounded). The products of two bf16 values are exact in f32, so the
// two paths differ only in the order of the f32 sums: each element may differ by at
// most 2 (K + 2) 2^-24 times the sum of the absolute terms (K the reduction length),
// the standard bound of two summation orders. The absolute terms are the emulation run
// on |x|, |w| and |g|. The checks skip (with the reason) only on a CPU without
// AVX512-BF16 or AMX, where the oneDNN path refuses with a clear error (tested).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "dtrain/engine/amp.h"
#include "dtrain/engine/amp_cpu.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/random.h"

namespace dtrain {
namespace {

#define SKIP_WITHOUT_BF16()        \
  if (!amp::cpu_has_native_bf16()) \
  GTEST_SKIP() << "this CPU has no AVX512-BF16 or AMX (oneDNN's ISA: " << amp::cpu_isa_name() << ")"

Tensor random_tensor(const Shape& s, Generator& gen) {
  std::vector<float> v(static_cast<size_t>(shape_numel(s)));
  for (auto& e : v) e = static_cast<float>(gen.uniform(-1, 1));
  return from_vector(v, s);
}

Tensor abs_of(const Tensor& t) {
  std::vector<float> v = t.detach().contiguous().to_vector<float>();
  for (auto& e : v) e = std::fabs(e);
  return from_vector(v, t.shape());
}

Tensor leaf(const Tensor& t) { return t.detach().clone().set_requires_grad(true); }

// Output and the three gradients of one path.
struct Result {
  Tensor y, dx, dw, db;
};

template <typename Op>
Result run(const Op& op, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& g) {
  Tensor lx = leaf(x), lw = leaf(w), lb = leaf(b);
  Tensor y = op(lx, lw, lb);
  run_backward({y}, {g});
  return {y.detach(), lx.grad(), lw.grad(), lb.grad()};
}

// Every element of `got` within the summation-order bound of `want`; returns the
// largest |got - want| / bound seen (< 1 passes).
double check_within(const Tensor& got, const Tensor& want, const Tensor& abs_terms, int64_t k,
                    const std::string& what) {
  std::vector<float> a = got.contiguous().to_vector<float>();
  std::vector<float> e = want.contiguous().to_vector<float>();
  std::vector<float> s = abs_terms.contiguous().to_vector<float>();
  EXPECT_EQ(a.size(), e.size()) << what;
  const double unit = 2.0 * static_cast<double>(k + 2) * std::ldexp(1.0, -24);
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < e.size(); ++i) {
    double bound = unit * s[i] + 1e-30;
    double r = std::fabs(double(a[i]) - e[i]) / bound;
    worst = std::max(worst, r);
    if (r > 1) {
      ADD_FAILURE() << what << "[" << i << "]: oneDNN " << a[i] << ", emulation " << e[i]
                    << ", bound " << bound;
      break;
    }
  }
  return worst;
}

// The largest |a - b| / max |b|.
double max_rel(const Tensor& a, const Tensor& b) {
  std::vector<float> x = a.contiguous().to_vector<float>(), y = b.contiguous().to_vector<float>();
  double d = 0, m = 1e-30;
  for (size_t i = 0; i < x.size(); ++i) {
    d = std::max(d, std::fabs(double(x[i]) - y[i]));
    m = std::max(m, std::fabs(double(y[i])));
  }
  return d / m;
}

void compare(const Result& got, const Result& want, const Result& abs, int64_t k,
             const std::string& where) {
  check_within(got.y, want.y, abs.y, k, where + " forward");
  check_within(got.dx, want.dx, abs.dx, k, where + " input gradient");
  check_within(got.dw, want.dw, abs.dw, k, where + " weight gradient");
  check_within(got.db, want.db, abs.db, k, where + " bias gradient");
}

auto onednn_linear = [](const Tensor& x, const Tensor& w, const Tensor& b) {
  return amp::onednn_bf16_linear(x, w, b);
};
auto emulated_linear = [](const Tensor& x, const Tensor& w, const Tensor& b) {
  return amp::emulated_linear(x, w, b, DType::bf16);
};

TEST(CpuBf16, LinearMatchesTheEmulationAtOddShapes) {
  SKIP_WITHOUT_BF16();
  Generator gen(3);
  for (int64_t batch : {1, 5}) {
    for (int64_t in : {1, 7, 33, 127}) {
      for (int64_t out : {1, 7, 33, 127}) {
        Tensor x = random_tensor({batch, 3, in}, gen), w = random_tensor({out, in}, gen);
        Tensor b = random_tensor({out}, gen), g = random_tensor({batch, 3, out}, gen);
        Result got = run(onednn_linear, x, w, b, g);
        Result want = run(emulated_linear, x, w, b, g);
        Result abs = run(emulated_linear, abs_of(x), abs_of(w), abs_of(b), abs_of(g));
        const int64_t k = std::max({in, out, batch * 3}) + 1;  // +1: the bias term
        compare(got, want, abs, k,
                "linear x [" + std::to_string(batch) + ",3," + std::to_string(in) + "] w [" +
                    std::to_string(out) + "," + std::to_string(in) + "]");
        if (in >= 7) {  // the rounding happened: not the f32 result
          EXPECT_GT(max_rel(got.y, linear(x, w, b)), 1e-5) << "in " << in << " out " << out;
        }
      }
    }
  }
}

struct ConvCase {
  int64_t n, c, hw, o, k, stride, pad;
};

TEST(CpuBf16, Conv2dMatchesTheEmulationAtOddShapes) {
  SKIP_WITHOUT_BF16();
  const std::vector<ConvCase> cases = {
      {1, 1, 7, 7, 3, 1, 0},   {5, 1, 33, 7, 5, 1, 2},  {1, 7, 7, 33, 3, 1, 1},
      {5, 7, 33, 1, 3, 2, 1},  {5, 33, 7, 7, 1, 1, 0},  {1, 33, 9, 127, 3, 1, 1},
      {5, 7, 33, 33, 5, 2, 0}, {1, 127, 7, 7, 3, 1, 1},
  };
  Generator gen(4);
  for (const ConvCase& t : cases) {
    Conv2dOptions opt;
    opt.stride = t.stride;
    opt.padding = t.pad;
    Tensor x = random_tensor({t.n, t.c, t.hw, t.hw}, gen);
    Tensor w = random_tensor({t.o, t.c, t.k, t.k}, gen), b = random_tensor({t.o}, gen);
    const int64_t ohw = (t.hw + 2 * t.pad - t.k) / t.stride + 1;
    Tensor g = random_tensor({t.n, t.o, ohw, ohw}, gen);
    auto onednn = [&](const Tensor& a, const Tensor& wt, const Tensor& bt) {
      return amp::onednn_bf16_conv2d(a, wt, bt, opt);
    };
    auto emulated = [&](const Tensor& a, const Tensor& wt, const Tensor& bt) {
      return amp::emulated_conv2d(a, wt, bt, opt, DType::bf16);
    };
    Result got = run(onednn, x, w, b, g), want = run(emulated, x, w, b, g);
    Result abs = run(emulated, abs_of(x), abs_of(w), abs_of(b), abs_of(g));
    const int64_t k = std::max({t.c * t.k * t.k, t.o * t.k * t.k, t.n * ohw * ohw}) + 1;
    compare(got, want, abs, k,
            "conv2d x [" + std::to_string(t.n) + "," + std::to_string(t.c) + "," +
                std::to_string(t.hw) + "] w [" + std::to_string(t.o) + ",k" + std::to_string(t.k) +
                "] stride " + std::to_string(t.stride));
    EXPECT_GT(max_rel(got.y, conv2d(x, w, b, opt)), 1e-5) << "the operands were not rounded";
  }
}

// conv2d() and linear() under AutocastGuard(bf16) take the oneDNN path (the same
// numbers as calling it directly); DTRAIN_CPU_BF16=emulate takes the emulation.
TEST(CpuBf16, AutocastDispatchesToOneDnnAndEnvSelectsEmulation) {
  SKIP_WITHOUT_BF16();
  Generator gen(6);
  Tensor x = random_tensor({5, 7, 9, 9}, gen), w = random_tensor({33, 7, 3, 3}, gen);
  Tensor b = random_tensor({33}, gen);
  Tensor direct = amp::onednn_bf16_conv2d(x, w, b, {});
  Tensor emulated = amp::emulated_conv2d(x, w, b, {}, DType::bf16);
  ASSERT_NE(direct.to_vector<float>(), emulated.to_vector<float>())
      << "the two paths agree bit for bit here: the test cannot tell them apart";
  {
    amp::AutocastGuard autocast(DType::bf16);
    EXPECT_EQ(conv2d(x, w, b).to_vector<float>(), direct.to_vector<float>());
    ::setenv("DTRAIN_CPU_BF16", "emulate", 1);
    EXPECT_EQ(amp::cpu_bf16_path(), amp::CpuBf16Path::kEmulate);
    EXPECT_EQ(conv2d(x, w, b).to_vector<float>(), emulated.to_vector<float>());
    ::setenv("DTRAIN_CPU_BF16", "fast", 1);
    EXPECT_THROW(conv2d(x, w, b), InvalidArgument);
    ::unsetenv("DTRAIN_CPU_BF16");
  }
}

// The message a user without the ISA gets (every CPU can be asked; only the outcome
// differs).
TEST(CpuBf16, RequireNamesTheIsa) {
  EXPECT_NO_THROW(amp::require_cpu_bf16(amp::CpuBf16Path::kEmulate));
  if (amp::cpu_has_native_bf16()) {
    EXPECT_NO_THROW(amp::require_cpu_bf16(amp::CpuBf16Path::kOneDnn));
    return;
  }
  try {
    amp::require_cpu_bf16(amp::CpuBf16Path::kOneDnn);
    FAIL() << "no error without AVX512-BF16/AMX";
  } catch (const UnsupportedError& e) {
    EXPECT_NE(std::string(e.what()).find("needs AVX512-BF16 or AMX; this CPU has"),
              std::string::npos)
        << e.what();
  }
}

TEST(CpuBf16, RejectsWhatThePathCannotRun) {
  SKIP_WITHOUT_BF16();
  Generator gen(8);
  Tensor x = random_tensor({2, 4, 5, 5}, gen);
  EXPECT_THROW(amp::onednn_bf16_conv2d(x, random_tensor({3, 5, 3, 3}, gen), Tensor(), {}),
               ShapeError);  // 4 input channels, weight wants 5
  EXPECT_THROW(amp::onednn_bf16_conv2d(
                   x.to(DType::f64), random_tensor({3, 4, 3, 3}, gen).to(DType::f64), Tensor(), {}),
               DTypeError);
  EXPECT_THROW(amp::onednn_bf16_linear(random_tensor({2, 3}, gen).to(DType::f64),
                                       random_tensor({4, 3}, gen).to(DType::f64), Tensor()),
               DTypeError);
}

// The seed CNN trained a few steps on one fixed random batch, with and without bf16
// autocast: the losses stay close (bf16's 8 significant bits) and both fall.
std::vector<double> train_seed_cnn(bool bf16, int steps) {
  Generator gen(21);
  auto model = nn::make_model("seed-cnn", gen);
  nn::Batch batch = nn::make_random_batch("seed-cnn", 16, gen);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.05).momentum(0.9));
  std::vector<double> losses;
  amp::AutocastGuard autocast(DType::bf16, bf16);
  for (int i = 0; i < steps; ++i) {
    for (auto& p : model->parameters()) p.set_grad(Tensor());
    Tensor loss = cross_entropy((*model)(batch.input), batch.target);
    loss.backward();
    opt.step();
    losses.push_back(loss.item());
  }
  return losses;
}

TEST(CpuBf16, SeedCnnTrainsLikeF32) {
  SKIP_WITHOUT_BF16();
  const int steps = 12;
  std::vector<double> f32 = train_seed_cnn(false, steps), bf16 = train_seed_cnn(true, steps);
  double max_diff = 0;
  for (int i = 0; i < steps; ++i) {
    EXPECT_NEAR(bf16[i], f32[i], 0.03 * f32[i] + 0.01) << "step " << i;
    max_diff = std::max(max_diff, std::fabs(bf16[i] - f32[i]));
  }
  EXPECT_LT(bf16.back(), 0.85 * bf16.front()) << "bf16 training did not learn the batch";
  EXPECT_GT(max_diff, 1e-6) << "bf16 autocast changed nothing";
}

}  // namespace
}  // namespace dtrain
