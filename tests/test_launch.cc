// End-to-end tests of `dtrain launch` (launcher/src/cmd_launch.cc): the dtrain binary
// is run through the shell with small `sh -c` workers. Checks the rank-prefixed
// output, the identity each worker gets in its environment, and that a failing or
// killed worker (or a SIGINT to launch) stops the whole job quickly with a message
// naming the rank. Every run is wrapped in `timeout`, and workers that would sleep
// for a minute make a missed termination fail the elapsed-time checks.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <map>
#include <regex>
#include <string>

#include "launch_binding.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

namespace {

struct ShellRun {
  int code = -1;
  std::string out;  // stdout and stderr together
  double seconds = 0;
};

// Runs a shell command line (with DTRAIN for the binary) under `timeout 60`.
ShellRun shell(const std::string& script) {
  std::string cmd =
      "export DTRAIN='" + std::string(DTRAIN_BIN) + "'; timeout 60 sh -c '" + script + "' 2>&1";
  ShellRun r;
  auto t0 = std::chrono::steady_clock::now();
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

// `dtrain launch <args>`; args may use double quotes (the script is single-quoted).
ShellRun launch(const std::string& args) { return shell("\"$DTRAIN\" launch " + args); }

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

int count(const std::string& s, const std::string& what) {
  int n = 0;
  for (size_t pos = s.find(what); pos != std::string::npos; pos = s.find(what, pos + 1)) ++n;
  return n;
}

TEST(Launch, PrefixesEachWorkersOutputWithItsRank) {
  ShellRun r = launch("--nproc 3 -- sh -c \"echo hello \\$DTRAIN_RANK\"");
  EXPECT_EQ(r.code, 0) << r.out;
  for (int k = 0; k < 3; ++k) {
    std::string line = "[rank " + std::to_string(k) + "] hello " + std::to_string(k) + "\n";
    EXPECT_EQ(count(r.out, line), 1) << r.out;
  }
  EXPECT_EQ(count(r.out, "hello"), 3) << r.out;
}

TEST(Launch, WorkersGetTheirIdentityAndTheCoordinator) {
  ShellRun r = launch(
      "--nproc 2 --job-id job42 -- sh -c "
      "\"echo id \\$DTRAIN_RANK/\\$DTRAIN_WORLD_SIZE/\\$DTRAIN_LOCAL_RANK "
      "\\$DTRAIN_JOB_ID \\$DTRAIN_COORDINATOR tok=\\${#DTRAIN_JOB_TOKEN}; echo err >&2\"");
  EXPECT_EQ(r.code, 0) << r.out;
  // The coordinator launch started announced the address the workers were given.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(\[coordinator\] .*listening on (\S+))")))
      << r.out;
  std::string addr = m[1].str();
  EXPECT_TRUE(contains(r.out, "[rank 0] id 0/2/0 job42 " + addr + " tok=32\n")) << r.out;
  EXPECT_TRUE(contains(r.out, "[rank 1] id 1/2/1 job42 " + addr + " tok=32\n")) << r.out;
  EXPECT_TRUE(contains(r.out, "[rank 1] err\n")) << r.out;  // stderr is prefixed too
}

TEST(Launch, UsesAGivenCoordinatorWithoutStartingOne) {
  ShellRun r = launch(
      "--nproc 2 --coordinator 10.1.2.3:4000 --token tk -- sh -c "
      "\"echo at \\$DTRAIN_COORDINATOR \\$DTRAIN_JOB_TOKEN\"");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(count(r.out, "] at 10.1.2.3:4000 tk\n"), 2) << r.out;
  EXPECT_FALSE(contains(r.out, "[coordinator]")) << r.out;
}

TEST(Launch, LineWithoutNewlineIsStillPrefixed) {
  ShellRun r = launch("--nproc 1 -- printf \"no newline\"");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "[rank 0] no newline\n")) << r.out;
}

TEST(Launch, FailingWorkerStopsTheOthersAndIsNamed) {
  ShellRun r = launch(
      "--nproc 3 --max-restarts 0 -- sh -c "
      "\"if [ \\$DTRAIN_RANK = 1 ]; then sleep 0.2; exit 3; fi; exec sleep 60\"");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 1 exited with code 3")) << r.out;
  EXPECT_LT(r.seconds, 10) << "the other workers were not terminated";
}

