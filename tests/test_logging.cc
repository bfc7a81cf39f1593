// End-to-end tests of the process log (launcher/src/logging.h): the real dtrain binary,
// alone and under `dtrain launch`, writing rank-<r>.log / launch.log /
// coordinator.log. The oracles are what the test itself knows independently of the
// log: the identity launch hands each worker (rank r of 2 is local rank r on this
// host), the generation the coordinator reports in the worker's own message, the
// host name from gethostname(), and Python's json module for the JSON lines.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace fs = std::filesystem;

namespace {

using Result = dtrain::testing::CommandResult;

const std::string kBin = DTRAIN_BIN;

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_logging", name);
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

std::vector<std::string> lines_of(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

std::string host_name() {
  std::array<char, 256> buf{};
  gethostname(buf.data(), buf.size() - 1);
  return buf.data();
}

// A short mlp run (`dtrain` then these arguments) whose metrics land in dir.
std::string train(const fs::path& dir, const std::string& extra) {
  return "train --no-progress --model mlp --seed 7 --log-every 1 --data-cache " +
         std::string(DTRAIN_DATA_CACHE) + " --metrics " + (dir / "metrics.jsonl").string() + " " +
         extra;
}

// `env <env> dtrain launch --nproc 2 <launch_args> -- dtrain <train_args>`.
Result launch2(const std::string& launch_args, const std::string& train_args,
               const std::string& env = "") {
  return dtrain::testing::run_command(
      "env " + env + " " + kBin + " launch --nproc 2 " + launch_args + " -- dtrain " + train_args,
      120);
}

Result dtrain_cmd(const std::string& args, const std::string& env = "") {
  return dtrain::testing::run_command("env " + env + " " + kBin + " " + args, 60);
}

// One text line: "YYYY-MM-DD HH:MM:SS.mmm L rank R/N local L gen G host H] message".
const std::regex kRankLine(
    R"(^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ([TDIWEC]) rank (\d+)/(\d+) local (\d+) gen (\d+|-) host (\S+)\] (.*)$)");

// Every line of a rank's text file names that rank of 2, its local rank and this host;
// returns the generations seen (with their messages) for further checks.
std::vector<std::pair<std::string, std::string>> check_rank_file(const fs::path& file, int rank) {
  std::vector<std::pair<std::string, std::string>> gens;
  std::vector<std::string> lines = lines_of(file);
  EXPECT_FALSE(lines.empty()) << file;
  for (const std::string& line : lines) {
    std::smatch m;
    if (!std::regex_match(line, m, kRankLine)) {
      ADD_FAILURE() << file << ": not a rank line: " << line;
      continue;
    }
    EXPECT_EQ(m[2].str(), std::to_string(rank)) << line;
    EXPECT_EQ(m[3].str(), "2") << line;
    EXPECT_EQ(m[4].str(), std::to_string(rank)) << line;  // one node: local rank = rank
    EXPECT_EQ(m[6].str(), host_name()) << line;
    gens.emplace_back(m[5].str(), m[7].str());
  }
  return gens;
}

TEST(Logging, LaunchWritesOneFilePerRankThatNamesIt) {
  fs::path dir = scratch("per-rank"), logs = dir / "logs-here";
  Result r = launch2("--log-dir " + logs.string(), train(dir, "--max-steps 3"));
  ASSERT_EQ(r.code, 0) << r.out;
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    auto gens = check_rank_file(logs / ("rank-" + std::to_string(rank) + ".log"), rank);
    // The generation in each line is the one the worker says it joined: 1, a fresh job.
    bool joined = false;
    for (const auto& [gen, msg] : gens) {
      if (contains(msg, "joined generation")) {
        joined = true;
        EXPECT_TRUE(contains(msg, "rank " + std::to_string(rank) + " of 2")) << msg;
        EXPECT_TRUE(contains(msg, "generation " + gen)) << msg;
        EXPECT_EQ(gen, "1");
      }
    }
    EXPECT_TRUE(joined) << "no join line";
  }
  // launch's and the coordinator's own lines name them instead of a rank.
  const std::string host = host_name();
  for (const std::string& who : {std::string("launch"), std::string("coordinator")}) {
    std::vector<std::string> lines = lines_of(logs / (who + ".log"));
    ASSERT_FALSE(lines.empty()) << who;
    for (const std::string& line : lines) {
      EXPECT_TRUE(
          std::regex_search(line, std::regex(" [TDIWEC] " + who + " host " + host + "\\] ")))
          << line;
    }
  }
  // The console got the same lines, prefixed by launch with the rank.
  EXPECT_TRUE(
      std::regex_search(r.out, std::regex(R"(\[rank 1\] \S+ \S+ I rank 1/2 local 1 gen 1 )")))
      << r.out;
}

// The demo's default (no --log-dir): every rank's file under the run folder's logs/.
TEST(Logging, DemoRunLeavesPerRankLogsInItsRunFolder) {
  fs::path cwd = scratch("demo");
  Result r = dtrain::testing::run_command(
      "sh -c 'cd " + cwd.string() + " && " + kBin +
          " launch --nproc 2 -- dtrain train --no-progress --model mlp --max-steps 2 "
          "--data-cache " +
          std::string(DTRAIN_DATA_CACHE) + "'",
      120);
  ASSERT_EQ(r.code, 0) << r.out;
  std::vector<fs::path> runs;
  for (const auto& e : fs::directory_iterator(cwd / "runs")) runs.push_back(e.path());
  ASSERT_EQ(runs.size(), 1u) << "both ranks write into one run folder\n" << r.out;
  for (int rank = 0; rank < 2; ++rank) {
    check_rank_file(runs[0] / "logs" / ("rank-" + std::to_string(rank) + ".log"), rank);
  }
}

// A worker launch restarts into generation 2 does not wait for the survivors to share
// the run folder's time stamp (they are past it): the job finishes, and rank 0's
// default file shows the new generation.
TEST(Logging, RestartWithTheDefaultRunFolderFinishes) {
  fs::path cwd = scratch("demo-restart");
  Result r = dtrain::testing::run_command(
      "sh -c 'cd " + cwd.string() + " && DTRAIN_TEST_KILL_AT=1:2 " + kBin +
          " launch --nproc 2 -- dtrain train --no-progress --model mlp --max-steps 5 "
          "--data-cache " +
          std::string(DTRAIN_DATA_CACHE) + "'",
      60);
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_TRUE(contains(r.out, "rank 1 was killed by signal 9")) << r.out;
  bool rank0_gen2 = false;
  for (const auto& e : fs::directory_iterator(cwd / "runs")) {
    fs::path file = e.path() / "logs" / "rank-0.log";
    if (!fs::exists(file)) continue;
    for (const auto& [gen, msg] : check_rank_file(file, 0)) rank0_gen2 |= gen == "2";
  }
  EXPECT_TRUE(rank0_gen2) << r.out;
}

// The level drops what is below it: the same run killed at the same step by the test
// seam (a warning, then SIGKILL) logs the banner at info and only the warning at warn.
TEST(Logging, LevelWarnDropsInfoLines) {
  std::map<std::string, std::vector<std::string>> levels_seen;
  for (const std::string level : {"info", "warn"}) {
    fs::path dir = scratch("level-" + level);
    Result r =
        dtrain_cmd(train(dir, "--max-steps 5 --log-level " + level), "DTRAIN_TEST_KILL_AT=0:2");
    ASSERT_EQ(r.code, 128 + 9) << r.out;
    std::vector<std::string> lines = lines_of(dir / "logs" / "rank-0.log");
    bool warned = false;
    for (const std::string& line : lines) {
      ASSERT_GT(line.size(), 24u) << line;
      levels_seen[level].push_back(line.substr(24, 1));
      warned |= line[24] == 'W' && contains(line, "DTRAIN_TEST_KILL_AT reached at step 2");
      EXPECT_TRUE(contains(r.out, line.substr(line.find("] ") + 2))) << "not on stderr: " << line;
    }
    EXPECT_TRUE(warned) << level << ": " << r.out;
  }
  auto count = [](const std::vector<std::string>& v, const std::string& l) {
    return std::count(v.begin(), v.end(), l);
  };
  EXPECT_GT(count(levels_seen["info"], "I"), 0);
  EXPECT_EQ(count(levels_seen["warn"], "I"), 0);
  EXPECT_EQ(levels_seen["warn"].size(), 1u);
}

// JSON lines, read back by Python's json module: every field, per rank.
TEST(Logging, JsonLinesParseWithTheRightFields) {
  fs::path dir = scratch("json"), logs = dir / "logs";
  Result r = launch2("--log-format json --log-dir " + logs.string(), train(dir, "--max-steps 2"));
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string script =
      "import json,sys\n"
      "for l in open(sys.argv[1]):\n"
      "  j=json.loads(l)\n"
      "  assert set(j)>={'time','level','rank','local_rank','generation','host','msg'}, j\n"
      "  print(j['time'][:4], j['time'][10], j['time'][-1], j['level'], j['rank'], "
      "j['local_rank'], j['generation'], j['host'], 'msg' if j['msg'] else 'empty')\n";
  std::ofstream(dir / "read.py") << script;
  const std::string host = host_name();
  for (const std::string file : {"rank-0", "rank-1", "launch"}) {
    Result p = dtrain::testing::run_command("/usr/bin/python3 " + (dir / "read.py").string() + " " +
                                            (logs / (file + ".log")).string());
    ASSERT_EQ(p.code, 0) << file << ": " << p.out;
    std::istringstream in(p.out);
    int n = 0;
    for (std::string line; std::getline(in, line); ++n) {
      std::string rank = file == "launch" ? "None" : file.substr(5);
      std::string gen_re = file == "launch" ? "None" : "(None|1)";
      std::regex want("20\\d\\d T Z (trace|debug|info|warn|error) " + rank + " " + rank + " " +
                      gen_re + " " + host + " msg");
      EXPECT_TRUE(std::regex_match(line, want)) << file << ": " << line;
    }
    EXPECT_GT(n, 0) << file;
  }
}

// A worker killed and started again by launch logs its new generation, and so does
// the survivor that re-joined.
TEST(Logging, RestartedWorkerLogsTheNextGeneration) {
  fs::path dir = scratch("restart"), logs = dir / "logs";
  Result r =
      launch2("--log-dir " + logs.string(), train(dir, "--max-steps 6"), "DTRAIN_TEST_KILL_AT=1:2");
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_TRUE(contains(r.out, "rank 1 was killed by signal 9")) << r.out;
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    auto gens = check_rank_file(logs / ("rank-" + std::to_string(rank) + ".log"), rank);
    bool before = false, after = false, rejoined = false;
    for (const auto& [gen, msg] : gens) {
      before |= gen == "1" && !after;
      after |= gen == "2";
      if (gen == "1") EXPECT_FALSE(after) << "gen 1 after gen 2: " << msg;
      rejoined |= gen == "2" && contains(msg, "joined generation 2");
    }
    EXPECT_TRUE(before && after && rejoined) << r.out;
  }
}

