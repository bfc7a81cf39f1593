// End-to-end tests of fault recovery (issue 5): the real dtrain binary under
// dtrain launch, with real processes killed by SIGKILL. The oracle is always an
// uninterrupted run with the same seed: after a recovery the final parameters (the
// --save file) and the loss curve (the metrics file) must be bit-identical.
//
// Kills come from the train.cc test seam DTRAIN_TEST_KILL_AT=rank:step (the worker
// SIGKILLs itself after that step, so the step is chosen exactly even on a loaded
// machine) or from this test (kill -9 of a worker or the coordinator found in /proc).
// DTRAIN_TEST_COMMIT_DELAY_MS holds every rank between writing its shard and
// CommitShard, the window in which a worker is killed mid-checkpoint.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
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

const std::string kBin = DTRAIN_BIN;

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_recovery", name);
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

// The short mlp run every test uses (`dtrain` then these arguments): its metrics and
// final parameters land in dir.
std::string train(const fs::path& dir, const std::string& extra) {
  return "train --no-progress --model mlp --seed 7 --log-every 1 --data-cache " +
         std::string(DTRAIN_DATA_CACHE) + " --metrics " + (dir / "metrics.jsonl").string() +
         " --save " + (dir / "final.dtrn").string() + " " + extra;
}

// `dtrain launch --nproc N <launch_args> -- dtrain <train_args>` with the variables in
// env ("A=1 B=2") set.
Result launch(int nproc, const std::string& launch_args, const std::string& train_args,
              const std::string& env = "") {
  return dtrain::testing::run_command("env " + env + " " + kBin + " launch --nproc " +
                                          std::to_string(nproc) + " " + launch_args +
                                          " -- dtrain " + train_args,
                                      300);
}

// `dtrain <train_args>` as a single process.
Result single(const std::string& train_args, const std::string& env = "") {
  return dtrain::testing::run_command("env " + env + " " + kBin + " " + train_args, 120);
}

// step -> logged loss (the average over the ranks).
std::map<int64_t, double> losses(const fs::path& metrics) {
  std::map<int64_t, double> out;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("loss")) out[j["step"].get<int64_t>()] = j["loss"];
  }
  return out;
}

double final_accuracy(const fs::path& metrics) {
  std::ifstream in(metrics);
  std::string line, last;
  while (std::getline(in, line)) last = line;
  auto j = nlohmann::json::parse(last, nullptr, false);
  if (j.is_discarded() || !j.contains("test_accuracy")) return -1;
  return j["test_accuracy"].get<double>();
}

// Every "unix time T" printed on lines that contain `marker`.
std::vector<double> unix_times(const std::string& out, const std::string& marker) {
  std::vector<double> times;
  std::istringstream in(out);
  std::string line;
  static const std::regex kTime(R"(unix time ([0-9]+\.[0-9]+))");
  while (std::getline(in, line)) {
    std::smatch m;
    if (contains(line, marker) && std::regex_search(line, m, kTime)) {
      times.push_back(std::stod(m[1].str()));
    }
  }
  return times;
}

// Seconds from the kill to the first "training again" after it; -1 when missing.
double recovery_seconds(const std::string& out) {
  std::vector<double> killed = unix_times(out, "SIGKILL");
  if (killed.empty()) return -1;
  double best = -1;
  for (double t : unix_times(out, "training again")) {
    if (t >= killed[0] && (best < 0 || t - killed[0] < best)) best = t - killed[0];
  }
  return best;
}

// The pid of a process whose command line holds every string in `parts` and, when
// rank >= 0, whose environment has DTRAIN_RANK=rank.
pid_t find_process(const std::vector<std::string>& parts, int rank) {
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string cmdline = read_file(e.path() / "cmdline");
    bool all = !cmdline.empty();
    for (const std::string& p : parts) all = all && contains(cmdline, p);
    if (!all || contains(cmdline, std::string("launch") + '\0')) continue;
    if (rank >= 0) {
      std::string env = read_file(e.path() / "environ");
      if (!contains(env, "DTRAIN_RANK=" + std::to_string(rank) + '\0')) continue;
    }
    return static_cast<pid_t>(std::stol(name));
  }
  return -1;
}

