// End-to-end tests of the final checkpoint on a signal (signal_checkpoint.h): the
// real dtrain binary, two ranks under dtrain launch, real signals.
//
// The oracle is an uninterrupted run with the same seed: a run stopped by a signal
// and resumed with --resume auto must end with bit-identical parameters (the --save
// file) and the same final loss. A signal that reaches one rank only must stop both
// ranks after the same step, with that step's checkpoint committed and exit 75.
//
// The exact step comes from the seam DTRAIN_TEST_SIGNAL_AT=rank:step (the rank sends
// itself SIGUSR1 after that step); the other tests send SIGTERM to one worker found in
// /proc, and SIGUSR1 to launch (which forwards it), at whatever step they land.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace fs = std::filesystem;

namespace {

using Result = dtrain::testing::CommandResult;

const std::string kBin = DTRAIN_BIN;

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_signal_checkpoint", name);
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// `dtrain launch --nproc 2 -- dtrain train ...`: a short mlp run checkpointing into
// dir/ckpt, its parameters saved to dir/final.dtrn.
std::string launch_cmd(const fs::path& dir, const std::string& extra) {
  return kBin + " launch --nproc 2 -- dtrain train --no-progress --model mlp --seed 7 " +
         "--log-every 1 --data-cache " + DTRAIN_DATA_CACHE + " --metrics " +
         (dir / "metrics.jsonl").string() + " --save " + (dir / "final.dtrn").string() +
         " --ckpt-dir " + (dir / "ckpt").string() + " " + extra;
}

Result run(const std::string& cmd) { return dtrain::testing::run_command(cmd, 180); }

// Runs the launch command in the background, waits for training to have begun, then
// runs `act` in a bash script where $L is launch's pid; the result is launch's.
Result launch_and_signal(const fs::path& dir, const std::string& extra, const std::string& act) {
  const fs::path out = dir / "out.txt";
  const fs::path script = dir / "signal.sh";
  std::ofstream(script) << launch_cmd(dir, extra) << " >" << out.string() << " 2>&1 & L=$!\n"
                        << "for i in $(seq 600); do grep -q 'metrics:' " << out.string()
                        << " && break; sleep 0.05; done\nsleep 0.3\n"
                        << act << "\nwait $L; rc=$?\ncat " << out.string() << "\nexit $rc\n";
  return run("bash " + script.string());
}

// The step every "stopped by SIG... after step N" line names (one per rank).
std::set<int64_t> stop_steps(const std::string& out, int* lines) {
  static const std::regex kStop(R"(rank (\d): stopped by SIG[A-Z0-9]+ after step (\d+))");
  std::set<int64_t> steps;
  *lines = 0;
  for (auto it = std::sregex_iterator(out.begin(), out.end(), kStop); it != std::sregex_iterator();
       ++it) {
    steps.insert(std::stoll((*it)[2].str()));
    ++*lines;
  }
  return steps;
}

std::string step_name(int64_t step) {
  std::string digits = std::to_string(step);
  return "step-" + std::string(8 - digits.size(), '0') + digits;
}

// Both ranks stopped after the same step, whose checkpoint is the latest committed.
int64_t expect_one_stop_step(const Result& r, const fs::path& dir) {
  int lines = 0;
  std::set<int64_t> steps = stop_steps(r.out, &lines);
  EXPECT_EQ(lines, 2) << r.out;
  EXPECT_EQ(steps.size(), 1u) << r.out;
  if (steps.size() != 1) return -1;
  const int64_t step = *steps.begin();
  const fs::path folder = dir / "ckpt" / step_name(step);
  EXPECT_TRUE(fs::exists(folder / "manifest.json")) << folder;
  EXPECT_TRUE(fs::exists(folder / "shard-00000-of-00002.dtrn")) << folder;
  EXPECT_TRUE(fs::exists(folder / "shard-00001-of-00002.dtrn")) << folder;
  EXPECT_FALSE(fs::exists(dir / "ckpt" / step_name(step + 1))) << "trained past the stop";
  EXPECT_FALSE(contains(r.out, "test accuracy")) << "evaluated after a stop:\n" << r.out;
  return step;
}

}  // namespace

