// End-to-end data-parallel training through the real launchers: dtrain launch (tcp
// backend, gRPC coordinator) and mpirun (mpi backend), and a worker killed with
// SIGKILL mid-training.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <thread>

#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

using Result = dtrain::testing::CommandResult;

Result run(const std::string& cmd) { return dtrain::testing::run_command(cmd); }

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_dist", name);
}

double final_accuracy(const fs::path& metrics) {
  std::ifstream in(metrics);
  std::string line, last;
  while (std::getline(in, line)) last = line;
  auto j = nlohmann::json::parse(last, nullptr, false);
  if (j.is_discarded() || !j.contains("test_accuracy")) return -1;
  EXPECT_EQ(j.value("workers", 0), 2) << last;
  return j["test_accuracy"].get<double>();
}

std::string train_args(const fs::path& metrics) {
  return std::string("train --no-progress --data-cache ") + DTRAIN_DATA_CACHE + " --metrics " +
         metrics.string();
}

// Acceptance (main job): 2 workers through dtrain launch reach >= 0.97.
TEST(Distributed, LaunchTwoWorkersReachesAccuracy) {
  fs::path metrics = scratch("launch") / "metrics.jsonl";
  Result r = run(std::string(DTRAIN_BIN) + " launch --nproc 2 -- dtrain " + train_args(metrics));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("2 worker(s) x 32, backend tcp"), std::string::npos) << r.out;
  EXPECT_GE(final_accuracy(metrics), 0.97) << r.out;
}

// Acceptance: mpirun -np 2 trains the demo without dtrain launch.
TEST(Distributed, MpirunTwoWorkersReachesAccuracy) {
  fs::path metrics = scratch("mpirun") / "metrics.jsonl";
  Result r =
      run("mpirun --allow-run-as-root --oversubscribe --mca btl self,vader,tcp "
          "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo -np 2 " +
          std::string(DTRAIN_BIN) + " " + train_args(metrics));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("backend mpi"), std::string::npos) << r.out;
  EXPECT_GE(final_accuracy(metrics), 0.97) << r.out;
}

// The pid of the worker with DTRAIN_RANK=<rank> whose command line mentions `marker`.
pid_t find_worker(const std::string& marker, int rank) {
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream cmd(e.path() / "cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
    if (cmdline.find(marker) == std::string::npos) continue;
    if (cmdline.find(std::string("train") + '\0') == std::string::npos) continue;
    if (cmdline.find(std::string("launch") + '\0') != std::string::npos) continue;
    std::ifstream env(e.path() / "environ");
    std::string environ((std::istreambuf_iterator<char>(env)), std::istreambuf_iterator<char>());
    if (environ.find("DTRAIN_RANK=" + std::to_string(rank) + '\0') != std::string::npos) {
      return static_cast<pid_t>(std::stol(name));
    }
  }
  return -1;
}

// Acceptance: kill -9 of one worker mid-training, without restarts (--max-restarts 0;
// recovery is tests/test_recovery.cc): the other worker and dtrain launch exit
// non-zero within the timeout, naming the lost rank. Never a hang.
TEST(Distributed, KilledWorkerStopsTheJobNamingTheLostRank) {
  fs::path dir = scratch("kill");
  fs::path metrics = dir / "metrics.jsonl";
  fs::path log = dir / "launch.log";
  std::string cmd = std::string(DTRAIN_BIN) + " launch --nproc 2 --max-restarts 0 -- dtrain " +
                    train_args(metrics) + " --timeout 10 --log-every 1 > " + log.string() + " 2>&1";
  pid_t launch = fork();
  ASSERT_GE(launch, 0);
  if (launch == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait until training is under way (a few metrics lines), then kill rank 1.
  auto deadline = Clock::now() + std::chrono::seconds(120);
  size_t lines = 0;
  while (Clock::now() < deadline && lines < 5) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::ifstream in(metrics);
    std::string l;
    lines = 0;
    while (std::getline(in, l)) ++lines;
  }
  ASSERT_GE(lines, 5u) << "training did not start";
  pid_t victim = find_worker(metrics.string(), 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  auto killed_at = Clock::now();
  int status = 0;
  pid_t done = 0;
  while ((done = waitpid(launch, &status, WNOHANG)) == 0 &&
         Clock::now() < killed_at + std::chrono::seconds(30)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  double seconds = std::chrono::duration<double>(Clock::now() - killed_at).count();
  if (done == 0) {
    ::kill(launch, SIGKILL);
    waitpid(launch, &status, 0);
    FAIL() << "dtrain launch still running 30 s after the kill";
  }
  std::ifstream in(log);
  std::stringstream out;
  out << in.rdbuf();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << out.str();
  EXPECT_LT(seconds, 10.0 + 5.0) << "the timeout is 10 s";
  EXPECT_NE(out.str().find("rank 1 was killed by signal 9"), std::string::npos) << out.str();
  // "[rank 0] <log prefix naming rank 0>] dtrain: error: ..." (logging.h).
  EXPECT_TRUE(std::regex_search(
      out.str(),
      std::regex(R"(\[rank 0\] .* E rank 0/2 .*\] dtrain: error: tcp: lost connection to rank 1)")))
      << out.str();
  RecordProperty("seconds_from_kill_to_exit", std::to_string(seconds));
}

}  // namespace
