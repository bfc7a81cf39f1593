// End-to-end tests of `dtrain launch` (launcher/src/cmd_launch.cc): the dtrain binary
// is run through the shell with small `sh -c` workers. Checks the rank-prefixed
// output, the identity each worker gets in its environment, and that a failing or
// killed worker (or a SIGINT to launch) stops the whole job quickly with a message
// naming the rank. Every run is wrapped in `timeout`, and workers that would sleep
// for a minute make a missed termination fail the elapsed-time checks.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <regex>
#include <string>

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

// Recovery: a worker that fails is started again with the same rank and identity
// (and DTRAIN_RESTART_COUNT), and the job succeeds when the new one does.
TEST(Launch, FailedWorkerIsStartedAgainWithTheSameRank) {
  ShellRun r = shell(
      "d=$(mktemp -d); \"$DTRAIN\" launch --nproc 2 -- sh -c "
      "\"if [ \\$DTRAIN_RANK = 1 ] && [ ! -e $d/once ]; then touch $d/once; exit 5; fi; "
      "echo ran \\$DTRAIN_RANK/\\$DTRAIN_WORLD_SIZE restart=\\${DTRAIN_RESTART_COUNT:-0}\"; "
      "echo launch-exit=$?; rm -rf $d");
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

}  // namespace