// Rank 1 alone gets SIGUSR1 after step 23: both ranks commit step 23 and exit 75;
// resuming ends exactly where the uninterrupted run ends.
TEST(SignalCheckpoint, OneRankSignalledBothStopAtTheSameStepAndResumeMatches) {
  const fs::path oracle = scratch("oracle");
  Result full = run(launch_cmd(oracle, "--max-steps 60"));
  ASSERT_EQ(full.code, 0) << full.out;

  const fs::path dir = scratch("stopped");
  Result stop = run("env DTRAIN_TEST_SIGNAL_AT=1:23 " + launch_cmd(dir, "--max-steps 60"));
  EXPECT_EQ(stop.code, 75) << stop.out;
  EXPECT_TRUE(contains(stop.out, "rank 1 got SIGUSR1 at step 23")) << stop.out;
  EXPECT_FALSE(contains(stop.out, "rank 0 got SIGUSR1")) << "rank 0 was not signalled";
  EXPECT_EQ(expect_one_stop_step(stop, dir), 23);
  EXPECT_FALSE(fs::exists(dir / "final.dtrn")) << "--save is for a finished run";

  Result resumed = run(launch_cmd(dir, "--max-steps 60 --resume auto"));
  ASSERT_EQ(resumed.code, 0) << resumed.out;
  EXPECT_TRUE(contains(resumed.out, "resumed from step-00000023")) << resumed.out;
  static const std::regex kLoss(R"(final loss ([0-9.]+))");
  std::smatch a, b;
  ASSERT_TRUE(std::regex_search(full.out, a, kLoss)) << full.out;
  ASSERT_TRUE(std::regex_search(resumed.out, b, kLoss)) << resumed.out;
  EXPECT_EQ(a[1].str(), b[1].str());
  EXPECT_EQ(read_file(oracle / "final.dtrn"), read_file(dir / "final.dtrn"))
      << "the resumed run's parameters differ from the uninterrupted run's";
}

// SIGTERM (Slurm's at the time limit) sent to rank 1's process only, mid-run.
TEST(SignalCheckpoint, SigtermToOneWorkerStopsBothAtOneStep) {
  const fs::path dir = scratch("sigterm");
  const std::string kill_rank1 =
      "for p in $(pgrep -P $L); do tr '\\0' '\\n' </proc/$p/environ | grep -qx DTRAIN_RANK=1 "
      "&& kill -TERM $p; done";
  Result r = launch_and_signal(dir, "--epochs 20", kill_rank1);
  EXPECT_EQ(r.code, 75) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 1 got SIGTERM")) << r.out;
  EXPECT_FALSE(contains(r.out, "rank 0 got SIGTERM")) << r.out;
  EXPECT_GT(expect_one_stop_step(r, dir), 0);
}

// SIGUSR1 to dtrain launch is forwarded to every worker (no restart, exit 75).
TEST(SignalCheckpoint, SigusrToLaunchIsForwarded) {
  const fs::path dir = scratch("launch");
  Result r = launch_and_signal(dir, "--epochs 20", "kill -USR1 $L");
  EXPECT_EQ(r.code, 75) << r.out;
  EXPECT_TRUE(contains(r.out, "got SIGUSR1, forwarding it to the workers")) << r.out;
  EXPECT_FALSE(contains(r.out, "starting it again")) << r.out;
  EXPECT_GT(expect_one_stop_step(r, dir), 0);
}

// A bad signal name fails before training, naming it.
TEST(SignalCheckpoint, UnknownSignalIsRefused) {
  Result r = run(kBin + " train --model mlp --max-steps 1 --ckpt-dir " + scratch("bad").string() +
                 " --checkpoint-signals USR1,KILL");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "unknown signal 'KILL'")) << r.out;
}