// A command running in the background with its output in a file.
class Background {
 public:
  Background(const std::string& cmd, const fs::path& log) : log_(log) {
    pid_ = fork();
    if (pid_ == 0) {
      std::string full = "exec " + cmd + " > " + log.string() + " 2>&1";
      execl("/bin/sh", "sh", "-c", full.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  ~Background() {
    if (pid_ > 0 && !done_) {
      ::kill(pid_, SIGKILL);
      waitpid(pid_, &status_, 0);
    }
  }
  std::string output() const { return read_file(log_); }
  // Waits until the output contains `what` (false after `limit`).
  bool wait_for_output(const std::string& what, std::chrono::seconds limit) const {
    auto end = Clock::now() + limit;
    while (Clock::now() < end) {
      if (contains(output(), what)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
  // The exit code (128 + signal), or -1 when it did not end within `limit`.
  int wait(std::chrono::seconds limit) {
    auto end = Clock::now() + limit;
    while (Clock::now() < end) {
      if (waitpid(pid_, &status_, WNOHANG) == pid_) {
        done_ = true;
        return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }

 private:
  fs::path log_;
  pid_t pid_ = -1;
  int status_ = 0;
  bool done_ = false;
};

// ---- acceptance 1: kill -9 of a random worker at a random step ----

class KilledWorker : public ::testing::TestWithParam<int> {};

TEST_P(KilledWorker, JobFinishesWithTheUninterruptedRunsParameters) {
  const int n = GetParam();
  const std::string tag = std::to_string(n);
  fs::path ref = scratch("ref" + tag), run = scratch("kill" + tag);
  Result a = launch(n, "", train(ref, "--max-steps 40"));
  ASSERT_EQ(a.code, 0) << a.out;

  std::mt19937 rng(std::random_device{}());
  const int rank = static_cast<int>(rng() % static_cast<unsigned>(n));
  const int step = 3 + static_cast<int>(rng() % 33);  // 3..35
  std::string env = "DTRAIN_TEST_KILL_AT=" + std::to_string(rank) + ":" + std::to_string(step);
  Result b = launch(
      n, "", train(run, "--max-steps 40 --ckpt-every 5 --ckpt-dir " + (run / "ckpt").string()),
      env);
  SCOPED_TRACE("killed rank " + std::to_string(rank) + " at step " + std::to_string(step));
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_TRUE(contains(b.out, "rank " + std::to_string(rank) + " was killed by signal 9")) << b.out;
  EXPECT_TRUE(contains(b.out, "starting it again (restart 1 of 3)")) << b.out;
  // The oracle: the uninterrupted run, bit for bit.
  std::string want = read_file(ref / "final.dtrn");
  ASSERT_FALSE(want.empty());
  EXPECT_TRUE(read_file(run / "final.dtrn") == want) << "final parameters differ\n" << b.out;
  EXPECT_EQ(losses(run / "metrics.jsonl"), losses(ref / "metrics.jsonl"));
  EXPECT_EQ(losses(run / "metrics.jsonl").size(), 40u);

  double seconds = recovery_seconds(b.out);
  std::printf("[ recovery ] %d workers, rank %d killed at step %d: training again %.2f s later\n",
              n, rank, step, seconds);
  EXPECT_GT(seconds, 0) << b.out;
  EXPECT_LT(seconds, 10.0) << b.out;
  RecordProperty("seconds_from_kill_to_training", std::to_string(seconds));
}

INSTANTIATE_TEST_SUITE_P(Workers, KilledWorker, ::testing::Values(2, 4));

// The same, with the kill coming from outside at a moment nobody chose: a random
// worker is SIGKILLed once the metrics file shows a random number of steps, wherever
// it is then (forward, backward, inside an all-reduce, writing a shard).
TEST(Recovery, ExternalKillAtARandomMomentFinishesBitExact) {
  fs::path ref = scratch("ext-ref"), run = scratch("ext-kill");
  Result a = launch(2, "", train(ref, "--max-steps 150"));
  ASSERT_EQ(a.code, 0) << a.out;

  std::mt19937 rng(std::random_device{}());
  const int rank = static_cast<int>(rng() % 2u);
  const size_t after = 10 + rng() % 100;  // steps logged before the kill: 10..109
  // Commits held 50 ms each stretch the run to about 1.5 s, long enough to aim at.
  std::string cmd =
      "env DTRAIN_TEST_COMMIT_DELAY_MS=50 " + kBin + " launch --nproc 2 -- dtrain " +
      train(run, "--max-steps 150 --ckpt-every 5 --ckpt-dir " + (run / "ckpt").string());
  Background job(cmd, run / "launch.log");
  auto deadline = Clock::now() + std::chrono::seconds(120);
  while (losses(run / "metrics.jsonl").size() < after && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  pid_t victim = find_process({std::string("train") + '\0', run.string()}, rank);
  ASSERT_GT(victim, 0) << job.output();
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  SCOPED_TRACE("killed rank " + std::to_string(rank) + " after " + std::to_string(after) +
               " logged steps");
  int code = job.wait(std::chrono::seconds(120));
  std::string out = job.output();
  ASSERT_EQ(code, 0) << out;
  EXPECT_TRUE(contains(out, "rank " + std::to_string(rank) + " was killed by signal 9")) << out;
  EXPECT_TRUE(read_file(run / "final.dtrn") == read_file(ref / "final.dtrn"))
      << "final parameters differ from the uninterrupted run\n"
      << out;
  EXPECT_EQ(losses(run / "metrics.jsonl"), losses(ref / "metrics.jsonl"));
}

// ---- acceptance 2: a worker killed while a checkpoint is being written ----

TEST(Recovery, WorkerKilledMidCheckpointLeavesThePreviousOneLatest) {
  fs::path dir = scratch("midckpt");
  fs::path ckpt = dir / "ckpt";
  std::string cmd = "env DTRAIN_TEST_COMMIT_DELAY_MS=1500 " + kBin +
                    " launch --nproc 2 --max-restarts 0 -- dtrain " +
                    train(dir, "--max-steps 30 --ckpt-every 5 --ckpt-dir " + ckpt.string());
  Background job(cmd, dir / "launch.log");
  ASSERT_TRUE(
      job.wait_for_output("rank 1: shard of step-00000010 written", std::chrono::seconds(120)))
      << job.output();
  pid_t victim = find_process({(dir / "metrics.jsonl").string(), std::string("train") + '\0'}, 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  int code = job.wait(std::chrono::seconds(60));
  EXPECT_NE(code, 0) << job.output();
  EXPECT_NE(code, -1) << "dtrain launch did not end\n" << job.output();

  EXPECT_EQ(read_file(ckpt / "latest"), "step-00000005\n") << job.output();
  EXPECT_FALSE(fs::exists(ckpt / "step-00000010" / "manifest.json"));
  // And it loads: a single process resumes from it (2 -> 1 workers).
  fs::path again = scratch("midckpt-resume");
  Result r = single(train(again, "--max-steps 12 --ckpt-dir " + ckpt.string() + " --resume auto"));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "resumed from step-00000005")) << r.out;
}

// ---- acceptance 3: one flipped byte in a shard ----

TEST(Recovery, CorruptShardIsNamedAndResumeFallsBackBitExact) {
  fs::path ref = scratch("corrupt-ref"), first = scratch("corrupt-first"),
           resumed = scratch("corrupt-resumed");
  fs::path ckpt = first / "ckpt";
  Result a = single(train(ref, "--max-steps 15"));
  ASSERT_EQ(a.code, 0) << a.out;
  // The same run, killed after step 12: committed checkpoints at 5 and 10.
  Result b =
      single(train(first, "--max-steps 15 --ckpt-every 5 --keep 0 --ckpt-dir " + ckpt.string()),
             "DTRAIN_TEST_KILL_AT=0:12");
  ASSERT_EQ(b.code, 128 + SIGKILL) << b.out;
  ASSERT_EQ(read_file(ckpt / "latest"), "step-00000010\n");
  fs::path shard = ckpt / "step-00000010" / "shard-00000-of-00001.dtrn";
  std::string bytes = read_file(shard);
  ASSERT_GT(bytes.size(), 100u);
  bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x01);
  std::ofstream(shard, std::ios::binary | std::ios::trunc) << bytes;

  Result c =
      single(train(resumed, "--max-steps 15 --ckpt-dir " + ckpt.string() + " --resume auto"));
  ASSERT_EQ(c.code, 0) << c.out;
  EXPECT_TRUE(contains(c.out, "step-00000010")) << c.out;
  EXPECT_TRUE(contains(c.out, "shard-00000-of-00001.dtrn")) << c.out;
  EXPECT_TRUE(contains(c.out, "resumed from step-00000005")) << c.out;
  EXPECT_TRUE(read_file(resumed / "final.dtrn") == read_file(ref / "final.dtrn"))
      << "the resumed run's parameters differ from the uninterrupted run's";
  std::map<int64_t, double> want = losses(ref / "metrics.jsonl");
  std::map<int64_t, double> got = losses(resumed / "metrics.jsonl");
  ASSERT_EQ(got.size(), 10u);  // steps 6..15
  for (const auto& [s, loss] : got) EXPECT_EQ(loss, want[s]) << "step " << s;
}

// ---- acceptance 4: --max-restarts exhausted ----

TEST(Recovery, ExhaustedRestartsFailTheJobWithTheReason) {
  fs::path dir = scratch("exhaust");
  Result r =
      launch(2, "--max-restarts 2",
             train(dir, "--max-steps 30 --ckpt-every 5 --ckpt-dir " + (dir / "ckpt").string()),
             "DTRAIN_TEST_KILL_AT=1:7:always");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "starting it again (restart 2 of 2)")) << r.out;
  EXPECT_TRUE(contains(r.out, "dtrain launch: failed: rank 1 was killed by signal 9")) << r.out;
  EXPECT_TRUE(contains(r.out, "restarts exhausted (2 of 2")) << r.out;
  EXPECT_TRUE(contains(r.out, "FAILED")) << r.out;
}

// ---- acceptance 5: the coordinator killed and restarted mid-run ----

TEST(Recovery, CoordinatorKilledMidRunTheJobCompletes) {
  fs::path ref = scratch("coord-ref"), dir = scratch("coord");
  Result a = launch(2, "", train(ref, "--max-steps 120"));
  ASSERT_EQ(a.code, 0) << a.out;
  // Commits held 300 ms each stretch the run to a few seconds.
  std::string cmd =
      "env DTRAIN_TEST_COMMIT_DELAY_MS=300 " + kBin +
      " launch --nproc 2 --heartbeat-interval 0.5 --state-dir " + (dir / "state").string() +
      " -- dtrain " +
      train(dir, "--max-steps 120 --ckpt-every 5 --ckpt-dir " + (dir / "ckpt").string());
  Background job(cmd, dir / "launch.log");
  ASSERT_TRUE(job.wait_for_output("checkpoint step-00000015 committed", std::chrono::seconds(120)))
      << job.output();
  pid_t coord = find_process({std::string("coordinator") + '\0', (dir / "state").string()}, -1);
  ASSERT_GT(coord, 0);
  ASSERT_EQ(::kill(coord, SIGKILL), 0);
  int code = job.wait(std::chrono::seconds(120));
  std::string out = job.output();
  ASSERT_EQ(code, 0) << out;
  EXPECT_TRUE(contains(out, "the coordinator was killed by signal 9 (SIGKILL); starting it again"))
      << out;
  EXPECT_TRUE(contains(out, "continued from")) << out;  // the new one read job.json
  // The workers learnt the new generation from their heartbeats and re-joined.
  EXPECT_TRUE(contains(out, "rank 0 joined generation 2")) << out;
  EXPECT_TRUE(contains(out, "rank 1 joined generation 2")) << out;
  EXPECT_TRUE(read_file(dir / "final.dtrn") == read_file(ref / "final.dtrn"))
      << "final parameters differ from the uninterrupted run\n"
      << out;
  EXPECT_EQ(losses(dir / "metrics.jsonl"), losses(ref / "metrics.jsonl"));
}

// ---- mpirun with a coordinator (issue 12): MPI moves the data, the coordinator commits ----

// `mpirun -np 2 dtrain <train_args>` on loopback, with `exports` ("-x A=1 -x B") passed.
Result mpirun2(const std::string& exports, const std::string& train_args) {
  return dtrain::testing::run_command(
      "mpirun --allow-run-as-root --oversubscribe --mca btl self,vader,tcp "
      "--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo -np 2 " +
          exports + " " + kBin + " " + train_args + " 2>&1",
      300);
}

// Rank 1 killed after step 25 ends the mpirun run (MPI cannot replace a rank); the
// checkpoints up to step 20 were committed by the coordinator (two-phase, its log
// says so); a second mpirun joins the same coordinator as generation 2, resumes
// from step 20 and ends bit for bit like an uninterrupted mpirun without one.
TEST(Recovery, MpirunWithCoordinatorCommitsAndARerunResumesBitExact) {
  fs::path ref = scratch("mpi-ref"), dir = scratch("mpi-coord");
  Result a = mpirun2("", train(ref, "--max-steps 30 --backend mpi"));
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_TRUE(contains(a.out, "backend mpi")) << a.out;
  Background coord(kBin + " coordinator --port 0 --world-size 2", dir / "coordinator.log");
  ASSERT_TRUE(coord.wait_for_output("\n", std::chrono::seconds(30))) << coord.output();
  std::smatch m;
  const std::string banner = coord.output();
  ASSERT_TRUE(std::regex_search(banner, m, std::regex("listening on (\\S+)"))) << banner;
  const std::string at = "-x DTRAIN_COORDINATOR=" + m[1].str();
  const std::string args = train(
      dir, "--max-steps 30 --backend mpi --ckpt-every 10 --ckpt-dir " + (dir / "ckpt").string());
  Result b = mpirun2(at + " -x DTRAIN_TEST_KILL_AT=1:25", args);
  ASSERT_NE(b.code, 0) << b.out;
  EXPECT_EQ(read_file(dir / "ckpt" / "latest"), "step-00000020\n");
  EXPECT_TRUE(
      contains(coord.output(), "checkpoint step-00000020 committed (2 shards, generation 1)"))
      << coord.output();
  Result c = mpirun2(at, args + " --resume auto");
  ASSERT_EQ(c.code, 0) << c.out << coord.output();
  EXPECT_TRUE(contains(c.out, "resumed from step-00000020")) << c.out;
  EXPECT_TRUE(contains(c.out, "backend mpi")) << c.out;
  EXPECT_TRUE(
      contains(coord.output(), "checkpoint step-00000030 committed (2 shards, generation 2)"))
      << coord.output();
  EXPECT_TRUE(read_file(dir / "final.dtrn") == read_file(ref / "final.dtrn"))
      << "the resumed run's parameters differ from the uninterrupted run's\n"
      << c.out;
}

// ---- dtrain status: the job's state and each rank's progress from the coordinator ----

TEST(Recovery, StatusShowsEveryRanksProgressAndRefusesAWrongToken) {
  fs::path dir = scratch("status");
  // Long enough to be still running when status asks (5 epochs were 438 steps: 3.6 s on a
  // quiet machine with the workers pinned), ended by --max-steps.
  Background job(
      kBin + " launch --nproc 2 --token tk -- dtrain " + train(dir, "--epochs 50 --max-steps 2000"),
      dir / "launch.log");
  ASSERT_TRUE(job.wait_for_output("rendezvous complete", std::chrono::seconds(60))) << job.output();
  std::smatch m;
  const std::string out = job.output();
  ASSERT_TRUE(std::regex_search(out, m, std::regex("listening on (\\S+)"))) << out;
  const std::string status = kBin + " status --coordinator " + m[1].str();
  nlohmann::json j;
  auto deadline = Clock::now() + std::chrono::seconds(60);
  for (; Clock::now() < deadline; std::this_thread::sleep_for(std::chrono::milliseconds(200))) {
    Result r = dtrain::testing::run_command(status + " --token tk --json", 30);
    ASSERT_EQ(r.code, 0) << r.out;
    j = nlohmann::json::parse(r.out.substr(r.out.find('{')));
    if (j["workers"].size() == 2 && j["workers"][0]["step"].get<int64_t>() >= 10 &&
        j["workers"][1]["step"].get<int64_t>() >= 10) {
      break;
    }
  }
  ASSERT_EQ(j["workers"].size(), 2u) << j.dump();
  EXPECT_EQ(j["state"], "RUNNING") << j.dump();
  EXPECT_EQ(j["generation"], 1) << j.dump();
  for (int r = 0; r < 2; ++r) {
    const nlohmann::json& w = j["workers"][r];
    EXPECT_EQ(w["rank"], r);
    EXPECT_EQ(w["state"], "ALIVE");
    EXPECT_GE(w["step"].get<int64_t>(), 10) << j.dump();
    EXPECT_GT(w["samples_per_s"].get<double>(), 0) << j.dump();
    EXPECT_GT(w["loss"].get<double>(), 0) << j.dump();
  }
  Result table = dtrain::testing::run_command(status + " --token tk", 30);
  EXPECT_EQ(table.code, 0) << table.out;
  EXPECT_TRUE(contains(table.out, "RUNNING, world size 2, generation 1")) << table.out;
  Result wrong = dtrain::testing::run_command(status + " --token nope", 30);
  EXPECT_EQ(wrong.code, 1) << wrong.out;
  EXPECT_TRUE(contains(wrong.out, "wrong job token")) << wrong.out;
  Result none =
      dtrain::testing::run_command(kBin + " status --coordinator 127.0.0.1:1 --timeout 1", 30);
  EXPECT_EQ(none.code, 1) << none.out;
  EXPECT_TRUE(contains(none.out, "not reachable within 1.0 s")) << none.out;
  ASSERT_EQ(job.wait(std::chrono::seconds(180)), 0) << job.output();
  // The loss the heartbeats carried is one that rank 0 logged (the combined loss).
  bool logged = false;
  for (const auto& [step, loss] : losses(dir / "metrics.jsonl")) {
    logged = logged || std::abs(loss - j["workers"][0]["loss"].get<double>()) < 1e-6;
  }
  EXPECT_TRUE(logged) << j.dump();
}

// ---- a hung worker: missed heartbeats ----

TEST(Recovery, StoppedWorkerIsDeclaredLostKilledAndRestarted) {
  fs::path ref = scratch("stop-ref"), dir = scratch("stop");
  Result a = launch(2, "", train(ref, "--max-steps 40"));
  ASSERT_EQ(a.code, 0) << a.out;
  std::string cmd =
      "env DTRAIN_TEST_COMMIT_DELAY_MS=200 " + kBin +
      " launch --nproc 2 --heartbeat-interval 0.3 --heartbeat-timeout 2 -- dtrain " +
      train(dir, "--max-steps 40 --ckpt-every 5 --ckpt-dir " + (dir / "ckpt").string());
  Background job(cmd, dir / "launch.log");
  ASSERT_TRUE(job.wait_for_output("checkpoint step-00000010 committed", std::chrono::seconds(120)))
      << job.output();
  pid_t victim = find_process({(dir / "metrics.jsonl").string(), std::string("train") + '\0'}, 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGSTOP), 0);  // alive but silent: only its heartbeats tell
  int code = job.wait(std::chrono::seconds(120));
  std::string out = job.output();
  ASSERT_EQ(code, 0) << out;
  EXPECT_TRUE(contains(out, "lost: no heartbeat")) << out;
  EXPECT_TRUE(
      contains(out, "the coordinator declared rank 1 (pid " + std::to_string(victim) + ") lost"))
      << out;
  EXPECT_TRUE(contains(out, "rank 1 was killed by signal 9 (SIGKILL); starting it again")) << out;
  EXPECT_TRUE(read_file(dir / "final.dtrn") == read_file(ref / "final.dtrn"))
      << "final parameters differ from the uninterrupted run\n"
      << out;
}

// ---- elastic: a worker that cannot come back ----

TEST(Recovery, ElasticJobGoesOnWithFewerWorkers) {
  fs::path dir = scratch("elastic");
  // Rank 2 is killed at step 7; its restarts never come back (the wrapper exits
  // before dtrain starts), so after its restarts the job goes on with ranks 0 and 1.
  std::string worker =
      "sh -c 'if [ -n \"$DTRAIN_RESTART_COUNT\" ] && [ \"$DTRAIN_RANK\" = 2 ]; then exit 9; fi; "
      "exec " +
      kBin + " " +
      train(dir, "--batch 60 --max-steps 30 --ckpt-every 5 --ckpt-dir " + (dir / "ckpt").string()) +
      "'";
  Result r = dtrain::testing::run_command(
      "env DTRAIN_TEST_KILL_AT=2:7 " + kBin +
          " launch --nproc 3 --min-workers 2 --rejoin-timeout 2 --max-restarts 2 -- " + worker,
      300);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 2 exited with code 9; restarts exhausted: not started again"))
      << r.out;
  EXPECT_TRUE(contains(r.out, "2 of 3 workers re-joined")) << r.out;
  EXPECT_TRUE(contains(r.out, "resumed from step-00000005")) << r.out;
  EXPECT_TRUE(contains(r.out, "written by 3 worker(s), now 2")) << r.out;
  std::map<int64_t, double> curve = losses(dir / "metrics.jsonl");
  ASSERT_FALSE(curve.empty());
  EXPECT_EQ(curve.rbegin()->first, 30);
}

// ---- acceptance 6: resume with another number of workers (seed-cnn demo) ----

struct Resize {
  int before;
  int after;
};

class ResumeResized : public ::testing::TestWithParam<Resize> {};

TEST_P(ResumeResized, ContinuesAndReachesTheDemoAccuracy) {
  const Resize p = GetParam();
  fs::path dir = scratch("resize" + std::to_string(p.before) + std::to_string(p.after));
  fs::path ckpt = dir / "ckpt";
  auto demo = [&](const std::string& metrics, const std::string& extra) {
    return "train --no-progress --batch 60 --data-cache " + std::string(DTRAIN_DATA_CACHE) +
           " --metrics " + (dir / metrics).string() + " --ckpt-dir " + ckpt.string() +
           " --ckpt-every 50 " + extra;
  };
  // The first run stops (SIGKILL, no restarts) half-way, after step 320.
  Result a = launch(p.before, "--max-restarts 0", demo("first.jsonl", ""),
                    "DTRAIN_TEST_KILL_AT=0:320:always");
  ASSERT_NE(a.code, 0) << a.out;
  ASSERT_EQ(read_file(ckpt / "latest"), "step-00000300\n") << a.out;
  Result b = launch(p.after, "", demo("second.jsonl", "--resume auto"));
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_TRUE(contains(b.out, "resumed from step-00000300")) << b.out;
  EXPECT_TRUE(contains(b.out, "written by " + std::to_string(p.before) + " worker(s), now " +
                                  std::to_string(p.after)))
      << b.out;
  EXPECT_GE(final_accuracy(dir / "second.jsonl"), 0.97) << b.out;
}

INSTANTIATE_TEST_SUITE_P(Workers, ResumeResized, ::testing::Values(Resize{2, 3}, Resize{4, 2}),
                         [](const ::testing::TestParamInfo<Resize>& i) {
                           return std::to_string(i.param.before) + "to" +
                                  std::to_string(i.param.after);
                         });

}  // namespace