TEST(Launch, KilledWorkerStopsTheOthersAndIsNamed) {
  ShellRun r = launch(
      "--nproc 3 --max-restarts 0 -- sh -c "
      "\"if [ \\$DTRAIN_RANK = 2 ]; then sleep 0.2; kill -9 \\$\\$; fi; exec sleep 60\"");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 2 was killed by signal 9")) << r.out;
  EXPECT_LT(r.seconds, 10) << "the other workers were not terminated";
}

// `dtrain launch <args> -- sh -c "<then>"` where rank 1's first run exits 5 before
// `then` (the restarted one runs it); the output ends with "launch-exit=<code>".
ShellRun launch_failing_once(const std::string& args, const std::string& then) {
  return shell("d=$(mktemp -d); \"$DTRAIN\" launch " + args +
               " -- sh -c "
               "\"if [ \\$DTRAIN_RANK = 1 ] && [ ! -e $d/once ]; then touch $d/once; exit 5; fi; " +
               then + "\"; echo launch-exit=$?; rm -rf $d");
}

// Recovery: a worker that fails is started again with the same rank and identity
// (and DTRAIN_RESTART_COUNT), and the job succeeds when the new one does.
TEST(Launch, FailedWorkerIsStartedAgainWithTheSameRank) {
  ShellRun r = launch_failing_once(
      "--nproc 2",
      "echo ran \\$DTRAIN_RANK/\\$DTRAIN_WORLD_SIZE restart=\\${DTRAIN_RESTART_COUNT:-0}");
  EXPECT_TRUE(contains(r.out, "launch-exit=0")) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 1 exited with code 5; starting it again (restart 1 of 3)"))
      << r.out;
  EXPECT_TRUE(contains(r.out, "[rank 1] ran 1/2 restart=1\n")) << r.out;
  EXPECT_TRUE(contains(r.out, "[rank 0] ran 0/2 restart=0\n")) << r.out;
}

TEST(Launch, WorkerFailingEveryTimeExhaustsTheRestarts) {
  ShellRun r = launch("--nproc 2 --max-restarts 2 -- sh -c \"exit \\$((DTRAIN_RANK * 7))\"");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(count(r.out, "starting it again"), 2) << r.out;
  EXPECT_TRUE(contains(r.out, "failed: rank 1 exited with code 7; restarts exhausted (2 of 2)"))
      << r.out;
}

TEST(Launch, WorkersIgnoringSigtermAreKilledAfterTheGracePeriod) {
  ShellRun r = launch(
      "--nproc 2 --max-restarts 0 --grace-period 0.5 -- sh -c "
      "\"trap \\\"\\\" TERM; if [ \\$DTRAIN_RANK = 0 ]; then sleep 0.5; exit 4; fi; sleep 60\"");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 0 exited with code 4")) << r.out;
  EXPECT_LT(r.seconds, 10) << "SIGKILL did not follow the grace period";
  EXPECT_GE(r.seconds, 1.0) << "the grace period was not granted";
}

TEST(Launch, SigintIsForwardedToTheWorkers) {
  // The workers' background `sleep` ignores SIGINT and keeps their output pipes
  // open after they exit: launch must not wait for it either.
  ShellRun r = shell(
      "f=$(mktemp); \"$DTRAIN\" launch --nproc 2 -- sh -c "
      "\"trap \\\"echo got-int; exit 0\\\" INT; echo ready; sleep 60 & wait\" >$f 2>&1 & "
      "pid=$!; for i in $(seq 100); do "
      "[ $(grep -c ready $f) = 2 ] && break; sleep 0.1; done; "
      "kill -INT $pid; wait $pid; echo launch-exit=$?; cat $f; rm -f $f");
  EXPECT_TRUE(contains(r.out, "got SIGINT")) << r.out;
  EXPECT_TRUE(contains(r.out, "[rank 0] got-int")) << r.out;
  EXPECT_TRUE(contains(r.out, "[rank 1] got-int")) << r.out;
  EXPECT_TRUE(contains(r.out, "launch-exit=130")) << r.out;
  EXPECT_LT(r.seconds, 15) << r.out;
}

