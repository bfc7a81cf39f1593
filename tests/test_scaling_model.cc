// The scaling model (launcher/src/scaling_model.h): formulas against hand-computed
// values, the fit against known alpha/beta, auto's choice against comm::algorithm_for,
// and `dtrain bench scaling --predict` on a fixed fit file.
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "dtrain/common/error.h"
#include "scaling_model.h"
#include "subprocess.h"

namespace sm = dtrain::cli::scaling;
using dtrain::comm::Algo;

namespace {

sm::Machine toy_machine() {
  sm::Machine m;
  m.mem = {1e-6, 10e9};
  m.intra = {5e-6, 1e9};
  m.inter = {10e-6, 100e6};
  return m;
}

TEST(ScalingModel, CostsMatchHandCounts) {
  EXPECT_DOUBLE_EQ(sm::ring_cost(4, 1000).steps, 6);
  EXPECT_DOUBLE_EQ(sm::ring_cost(4, 1000).wire_bytes, 1500);
  EXPECT_DOUBLE_EQ(sm::rd_cost(4, 1000).steps, 2);
  EXPECT_DOUBLE_EQ(sm::rd_cost(4, 1000).wire_bytes, 2000);
  EXPECT_DOUBLE_EQ(sm::rd_cost(3, 1000).steps, 3);  // 1 round + fold-in + hand-back
  EXPECT_DOUBLE_EQ(sm::local_cost(3, 100).wire_bytes, 300);
  EXPECT_DOUBLE_EQ(sm::ring_half_cost(4, 1000).wire_bytes, 750);
  EXPECT_DOUBLE_EQ(sm::ring_cost(1, 1000).seconds(toy_machine().inter), 0);
  // 4 ranks, 1 MB over 10 us / 100 MB/s: 6 x 10 us + 1.5 MB / 100 MB/s.
  EXPECT_NEAR(sm::ring_cost(4, 1e6).seconds(toy_machine().inter), 60e-6 + 15e-3, 1e-12);
}

TEST(ScalingModel, AllreduceTimesByTopology) {
  sm::Machine m = toy_machine();
  // One host of 4 ranks, 64 KiB: the slot algorithm, 2 waits + 4 x 64 KiB at 10 GB/s.
  auto local = sm::allreduce_time(m, 4, 65536, Algo::kAuto);
  m.ranks_per_node = 4;
  local = sm::allreduce_time(m, 4, 65536, Algo::kAuto);
  EXPECT_EQ(local.algo, Algo::kLocal);
  EXPECT_NEAR(local.seconds, 2e-6 + 4 * 65536 / 10e9, 1e-12);
  // 2 nodes x 2 ranks, 1 MiB hierarchical: ring halves inside (1 step, S/2 each), the
  // 512 KiB shard's ring across 2 hosts with 2 rings sharing one NIC (2 steps, S/2 at
  // half the rate), 2 ai + S/bi + 2 ae + S/be in all.
  m.ranks_per_node = 2;
  const double s = 1 << 20;
  auto h = sm::allreduce_time(m, 4, 1 << 20, Algo::kHierarchical);
  EXPECT_NEAR(h.seconds, 2 * 5e-6 + s / 1e9 + 2 * 10e-6 + s / 100e6, 1e-12);
  // Flat ring over the same 4 ranks: every step waits for the inter-node edge.
  auto r = sm::allreduce_time(m, 4, 1 << 20, Algo::kAuto);
  EXPECT_EQ(r.algo, Algo::kRing);
  EXPECT_NEAR(r.seconds, 6 * 10e-6 + 1.5 * s / 100e6, 1e-12);
  // 8 B across 4 one-rank nodes: recursive doubling, 2 rounds.
  m.ranks_per_node = 1;
  auto rd = sm::allreduce_time(m, 4, 8, Algo::kAuto);
  EXPECT_EQ(rd.algo, Algo::kRecursiveDoubling);
  EXPECT_NEAR(rd.seconds, 2 * 10e-6 + 16 / 100e6, 1e-15);
  EXPECT_NEAR(sm::busbw_Bps(4, 1e6, 1e-3), 1.5e9, 1e-3);
}

TEST(ScalingModel, AutoAgreesWithCommAlgorithmFor) {
  const dtrain::comm::AlgoOptions opts;
  for (int per_node : {1, 2, 4, 8}) {
    for (int ranks : {2, 3, 4, 8, 16}) {
      if (ranks % std::min(ranks, per_node) != 0) continue;
      sm::Machine m = toy_machine();
      m.ranks_per_node = per_node;
      dtrain::comm::AlgoCapabilities can;
      can.local = ranks <= per_node;  // tcp backend: slots when every rank shares the host
      can.local_capacity = opts.local_max_bytes;
      for (size_t bytes = 4; bytes <= (64u << 20); bytes *= 2) {
        for (size_t b : {bytes - 1, bytes, bytes + 1}) {
          EXPECT_EQ(sm::auto_algo(m, ranks, b),
                    dtrain::comm::algorithm_for(opts, dtrain::comm::Collective::kAllreduce, b, can))
              << ranks << " ranks, " << per_node << " per node, " << b << " B";
        }
      }
    }
  }
}

TEST(ScalingModel, FitRecoversKnownLinkFromNoisyPoints) {
  const sm::Link truth{20e-6, 0.11e9};
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> noise(-0.03, 0.03);
  std::vector<sm::Sample> rows;
  for (int n : {2, 4}) {
    for (double bytes = 8; bytes <= (16 << 20); bytes *= 2) {
      sm::Cost c = bytes <= 65536 ? sm::rd_cost(n, bytes) : sm::ring_cost(n, bytes);
      rows.push_back({sm::LinkClass::kInter, c, c.seconds(truth) * (1 + noise(rng))});
    }
  }
  sm::Link got = sm::fit_link(rows);
  EXPECT_NEAR(got.alpha_s, truth.alpha_s, 0.05 * truth.alpha_s);
  EXPECT_NEAR(got.beta_Bps, truth.beta_Bps, 0.05 * truth.beta_Bps);
  EXPECT_THROW(sm::fit_link({rows[0], rows[1]}), dtrain::InvalidArgument);
}

TEST(ScalingModel, FitRecoversOverlap) {
  std::vector<sm::StepSample> rows;
  for (double comm : {1e-3, 3e-3, 8e-3}) rows.push_back({0.02 + 0.6 * comm, 0.02, comm});
  EXPECT_NEAR(sm::fit_overlap(rows), 0.4, 1e-9);
  rows = {{0.01, 0.02, 1e-3}};  // faster than compute alone: everything hidden
  EXPECT_DOUBLE_EQ(sm::fit_overlap(rows), 1.0);
}

TEST(ScalingModel, PredictRanksRefusesBadCounts) {
  EXPECT_EQ(sm::predict_ranks(8), (std::vector<int>{1, 2, 4, 8}));
  for (int bad : {0, -4, 3, 12, 2048})
    EXPECT_THROW(sm::predict_ranks(bad), dtrain::InvalidArgument);
}

nlohmann::json toy_fit_json() {
  sm::Fit fit;
  fit.machine = toy_machine();
  fit.workloads.push_back({"toy", 10e-3, {1e6}, 0.5});
  return sm::fit_to_json(fit);
}

TEST(ScalingModel, FitFileRoundTripsAndNamesBadFields) {
  sm::Fit back = sm::fit_from_json(toy_fit_json());
  EXPECT_NEAR(back.machine.inter.alpha_s, 10e-6, 1e-15);
  EXPECT_NEAR(back.machine.inter.beta_Bps, 100e6, 1e-3);
  ASSERT_EQ(back.workloads.size(), 1u);
  EXPECT_EQ(back.workloads[0].bucket_bytes, std::vector<double>{1e6});
  nlohmann::json j = toy_fit_json();
  j["machine"].erase("inter");
  EXPECT_THROW(sm::fit_from_json(j), dtrain::DataFormatError);
  j = toy_fit_json();
  j["machine"]["intra"]["beta_GBps"] = -1;
  EXPECT_THROW(sm::fit_from_json(j), dtrain::DataFormatError);
}

// ---- the CLI ----

std::string write_file(const std::string& name, const std::string& text) {
  auto dir = dtrain::testing::scratch_dir("test_scaling_model", name);
  std::string path = (dir / "fit.json").string();
  std::ofstream(path) << text;
  return path;
}

dtrain::testing::CommandResult predict(const std::string& args) {
  return dtrain::testing::run_command(std::string(DTRAIN_BIN) + " bench scaling " + args, 60);
}

TEST(ScalingModelCli, PredictPrintsTheHandComputedTable) {
  const std::string fit = write_file("predict", toy_fit_json().dump());
  auto r = predict("--predict 4 --model toy --fit-file " + fit);
  ASSERT_EQ(r.code, 0) << r.out;
  // n=2: ring 2 x 10 us + 1 MB / 100 MB/s = 10.02 ms, half exposed: 15.010 ms, 66.6%.
  EXPECT_NE(
      r.out.find("     2      2          ring        10020.0        0.100     10.020      5.010"
                 "     15.010    66.6%"),
      std::string::npos)
      << r.out;
  // n=4: 6 x 10 us + 1.5 MB / 100 MB/s = 15.06 ms; step 17.530 ms, 57.0%.
  EXPECT_NE(r.out.find("17.530    57.0%"), std::string::npos) << r.out;
  // --link-gbps sets the inter-node rate: 8 Gb/s = 1 GB/s, n=2: 20 us + 1 ms.
  r = predict("--predict 2 --model toy --link-gbps 8 --fit-file " + fit);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("1020.0"), std::string::npos) << r.out;
}

void expect_one_line_error(const dtrain::testing::CommandResult& r, const std::string& words) {
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find(words), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
}

TEST(ScalingModelCli, BadInputGivesOneClearLine) {
  const std::string fit = write_file("bad", toy_fit_json().dump());
  expect_one_line_error(predict("--predict 3 --model toy --fit-file " + fit), "power of two");
  expect_one_line_error(predict("--predict 0 --model toy --fit-file " + fit), "power of two");
  expect_one_line_error(predict("--predict 4 --model toy --link-gbps -2 --fit-file " + fit),
                        "--link-gbps -2: must be > 0");
  expect_one_line_error(predict("--predict 4 --model toy --fit-file /nonexistent/fit.json"),
                        "cannot be read");
  expect_one_line_error(predict("--predict 4 --model toy --fit-file " + write_file("junk", "{x")),
                        "not valid JSON");
  expect_one_line_error(
      predict("--predict 4 --model toy --fit-file " + write_file("nover", "{\"version\": 1}")),
      "machine is missing");
  expect_one_line_error(predict("--predict 4 --model nope --fit-file " + fit), "no such workload");
}

}  // namespace