// A rank's error reaches launch's console with its rank, and launch's failure line
// quotes it from the rank's log file.
TEST(Logging, FailingRanksErrorReachesTheLauncherWithItsRank) {
  fs::path dir = scratch("fail"), logs = dir / "logs";
  Result r = dtrain::testing::run_command(
      kBin + " launch --nproc 2 --max-restarts 0 --failure-wait 0.5 --grace-period 1 --log-dir " +
          logs.string() +
          " -- sh -c 'if [ $DTRAIN_RANK = 1 ]; then export DTRAIN_TEST_KILL_AT=bad; fi; " +
          "exec " + kBin + " " + train(dir, "--max-steps 50") + "'",
      60);
  ASSERT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(std::regex_search(
      r.out,
      std::regex(
          R"(\[rank 1\] \S+ \S+ E rank 1/2 local 1 gen - host \S+\] dtrain: error: DTRAIN_TEST_KILL_AT=bad)")))
      << r.out;
  EXPECT_TRUE(contains(
      r.out, "dtrain launch: failed: rank 1 exited with code 1; its last error (in " +
                 (logs / "rank-1.log").string() + "): dtrain: error: DTRAIN_TEST_KILL_AT=bad"))
      << r.out;
}

TEST(Logging, BadLogOptionsAreNamed) {
  Result level = dtrain_cmd("train --log-level loud");
  EXPECT_EQ(level.code, 2) << level.out;
  EXPECT_TRUE(contains(level.out, "--log-level")) << level.out;
  Result format = dtrain_cmd("launch --nproc 1 --log-format xml -- true");
  EXPECT_EQ(format.code, 2) << format.out;
  EXPECT_TRUE(contains(format.out, "--log-format")) << format.out;
  Result env = dtrain_cmd("train --max-steps 1", "DTRAIN_LOG_LEVEL=loud");
  EXPECT_EQ(env.code, 1) << env.out;
  EXPECT_TRUE(contains(env.out, "DTRAIN_LOG_LEVEL=loud: expected one of trace, debug")) << env.out;
  fs::path file = scratch("bad-dir") / "a-file";
  std::ofstream(file) << "x";
  Result dir = dtrain_cmd("train --max-steps 1 --log-dir " + (file / "logs").string());
  EXPECT_EQ(dir.code, 1) << dir.out;
  EXPECT_TRUE(contains(dir.out, "--log-dir " + (file / "logs").string() + ": cannot create"))
      << dir.out;
}

}  // namespace