TEST(Launch, CommandThatCannotRunIsReported) {
  ShellRun r = launch("--nproc 2 --max-restarts 0 -- /nonexistent/worker");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "cannot execute '/nonexistent/worker'")) << r.out;
  EXPECT_TRUE(contains(r.out, "exited with code 127")) << r.out;
}

TEST(Launch, MissingCommandOrNprocIsACommandLineError) {
  EXPECT_EQ(launch("--nproc 2").code, 2);
  EXPECT_EQ(launch("-- true").code, 2);
  EXPECT_EQ(launch("--nproc 0 -- true").code, 2);
}

TEST(Launch, MaxWorkersIsTheNumberOfWorkersStarted) {
  ShellRun r = launch("--max-workers 2 -- sh -c \"echo size \\$DTRAIN_WORLD_SIZE\"");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(count(r.out, "] size 2\n"), 2) << r.out;
  ShellRun differ = launch("--nproc 3 --max-workers 2 -- true");
  EXPECT_EQ(differ.code, 1) << differ.out;
  EXPECT_TRUE(contains(differ.out, "--max-workers 2 differs from --nproc 3")) << differ.out;
  ShellRun too_few = launch("--nproc 2 --min-workers 3 -- true");
  EXPECT_EQ(too_few.code, 1) << too_few.out;
  EXPECT_TRUE(contains(too_few.out, "--min-workers 3 is more than the 2 workers")) << too_few.out;
}

// ---- --bind-to: each worker reads its own affinity ----

// "[rank k] Cpus_allowed_list:\t0-1" lines of the workers (one per run of a rank).
std::multimap<int, std::string> workers_affinity(const std::string& out) {
  std::multimap<int, std::string> got;
  const std::regex line(R"(\[rank (\d+)\] Cpus_allowed_list:\s*(\S+))");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), line); it != std::sregex_iterator();
       ++it) {
    got.emplace(std::stoi((*it)[1].str()), (*it)[2].str());
  }
  return got;
}

// What launch logged: "rank k on CPUs 0-3".
std::map<int, std::string> launch_binding(const std::string& out) {
  std::map<int, std::string> got;
  const std::regex item(R"(rank (\d+) on CPUs ([0-9,-]+))");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), item); it != std::sregex_iterator();
       ++it) {
    got[std::stoi((*it)[1].str())] = (*it)[2].str();
  }
  return got;
}

const char* kPrintAffinity = "-- sh -c \"grep Cpus_allowed_list /proc/self/status\"";

std::string own_cpus() {
  dtrain::cli::CpuList all;
  for (const auto& core : dtrain::cli::read_cpu_topology().cores) {
    all.insert(all.end(), core.begin(), core.end());
  }
  std::sort(all.begin(), all.end());
  return dtrain::cli::format_cpu_list(all);
}

// Each worker runs on the CPUs launch logged for it: disjoint, non-empty, inside
// launch's own set; the restarted rank 1 reads its CPUs after its restart.
TEST(LaunchBindTo, CoreBindsEachWorkerToTheCpusLaunchLogged) {
  if (dtrain::cli::read_cpu_topology().cores.size() < 2) GTEST_SKIP() << "needs two cores";
  ShellRun r =
      launch_failing_once("--nproc 2 --bind-to core", "grep Cpus_allowed_list /proc/self/status");
  EXPECT_TRUE(contains(r.out, "launch-exit=0")) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 1 exited with code 5; starting it again")) << r.out;
  const auto logged = launch_binding(r.out);
  const auto got = workers_affinity(r.out);
  ASSERT_EQ(logged.size(), 2u) << r.out;
  ASSERT_EQ(got.count(0), 1u) << r.out;
  ASSERT_EQ(got.count(1), 1u) << r.out;
  for (const auto& [rank, cpus] : got) EXPECT_EQ(cpus, logged.at(rank)) << "rank " << rank;
  const auto c0 = dtrain::cli::parse_cpu_list(logged.at(0));
  const auto c1 = dtrain::cli::parse_cpu_list(logged.at(1));
  const auto own = dtrain::cli::parse_cpu_list(own_cpus());
  ASSERT_FALSE(c0.empty());
  ASSERT_FALSE(c1.empty());
  for (int c : c0) EXPECT_EQ(std::count(c1.begin(), c1.end(), c), 0) << "CPU " << c << " shared";
  for (int c : c0) EXPECT_EQ(std::count(own.begin(), own.end(), c), 1) << "CPU " << c;
  for (int c : c1) EXPECT_EQ(std::count(own.begin(), own.end(), c), 1) << "CPU " << c;
}

