// Grouped and depthwise conv2d: the grouped oracle loops against per-group slices of
// the ungrouped reference conv, the fast kernels (per-group im2col, direct depthwise)
// against the oracle at odd sizes with stride and padding, f64 gradient checks, and
// the error for a group count that does not divide the channels.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <string>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#include "gradcheck.h"
#include "ops_conv.h"

namespace dtrain {
namespace {

using testing::gradcheck;
using testing::max_rel_error;
using testing::randn;

struct Case {
  int64_t n, c, o, groups, h, w, k, stride, pad;
};

std::string str(const Case& c) {
  return fmt::format("n{} c{} o{} g{} {}x{} k{} s{} p{}", c.n, c.c, c.o, c.groups, c.h, c.w, c.k,
                     c.stride, c.pad);
}

const Case kCases[] = {
    {2, 6, 6, 6, 7, 9, 3, 1, 1},   // depthwise, MobileNet's 3x3 pad 1
    {3, 5, 5, 5, 11, 8, 3, 2, 1},  // depthwise, stride 2, odd sizes
    {1, 4, 8, 4, 6, 5, 3, 2, 0},   // depthwise with multiplier 2
    {2, 3, 3, 3, 5, 5, 2, 3, 1},   // depthwise, even kernel, stride 3
    {2, 6, 9, 3, 7, 6, 3, 1, 1},   // 3 groups of 2 -> 3
    {3, 8, 4, 2, 9, 7, 3, 2, 2},   // 2 groups, padding 2
    {1, 4, 6, 2, 5, 5, 1, 1, 0},   // grouped 1x1
};

struct Result {
  Tensor y, dx, dw, db;
};

Result run(ConvAlgo algo, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& dy,
           Conv2dOptions opt) {
  Tensor xr = x.clone().set_requires_grad(true), wr = w.clone().set_requires_grad(true);
  Tensor br = b.clone().set_requires_grad(true);
  Tensor y = conv2d(xr, wr, br, opt, algo);
  std::vector<Tensor> g = grad({y}, {xr, wr, br}, {dy});
  return {y.detach(), g[0], g[1], g[2]};
}

Conv2dOptions options(const Case& c) {
  return {.stride = c.stride, .padding = c.pad, .groups = c.groups};
}

TEST(GroupedConv, OracleEqualsUngroupedConvPerGroup) {
  Generator gen(3);
  for (const Case& c : kCases) {
    SCOPED_TRACE(str(c));
    Tensor x = randn({c.n, c.c, c.h, c.w}, gen, DType::f64);
    Tensor w = randn({c.o, c.c / c.groups, c.k, c.k}, gen, DType::f64);
    Tensor b = randn({c.o}, gen, DType::f64);
    Tensor y = conv2d(x, w, b, options(c), ConvAlgo::kReference);
    int64_t cg = c.c / c.groups, og = c.o / c.groups;
    std::vector<Tensor> parts;
    for (int64_t g = 0; g < c.groups; ++g) {
      Tensor xg = x.narrow(1, g * cg, cg), wg = w.narrow(0, g * og, og);
      Tensor bg = b.narrow(0, g * og, og);
      parts.push_back(
          conv2d(xg, wg, bg, {.stride = c.stride, .padding = c.pad}, ConvAlgo::kReference));
    }
    EXPECT_LE(max_rel_error(y, cat(parts, 1)), 1e-12);
  }
}

TEST(GroupedConv, FastKernelsMatchOracle) {
  Generator gen(5);
  for (const Case& c : kCases) {
    SCOPED_TRACE(str(c));
    Tensor x = randn({c.n, c.c, c.h, c.w}, gen);
    Tensor w = randn({c.o, c.c / c.groups, c.k, c.k}, gen, DType::f32, 0.3);
    Tensor b = randn({c.o}, gen);
    Tensor y0 = conv2d(x, w, b, options(c), ConvAlgo::kReference);
    Tensor dy = randn(y0.shape(), gen);
    auto f64 = [](const Tensor& t) { return t.to(DType::f64); };
    Result ref = run(ConvAlgo::kReference, f64(x), f64(w), f64(b), f64(dy), options(c));
    for (bool dbl : {false, true}) {
      Result got = dbl ? run(ConvAlgo::kAuto, f64(x), f64(w), f64(b), f64(dy), options(c))
                       : run(ConvAlgo::kAuto, x, w, b, dy, options(c));
      double tol = dbl ? 1e-12 : 1e-5;
      EXPECT_LE(max_rel_error(got.y, ref.y), tol) << (dbl ? "f64" : "f32") << " forward";
      EXPECT_LE(max_rel_error(got.dx, ref.dx), tol) << "backward data";
      EXPECT_LE(max_rel_error(got.dw, ref.dw), tol) << "backward weights";
      EXPECT_LE(max_rel_error(got.db, ref.db), tol) << "backward bias";
    }
  }
}

TEST(GroupedConv, Float64Gradcheck) {
  Generator gen(7);
  for (const Case& c : kCases) {
    Tensor x = randn({c.n, c.c, c.h, c.w}, gen).set_requires_grad(true);
    Tensor w = randn({c.o, c.c / c.groups, c.k, c.k}, gen).set_requires_grad(true);
    Tensor b = randn({c.o}, gen).set_requires_grad(true);
    for (ConvAlgo algo : {ConvAlgo::kReference, ConvAlgo::kAuto}) {
      gradcheck(str(c) + " " + conv_algo_name(algo),
                [&](auto& in) { return conv2d(in[0], in[1], in[2], options(c), algo); }, {x, w, b});
    }
  }
}

TEST(GroupedConv, GroupsNotDividingChannelsNamesBothNumbers) {
  Tensor x = zeros({1, 6, 5, 5}), w = zeros({8, 2, 3, 3});
  try {
    conv2d(x, w, Tensor(), {.groups = 4});
    FAIL() << "expected a ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("groups 4 does not divide the 6 input channels"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(conv2d(x, zeros({4, 2, 3, 3}), Tensor(), {.groups = 3}), ShapeError);  // 4 % 3
  EXPECT_THROW(conv2d(x, zeros({6, 3, 3, 3}), Tensor(), {.groups = 3}), ShapeError);  // 3*3 != 6
  EXPECT_THROW(conv2d(x, w, Tensor(), {.groups = 0}), InvalidArgument);
}

}  // namespace
}  // namespace dtrain
