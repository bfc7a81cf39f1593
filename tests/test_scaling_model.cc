// The scaling model (launcher/src/scaling_model.h): formulas against hand-computed
// values, the fit against known alpha/beta, auto's choice against comm::algorithm_for,
// and `dtrain bench scaling --predict` on a fixed fit file.
#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

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
  // direct, 4 ranks of 1000 B: 2 waits; 750 B of the peers' blocks + its own 250 B
  // for the reduce, 750 B pushed into the peers.
  EXPECT_DOUBLE_EQ(sm::direct_cost(4, 1000).steps, 2);
  EXPECT_DOUBLE_EQ(sm::direct_cost(4, 1000).wire_bytes, 1750);
  EXPECT_DOUBLE_EQ(sm::direct_cost(4, 1000).working_bytes, 4000);
  EXPECT_DOUBLE_EQ(sm::ring_cost(4, 1000).working_bytes, 4000);
}

TEST(ScalingModel, KneeSplitsTheWorkingSetAtTheCache) {
  const sm::Link l{1e-6, 1e9, 1000, 0.5e9};
  // Within the knee every byte at 1 GB/s: 2 x 1 us + 800 B / 1 GB/s.
  EXPECT_NEAR((sm::Cost{2, 800, 1000}).seconds(l), 2e-6 + 0.8e-6, 1e-15);
  // A 4000 B working set: a quarter in cache, three quarters at 0.5 GB/s:
  // 4000 B x (0.25 / 1 GB/s + 0.75 / 0.5 GB/s) = 4000 x 1.75 ns = 7 us.
  EXPECT_NEAR((sm::Cost{0, 4000, 4000}).seconds(l), 7e-6, 1e-15);
  // Continuous at the knee; no knee: one bandwidth.
  EXPECT_NEAR((sm::Cost{0, 1000, 1000.0001}).seconds(l), 1e-6, 1e-12);
  EXPECT_NEAR((sm::Cost{0, 4000, 4000}).seconds(sm::Link{0, 1e9, 0, 0}), 4e-6, 1e-15);
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

TEST(ScalingModel, DirectOnOneHostAndInHierarchicalStages) {
  sm::Machine m = toy_machine();
  m.direct = true;
  m.allreduce_direct_min_bytes = m.local_max_bytes + 1;  // DTRAIN_ALLREDUCE_DIRECT_MIN_BYTES
  m.ranks_per_node = 4;
  const double s = 1 << 20;
  // One host of 4, 1 MiB (above the slots): direct, 2 x 1 us + 1.75 S at 10 GB/s.
  auto d = sm::allreduce_time(m, 4, 1 << 20, Algo::kAuto);
  EXPECT_EQ(d.algo, Algo::kDirect);
  EXPECT_NEAR(d.seconds, 2e-6 + 1.75 * s / 10e9, 1e-12);
  EXPECT_EQ(sm::allreduce_time(m, 4, 4096, Algo::kAuto).algo, Algo::kLocal);
  // 2 nodes x 2, 1 MiB hierarchical: reduce-scatter direct (2 waits, S read), the
  // 512 KiB shard's ring over 2 hosts sharing one NIC, all-gather direct (S/2 read).
  m.ranks_per_node = 2;
  auto h = sm::allreduce_time(m, 4, 1 << 20, Algo::kHierarchical);
  EXPECT_NEAR(h.seconds, 2e-6 + s / 10e9 + 2 * 10e-6 + s / 100e6 + 2e-6 + 0.5 * s / 10e9, 1e-12);
  // Across nodes direct cannot run.
  EXPECT_EQ(sm::allreduce_time(m, 4, 1 << 20, Algo::kAuto).algo, Algo::kRing);
  EXPECT_THROW(sm::allreduce_time(m, 4, 1 << 20, Algo::kDirect), dtrain::InvalidArgument);
}

TEST(ScalingModel, AutoAgreesWithCommAlgorithmFor) {
  const dtrain::comm::AlgoOptions opts;
  for (int per_node : {1, 2, 4, 8}) {
    for (bool direct : {false, true}) {
      for (int ranks : {2, 3, 4, 8, 16}) {
        if (ranks % std::min(ranks, per_node) != 0) continue;
        sm::Machine m = toy_machine();
        m.ranks_per_node = per_node;
        m.direct = direct;
        dtrain::comm::AlgoCapabilities can;
        can.local = ranks <= per_node;  // tcp backend: slots when every rank shares the host
        can.local_capacity = opts.local_max_bytes;
        can.direct = direct && ranks <= per_node;
        for (size_t bytes = 4; bytes <= (64u << 20); bytes *= 2) {
          for (size_t b : {bytes - 1, bytes, bytes + 1}) {
            EXPECT_EQ(
                sm::auto_algo(m, ranks, b),
                dtrain::comm::algorithm_for(opts, dtrain::comm::Collective::kAllreduce, b, can))
                << ranks << " ranks, " << per_node << " per node, " << b << " B";
          }
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
  EXPECT_EQ(got.knee_bytes, 0);
  EXPECT_THROW(sm::fit_link({rows[0], rows[1]}), dtrain::InvalidArgument);
}

// A shaped link costs the larger of latency and transfer; the fit recovers alpha and
// the rate from rows of both kinds (rd small, ring large, 2 and 4 hosts).
TEST(ScalingModel, ShapedLinkTakesTheBindingTermAndFits) {
  const sm::Link truth{25e-6, 0.125e9, 0, 0, 0, true};
  // 2 steps of 25 us against 1 KiB at 125 MB/s (8.2 us): latency binds.
  EXPECT_NEAR((sm::Cost{2, 1024, 0}).seconds(truth), 50e-6, 1e-15);
  // 2 steps against 64 KiB (524 us): the transfer binds.
  EXPECT_NEAR((sm::Cost{2, 65536, 0}).seconds(truth), 65536 / 0.125e9, 1e-15);
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> noise(-0.02, 0.02);
  std::vector<sm::Sample> rows;
  for (int n : {2, 4}) {
    for (double bytes = 8; bytes <= (16 << 20); bytes *= 2) {
      sm::Cost c = bytes <= 65536 ? sm::rd_cost(n, bytes) : sm::ring_cost(n, bytes);
      rows.push_back({sm::LinkClass::kInter, c, c.seconds(truth) * (1 + noise(rng))});
    }
  }
  sm::Link got = sm::fit_link(rows, false, true);
  EXPECT_TRUE(got.shaped);
  EXPECT_NEAR(got.alpha_s, truth.alpha_s, 0.03 * truth.alpha_s);
  EXPECT_NEAR(got.beta_Bps, truth.beta_Bps, 0.03 * truth.beta_Bps);
  EXPECT_LT(sm::relative_error(got, rows), 0.02);
}

// The one-host rows of 2-4 ranks, slots up to 256 KiB and the ring above, with a
// 4 MiB cache knee: the fit finds alpha, both bandwidths and the knee; one stray row
// (a 10x outlier) does not move it.
TEST(ScalingModel, FitRecoversKneeFromNoisyPoints) {
  const sm::Link truth{3e-6, 8e9, 4 << 20, 2e9};
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> noise(-0.01, 0.01);
  std::vector<sm::Sample> rows;
  for (int n : {2, 3, 4}) {
    for (double bytes = 256 << 10; bytes <= (16 << 20); bytes *= 2) {
      sm::Cost c = sm::ring_cost(n, bytes);
      rows.push_back({sm::LinkClass::kIntra, c, c.seconds(truth) * (1 + noise(rng))});
    }
  }
  rows[3].seconds *= 10;
  sm::Link got = sm::fit_link(rows, true);
  EXPECT_NEAR(got.alpha_s, truth.alpha_s, 0.1 * truth.alpha_s);
  EXPECT_NEAR(got.beta_Bps, truth.beta_Bps, 0.05 * truth.beta_Bps);
  EXPECT_NEAR(got.beta_mem_Bps, truth.beta_mem_Bps, 0.05 * truth.beta_mem_Bps);
  EXPECT_EQ(got.knee_bytes, truth.knee_bytes);
  // Without the knee the same rows miss by far more than the noise.
  EXPECT_LT(sm::relative_error(got, rows), 0.5 * sm::relative_error(sm::fit_link(rows), rows));
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
  // A knee and direct round-trip; a knee without its second bandwidth is named.
  sm::Fit knee;
  knee.machine = toy_machine();
  knee.machine.mem = {1e-6, 10e9, 1 << 20, 4e9};
  knee.machine.direct = true;
  knee.workloads.push_back({"toy", 10e-3, {1e6}, 0.5});
  back = sm::fit_from_json(sm::fit_to_json(knee));
  EXPECT_TRUE(back.machine.direct);
  EXPECT_DOUBLE_EQ(back.machine.mem.knee_bytes, 1 << 20);
  EXPECT_NEAR(back.machine.mem.beta_mem_Bps, 4e9, 1e-3);
  EXPECT_EQ(back.machine.inter.knee_bytes, 0);
  j = sm::fit_to_json(knee);
  j["machine"]["mem"].erase("beta_mem_GBps");
  try {
    sm::fit_from_json(j);
    ADD_FAILURE() << "no error for a knee without beta_mem_GBps";
  } catch (const dtrain::DataFormatError& e) {
    EXPECT_NE(std::string(e.what()).find("machine.mem.beta_mem_GBps"), std::string::npos)
        << e.what();
  }
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

// ---- --out DIR: scaling.md, scaling.json, scaling.png ----

namespace {

std::vector<std::string> cells_of(const std::string& line, char sep) {
  std::vector<std::string> out;
  std::istringstream in(line);
  for (std::string c; std::getline(in, c, sep);) {
    const size_t a = c.find_first_not_of(' '), b = c.find_last_not_of(' ');
    if (a != std::string::npos) out.push_back(c.substr(a, b - a + 1));
  }
  return out;
}

std::string read_all(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

uint32_t be32(const std::string& b, size_t at) {
  return uint32_t(uint8_t(b[at])) << 24 | uint32_t(uint8_t(b[at + 1])) << 16 |
         uint32_t(uint8_t(b[at + 2])) << 8 | uint32_t(uint8_t(b[at + 3]));
}

}  // namespace

// The markdown's rows are the printed table's, cell for cell; the JSON's series are
// the table's step times and efficiencies plus the fit file's measured rows; the PNG
// has its signature, an IHDR of 1000 x 400, an IEND, and matplotlib reads it back
// with that shape.
TEST(ScalingModelCli, OutWritesTheTableAndAPlot) {
  nlohmann::json fit = toy_fit_json();
  fit["measured"] = {{"scaling",
                      {{{"model", "toy"}, {"workers", 1}, {"ms_per_step", 10.0}},
                       {{"model", "toy"}, {"workers", 2}, {"ms_per_step", 16.0}}}}};
  const std::string file = write_file("out", fit.dump());
  const auto dir = dtrain::testing::scratch_dir("test_scaling_model", "out_dir") / "report";
  auto r = predict("--predict 8 --model toy --fit-file " + file + " --out " + dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  std::vector<std::vector<std::string>> printed, md;
  std::istringstream out(r.out);
  for (std::string l; std::getline(out, l);) {
    auto c = cells_of(l, ' ');
    if (!c.empty() && std::isdigit(static_cast<unsigned char>(c[0][0]))) printed.push_back(c);
  }
  std::istringstream mdin(read_all(dir / "scaling.md"));
  for (std::string l; std::getline(mdin, l);) {
    if (l.rfind("| ", 0) != 0) continue;
    auto c = cells_of(l, '|');
    if (c.size() == 9 && std::isdigit(static_cast<unsigned char>(c[0][0]))) md.push_back(c);
  }
  ASSERT_EQ(printed.size(), 4u) << r.out;  // 1, 2, 4, 8 ranks
  EXPECT_EQ(md, printed) << read_all(dir / "scaling.md");
  EXPECT_NE(read_all(dir / "scaling.md").find("| ranks | nodes | algo |"), std::string::npos);

  auto j = nlohmann::json::parse(read_all(dir / "scaling.json"));
  ASSERT_EQ(j["series"].size(), 2u);
  const auto& pred = j["series"][0];
  for (size_t i = 0; i < printed.size(); ++i) {
    EXPECT_EQ(pred["ranks"][i].get<int>(), std::stoi(printed[i][0]));
    EXPECT_NEAR(pred["step_ms"][i].get<double>(), std::stod(printed[i][7]), 5e-4);
    EXPECT_NEAR(100 * pred["efficiency"][i].get<double>(), std::stod(printed[i][8]), 0.05);
  }
  EXPECT_EQ(j["series"][1]["ranks"], nlohmann::json({1, 2}));
  EXPECT_NEAR(j["series"][1]["efficiency"][1].get<double>(), 10.0 / 16.0, 1e-12);

  const std::string png = read_all(dir / "scaling.png");
  ASSERT_GT(png.size(), 1000u);
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  EXPECT_EQ(png.substr(12, 4), "IHDR");
  EXPECT_EQ(be32(png, 16), 1000u);
  EXPECT_EQ(be32(png, 20), 400u);
  EXPECT_EQ(png.substr(png.size() - 8, 4), "IEND");
  auto back = dtrain::testing::run_command(
      "/usr/bin/python3 -c \"import matplotlib.image as m; print(m.imread('" +
          (dir / "scaling.png").string() + "').shape[:2])\"",
      60);
  EXPECT_EQ(back.out, "(400, 1000)\n") << back.out;

  // A folder that cannot be made is one clear line naming it.
  r = predict("--predict 2 --model toy --fit-file " + file + " --out /proc/nope/report");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("/proc/nope/report"), std::string::npos) << r.out;
}