// Launch binds inside its own CPU set (taskset), and none leaves the workers on it.
TEST(LaunchBindTo, BindingStaysInsideLaunchsOwnCpus) {
  ShellRun one = shell("taskset -c 0 \"$DTRAIN\" launch --nproc 1 --bind-to core " +
                       std::string(kPrintAffinity));
  EXPECT_EQ(one.code, 0) << one.out;
  EXPECT_EQ(workers_affinity(one.out), (std::multimap<int, std::string>{{0, "0"}})) << one.out;
  ShellRun none = launch("--nproc 2 --bind-to none " + std::string(kPrintAffinity));
  EXPECT_EQ(none.code, 0) << none.out;
  EXPECT_EQ(workers_affinity(none.out),
            (std::multimap<int, std::string>{{0, own_cpus()}, {1, own_cpus()}}))
      << none.out;
}

// auto: core for up to 2 workers, unbound for 3 (as mpirun) or for 2 on one core.
TEST(LaunchBindTo, AutoFollowsMpirun) {
  ShellRun three = launch("--nproc 3 " + std::string(kPrintAffinity));
  EXPECT_EQ(three.code, 0) << three.out;
  const auto got = workers_affinity(three.out);
  ASSERT_EQ(got.size(), 3u) << three.out;
  for (const auto& [rank, cpus] : got) EXPECT_EQ(cpus, own_cpus()) << "rank " << rank;
  ShellRun squeezed = shell("taskset -c 0 \"$DTRAIN\" launch --nproc 2 --log-level debug " +
                            std::string(kPrintAffinity));
  EXPECT_EQ(squeezed.code, 0) << squeezed.out;
  EXPECT_TRUE(contains(squeezed.out, "--bind-to auto (= none: 2 workers on 1 cores)"))
      << squeezed.out;
  EXPECT_EQ(workers_affinity(squeezed.out), (std::multimap<int, std::string>{{0, "0"}, {1, "0"}}))
      << squeezed.out;
  if (dtrain::cli::read_cpu_topology().cores.size() < 2) return;
  ShellRun two = launch("--nproc 2 " + std::string(kPrintAffinity));
  EXPECT_TRUE(contains(two.out, "--bind-to auto (= core: 2 worker(s) <= 2, as mpirun)")) << two.out;
  EXPECT_NE(workers_affinity(two.out).find(0)->second, workers_affinity(two.out).find(1)->second)
      << two.out;
}

TEST(LaunchBindTo, BadValuesAndTooFewCoresAreRefused) {
  ShellRun bad = launch("--nproc 2 --bind-to socket -- true");
  EXPECT_EQ(bad.code, 2) << bad.out;
  EXPECT_TRUE(contains(bad.out, "--bind-to")) << bad.out;
  EXPECT_TRUE(contains(bad.out, "must be none, core or auto, got 'socket'")) << bad.out;
  ShellRun few = shell("taskset -c 0 \"$DTRAIN\" launch --nproc 2 --bind-to core -- echo ran");
  EXPECT_EQ(few.code, 1) << few.out;
  EXPECT_TRUE(contains(few.out,
                       "--bind-to core needs a core per worker: 2 workers, 1 core(s) "
                       "allowed (CPUs 0)"))
      << few.out;
  EXPECT_FALSE(contains(few.out, "[rank")) << "no worker may start\n" << few.out;
}

}  // namespace
