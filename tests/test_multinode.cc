// Multi-node jobs (launcher/src/launch_nodes.h, `dtrain launch --nnodes`) and the
// coordinator's token and TLS rules, end to end through the dtrain binary:
//   - bad input: node rank out of range, no coordinator, an unreachable coordinator
//     (bounded), another world size or job id, a wrong token: one line, non-zero exit;
//   - a non-loopback coordinator requires a token; TLS with the right CA works, a
//     wrong CA, plaintext and a wrong token are refused;
//   - two nodes on loopback train bit for bit like one launch with the same ranks;
//   - on network namespaces (scripts/netns-hosts, skipped with the reason where they
//     cannot be made): 2 hosts x 2 workers train like one host with 4 workers, and
//     killing every process of host 1 mid-run is recovered from (its launch is
//     started again; the job resumes from the last checkpoint and ends like an
//     uninterrupted run).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <regex>
#include <string>

#include "subprocess.h"

#if !defined(DTRAIN_BIN) || !defined(DTRAIN_SOURCE_DIR) || !defined(DTRAIN_DATA_CACHE)
#error "DTRAIN_BIN, DTRAIN_SOURCE_DIR and DTRAIN_DATA_CACHE must be defined"
#endif

namespace {

using dtrain::testing::CommandResult;
using dtrain::testing::run_command;
using dtrain::testing::scratch_dir;

const std::string kBin = DTRAIN_BIN;

// A port free on loopback right now (the kernel's pick).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

CommandResult sh(const std::string& script, int timeout_s = 60) {
  return run_command("sh -c '" + script + "'", timeout_s);
}

bool has(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// "final loss 0.2503, test accuracy 0.9340" from rank 0's summary line.
std::string final_figures(const std::string& out) {
  std::smatch m;
  static const std::regex kLine("final loss [0-9.]+, test accuracy [0-9.]+");
  return std::regex_search(out, m, kLine) ? m[0].str() : "(no summary line)";
}

// A coordinator in the background of a shell line, stopped by the line's end.
std::string with_coordinator(const std::string& coordinator_args, const std::string& body) {
  return kBin + " coordinator " + coordinator_args + " >/dev/null 2>&1 & c=$!; sleep 1; " + body +
         "; r=$?; kill $c; wait $c; exit $r";
}

std::string node1(int port, const std::string& extra, int nproc = 1) {
  return kBin + " launch --nproc " + std::to_string(nproc) +
         " --nnodes 2 --node-rank 1 --external-coordinator --coordinator " +
         "127.0.0.1:" + std::to_string(port) + " --connect-timeout 3 " + extra + " -- true";
}

TEST(MultiNodeLaunch, NodeRankOutOfRangeIsOneLine) {
  CommandResult r = sh(kBin +
                       " launch --nproc 1 --nnodes 2 --node-rank 2 --coordinator "
                       "127.0.0.1:1 -- true");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(has(r.out, "--node-rank 2 is out of range for --nnodes 2")) << r.out;
}

TEST(MultiNodeLaunch, SeveralNodesNeedACoordinatorAddress) {
  CommandResult r = sh(kBin + " launch --nproc 1 --nnodes 2 --node-rank 1 -- true");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(has(r.out, "--nnodes 2 needs --coordinator HOST:PORT")) << r.out;
}

TEST(MultiNodeLaunch, UnreachableCoordinatorFailsAfterTheConnectTimeout) {
  const auto t0 = std::chrono::steady_clock::now();
  CommandResult r = sh(node1(free_port(), ""));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(has(r.out, "not reachable within 3.0 s")) << r.out;
  EXPECT_LT(s, 20.0) << "a bounded retry, not a hang";
}

TEST(MultiNodeLaunch, AnotherWorldSizeOrJobIdOrTokenIsRefused) {
  const int port = free_port();
  const std::string coord =
      "--port " + std::to_string(port) + " --world-size 2 --job-id j --token right";
  CommandResult size = sh(with_coordinator(coord, node1(port, "--job-id j --token right", 2)));
  EXPECT_NE(size.code, 0);
  EXPECT_TRUE(has(size.out, "world size 4 (--nnodes x --nproc-per-node) but the coordinator"))
      << size.out;
  CommandResult job = sh(with_coordinator(coord, node1(port, "--job-id other --token right")));
  EXPECT_NE(job.code, 0);
  EXPECT_TRUE(has(job.out, "job 'other' is not served here")) << job.out;
  CommandResult token = sh(with_coordinator(coord, node1(port, "--job-id j --token wrong")));
  EXPECT_NE(token.code, 0);
  EXPECT_TRUE(has(token.out, "wrong job token")) << token.out;
  CommandResult ok = sh(with_coordinator(coord, node1(port,
                                                      "--job-id j --token right "
                                                      "--max-restarts 0 --failure-wait 0")));
  EXPECT_FALSE(has(ok.out, "node 1 of 2:")) << "the matching node passes the check:\n" << ok.out;
}

TEST(MultiNodeLaunch, CoordinatorOffLoopbackRequiresAToken) {
  CommandResult r = sh(kBin + " coordinator --port 0 --world-size 1 --bind 0.0.0.0");
  EXPECT_NE(r.code, 0);
  EXPECT_TRUE(has(r.out, "listening on 0.0.0.0 (not loopback) requires a job token")) << r.out;
}

TEST(MultiNodeLaunch, TwoLoopbackNodesTrainLikeOneLaunch) {
  const std::string dir = scratch_dir("test_multinode", "loopback").string();
  const std::string train =
      " -- dtrain train --epochs 1 --max-steps 40 --data-cache " + std::string(DTRAIN_DATA_CACHE);
  CommandResult one = sh("cd " + dir + " && " + kBin + " launch --nproc 2" + train, 120);
  ASSERT_EQ(one.code, 0) << one.out;
  const std::string addr = "127.0.0.1:" + std::to_string(free_port());
  auto node = [&](int r) {
    return kBin + " launch --nproc 1 --nnodes 2 --node-rank " + std::to_string(r) +
           " --coordinator " + addr + train;
  };
  CommandResult two = sh("cd " + dir + " && { " + node(1) + " > n1.log 2>&1 & } && " + node(0) +
                             "; r=$?; wait; " + "cat n1.log; exit $r",
                         120);
  ASSERT_EQ(two.code, 0) << two.out;
  EXPECT_EQ(final_figures(two.out), final_figures(one.out)) << two.out;
  EXPECT_NE(final_figures(one.out), "(no summary line)") << one.out;
  std::filesystem::remove_all(dir);
}

// A CA, a server certificate it signs for 127.0.0.1, and an unrelated second CA.
void make_certificates(const std::string& dir) {
  const std::string ossl = "cd " + dir + " && openssl ";
  for (const char* ca : {"ca", "other-ca"}) {
    CommandResult r = sh(ossl + "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=" + ca +
                         " -keyout " + ca + ".key -out " + ca + ".crt");
    ASSERT_EQ(r.code, 0) << r.out;
  }
  CommandResult csr = sh(ossl +
                         "req -new -newkey rsa:2048 -nodes -subj /CN=coordinator "
                         "-addext subjectAltName=IP:127.0.0.1 -keyout server.key -out "
                         "server.csr");
  ASSERT_EQ(csr.code, 0) << csr.out;
  CommandResult crt = sh(ossl +
                         "x509 -req -in server.csr -CA ca.crt -CAkey ca.key "
                         "-CAcreateserial -days 2 -copy_extensions copy -out server.crt");
  ASSERT_EQ(crt.code, 0) << crt.out;
}

TEST(CoordinatorTls, RightCaWorksWrongCaPlaintextAndWrongTokenAreRefused) {
  if (run_command("openssl version", 10).code != 0) GTEST_SKIP() << "openssl is not installed";
  const std::string dir = scratch_dir("test_multinode", "tls").string();
  ASSERT_NO_FATAL_FAILURE(make_certificates(dir));
  const int port = free_port();
  const std::string coord = "--port " + std::to_string(port) +
                            " --world-size 1 --job-id t --token s --tls-cert " + dir +
                            "/server.crt --tls-key " + dir + "/server.key";
  auto probe = [&](const std::string& extra) {
    return sh(with_coordinator(
        coord, node1(port, "--job-id t --max-restarts 0 --failure-wait 0 " + extra)));
  };
  CommandResult right = probe("--token s --tls-ca " + dir + "/ca.crt");
  EXPECT_TRUE(has(right.out, "world size 2 (--nnodes x --nproc-per-node) but the coordinator"))
      << "the TLS call got through to the job check:\n"
      << right.out;
  CommandResult wrong_ca = probe("--token s --tls-ca " + dir + "/other-ca.crt");
  EXPECT_NE(wrong_ca.code, 0);
  EXPECT_TRUE(has(wrong_ca.out, "not reachable within 3.0 s")) << wrong_ca.out;
  EXPECT_TRUE(has(wrong_ca.out, "does its certificate chain to")) << wrong_ca.out;
  CommandResult plain = probe("--token s");
  EXPECT_NE(plain.code, 0);
  EXPECT_TRUE(has(plain.out, "not reachable within 3.0 s")) << plain.out;
  CommandResult token = probe("--token nope --tls-ca " + dir + "/ca.crt");
  EXPECT_NE(token.code, 0);
  EXPECT_TRUE(has(token.out, "wrong job token")) << token.out;
  std::filesystem::remove_all(dir);
}

// tests/multinode/netns_train.sh inside `netns-hosts run 2`.
CommandResult netns_job(const std::string& dir, int steps, const std::string& mode) {
  const std::string src = DTRAIN_SOURCE_DIR;
  return run_command(src + "/scripts/netns-hosts run 2 \"\" " + src +
                         "/tests/multinode/netns_train.sh " + kBin + " " + dir + " " +
                         DTRAIN_DATA_CACHE + " " + std::to_string(steps) + " " + mode + " 60",
                     240);
}

class NetnsNodes : public ::testing::Test {
 protected:
  void SetUp() override {
    CommandResult can =
        run_command(std::string(DTRAIN_SOURCE_DIR) + "/scripts/netns-hosts check", 30);
    if (can.code == 77) GTEST_SKIP() << can.out;
    ASSERT_EQ(can.code, 0) << can.out;
    dir_ = scratch_dir("test_multinode",
                       ::testing::UnitTest::GetInstance()->current_test_info()->name())
               .string();
    // The oracle: one host, 4 workers, the same data (fetched here if needed).
    one_host_ = sh("cd " + dir_ + " && " + kBin +
                       " launch --nproc 4 -- dtrain train --epochs 1 --max-steps 200 "
                       "--data-cache " +
                       DTRAIN_DATA_CACHE,
                   180);
    ASSERT_EQ(one_host_.code, 0) << one_host_.out;
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::string dir_;
  CommandResult one_host_;
};

TEST_F(NetnsNodes, TwoHostsTimesTwoWorkersTrainLikeOneHost) {
  CommandResult r = netns_job(dir_ + "/job", 200, "plain");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(has(r.out, "4 worker(s)")) << r.out;
  EXPECT_EQ(final_figures(r.out), final_figures(one_host_.out)) << r.out;
}

TEST_F(NetnsNodes, KillingAWholeHostIsRecoveredFrom) {
  CommandResult r = netns_job(dir_ + "/job", 200, "kill-host");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(has(r.out, "killing host 1")) << r.out;
  EXPECT_TRUE(has(r.out, "joined generation 2")) << r.out;
  // "[rank 2] <log prefix>] dtrain train: ..." (logging.h) on the restarted node.
  EXPECT_TRUE(std::regex_search(
      r.out,
      std::regex(
          R"(node1-restarted\| \[rank 2\] .*\] dtrain train: rank 2: training again at step)")))
      << r.out;
  EXPECT_EQ(final_figures(r.out), final_figures(one_host_.out)) << r.out;
}

}  // namespace
