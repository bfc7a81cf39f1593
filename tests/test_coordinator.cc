// Tests of the gRPC job coordinator (launcher/coordinator, proto/coordinator.proto):
// rendezvous and rank assignment, refusals (full job, other job id, token) that
// leave the job untouched, the key-value store, barriers, heartbeats and failures,
// recovery (generations, restarts, the state folder, the two-phase checkpoint
// commit checked against the checkpoint store), and the `dtrain coordinator` binary. Every server
// runs in-process on an ephemeral loopback port; every call has a deadline, so a broken coordinator
// fails a test instead of hanging it.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/error.h"
#include "dtrain/coordinator/client.h"
#include "dtrain/coordinator/grpc_store.h"
#include "dtrain/coordinator/heartbeat.h"
#include "dtrain/coordinator/server.h"
#include "dtrain/proto/coordinator.grpc.pb.h"
#include "dtrain/proto/health.grpc.pb.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif

#include "coordinator_test_util.h"

extern char** environ;

namespace {

using namespace dtrain::coordinator;
using namespace dtrain::coordinator::testing;
using namespace std::chrono_literals;

// ---- rendezvous ----

TEST(Coordinator, JoinAssignsDistinctRanksAndTheSamePeerList) {
  constexpr int kN = 4;
  CoordinatorServer server(server_options(kN));
  std::vector<JoinResult> r = join_all(server, kN);
  std::set<int> ranks;
  for (const JoinResult& j : r) {
    ranks.insert(j.rank);
    EXPECT_EQ(j.world_size, kN);
    EXPECT_EQ(j.generation, r[0].generation);
    EXPECT_EQ(j.local_world_size, 2);  // hosts host0 and host1, two workers each
    ASSERT_EQ(j.peers.size(), static_cast<size_t>(kN));
    for (int p = 0; p < kN; ++p) {
      EXPECT_EQ(j.peers[p].rank, p);
      EXPECT_EQ(j.peers[p].host, r[0].peers[p].host);
      EXPECT_EQ(j.peers[p].address, r[0].peers[p].address);
      EXPECT_EQ(j.peers[p].pid, r[0].peers[p].pid);
    }
    // The worker's own entry is at its rank.
    EXPECT_EQ(j.peers[j.rank].pid, 1000 + (&j - r.data()));
    EXPECT_EQ(j.peers[j.rank].local_rank, j.local_rank);
  }
  EXPECT_EQ(ranks, (std::set<int>{0, 1, 2, 3}));
  EXPECT_EQ(r[0].generation, 1u);
  JobStatus st = server.status();
  EXPECT_EQ(st.state, JobState::kRunning);
  ASSERT_EQ(st.workers.size(), static_cast<size_t>(kN));
  for (int p = 0; p < kN; ++p) {
    EXPECT_EQ(st.workers[p].rank, p);
    EXPECT_EQ(st.workers[p].state, WorkerState::kAlive);
  }
}

TEST(Coordinator, ManyBlockedJoinsAllComplete) {
  // Every blocked Join holds a server thread: 32 of them must not starve the server.
  constexpr int kN = 32;
  CoordinatorServer server(server_options(kN));
  std::vector<JoinResult> r = join_all(server, kN);
  std::set<int> ranks;
  for (const JoinResult& j : r) ranks.insert(j.rank);
  EXPECT_EQ(ranks.size(), static_cast<size_t>(kN));
  EXPECT_EQ(*ranks.rbegin(), kN - 1);
}

TEST(Coordinator, RanksFollowJoinOrder) {
  constexpr int kN = 3;
  CoordinatorServer server(server_options(kN));
  std::vector<std::future<JoinResult>> futures;
  for (int i = 0; i < kN; ++i) {
    futures.push_back(std::async(std::launch::async, [&server, i] {
      CoordinatorClient c = connect(server);
      return c.join(worker(i));
    }));
    // The next worker joins only after this one is registered.
    ASSERT_TRUE(eventually([&] { return server.status().workers.size() == size_t(i + 1); }));
  }
  for (int i = 0; i < kN; ++i) EXPECT_EQ(futures[i].get().rank, i);
}

TEST(Coordinator, RequestedRanksAreHonoured) {
  CoordinatorServer server(server_options(3));
  auto join_as = [&](int i, std::optional<int> rank) {
    return std::async(std::launch::async, [&server, i, rank] {
      CoordinatorClient c = connect(server);
      JoinOptions o = worker(i);
      o.rank = rank;
      return c.join(o);
    });
  };
  auto a = join_as(0, 2);
  ASSERT_TRUE(eventually([&] { return server.status().workers.size() == 1; }));
  // A conflicting request and one out of range are refused, and change nothing.
  CoordinatorClient c = connect(server);
  std::string before = summary(server.status());
  JoinOptions clash = worker(7, 1s);
  clash.rank = 2;
  std::string msg = thrown<dtrain::InvalidArgument>([&] { c.join(clash); });
  EXPECT_TRUE(contains(msg, "rank 2 of job 'job-a' is already taken")) << msg;
  EXPECT_TRUE(contains(msg, "ALREADY_EXISTS")) << msg;
  JoinOptions out_of_range = worker(8, 1s);
  out_of_range.rank = 3;
  msg = thrown<dtrain::InvalidArgument>([&] { c.join(out_of_range); });
  EXPECT_TRUE(contains(msg, "out of range")) << msg;
  EXPECT_EQ(summary(server.status()), before);

  auto b = join_as(1, std::nullopt);  // takes the free rank in join order: 0
  ASSERT_TRUE(eventually([&] { return server.status().workers.size() == 2; }));
  auto d = join_as(2, 1);
  EXPECT_EQ(a.get().rank, 2);
  EXPECT_EQ(b.get().rank, 0);
  EXPECT_EQ(d.get().rank, 1);
}

TEST(Coordinator, JoinIntoAFullJobOrAnotherJobIsRefusedAndChangesNothing) {
  CoordinatorServer server(server_options(2));
  auto stub = raw_stub(server);

  // Another job id while the rendezvous is open.
  std::string open_before = summary(server.status());
  grpc::Status s = raw_join(*stub, "job-b", nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(contains(s.error_message(), "'job-b'")) << s.error_message();
  EXPECT_TRUE(contains(s.error_message(), "'job-a'")) << s.error_message();
  EXPECT_EQ(summary(server.status()), open_before);

  join_all(server, 2);
  std::string before = summary(server.status());

  s = raw_join(*stub, kJob, nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(s.error_message(), "job 'job-a' is full (world size 2)");

  CoordinatorClient c = connect(server);
  std::string msg = thrown<dtrain::InvalidArgument>([&] { c.join(worker(5, 1s)); });
  EXPECT_EQ(msg, "coordinator " + server.address() +
                     ": Join refused: job 'job-a' is full (world size 2) [RESOURCE_EXHAUSTED]");

  CoordinatorClient other = connect(server, "job-b");
  msg = thrown<dtrain::InvalidArgument>([&] { other.join(worker(6, 1s)); });
  EXPECT_TRUE(contains(msg, "Join refused: job 'job-b' is not served here")) << msg;
  EXPECT_TRUE(contains(msg, "FAILED_PRECONDITION")) << msg;
  // Every call checks the job id, not only Join.
  thrown<dtrain::InvalidArgument>([&] { other.set("k", "v"); });
  thrown<dtrain::InvalidArgument>([&] { other.status(); });

  EXPECT_EQ(summary(server.status()), before);
  EXPECT_FALSE(c.try_get("k").has_value());
}

TEST(Coordinator, JoinThatTimesOutIsWithdrawn) {
  CoordinatorServer server(server_options(2));
  CoordinatorClient c = connect(server);
  auto t0 = std::chrono::steady_clock::now();
  std::string msg = thrown<dtrain::TimeoutError>([&] { c.join(worker(0, 300ms)); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  EXPECT_TRUE(contains(msg, "1 of 2 workers joined")) << msg;
  EXPECT_TRUE(server.status().workers.empty());
  std::vector<JoinResult> r = join_all(server, 2);  // the job still forms
  EXPECT_NE(r[0].rank, r[1].rank);
}

// ---- token (issue 3, acceptance 7) ----

TEST(Coordinator, TokenIsRequiredOnEveryCallAndRefusalsChangeNothing) {
  const char* kToken = "s3cret";
  CoordinatorServer server(server_options(2, kToken));
  CoordinatorClient good = connect(server, kJob, kToken);
  // One worker waits in the rendezvous while the intruders knock.
  auto first = std::async(std::launch::async, [&] { return good.join(worker(0)); });
  ASSERT_TRUE(eventually([&] { return server.status().workers.size() == 1; }));
  good.set("k", "v");
  std::string before = summary(good.status());

  auto stub = raw_stub(server);
  for (const char* token : {static_cast<const char*>(nullptr), "wrong", "s3cre", "s3cret!"}) {
    SCOPED_TRACE(token ? token : "(no token)");
    grpc::Status s = raw_join(*stub, kJob, token);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    {
      grpc::ClientContext ctx;
      prepare(ctx, token);
      v1::SetRequest req;
      req.set_job_id(kJob);
      req.set_key("k");
      req.set_value("overwritten");
      v1::SetResponse resp;
      EXPECT_EQ(stub->Set(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext ctx;
      prepare(ctx, token);
      v1::ReportFailureRequest req;
      req.set_job_id(kJob);
      req.set_rank(0);
      req.set_reason("forged");
      v1::ReportFailureResponse resp;
      EXPECT_EQ(stub->ReportFailure(&ctx, req, &resp).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
    {
      grpc::ClientContext ctx;
      prepare(ctx, token);
      v1::GetJobStatusRequest req;
      v1::JobStatus resp;
      EXPECT_EQ(stub->GetJobStatus(&ctx, req, &resp).error_code(),
                grpc::StatusCode::UNAUTHENTICATED);
    }
  }
  // Through the client: a typed error that names the coordinator and the code.
  CoordinatorClient bad = connect(server, kJob, "wrong");
  std::string msg = thrown<dtrain::InvalidArgument>([&] { bad.join(worker(9, 1s)); });
  EXPECT_TRUE(contains(msg, "coordinator " + server.address() + ": Join refused")) << msg;
  EXPECT_TRUE(contains(msg, "UNAUTHENTICATED")) << msg;
  CoordinatorClient none = connect(server, kJob, "");
  msg = thrown<dtrain::InvalidArgument>([&] { none.status(); });
  EXPECT_TRUE(contains(msg, "requires a job token")) << msg;

  EXPECT_EQ(summary(good.status()), before);
  EXPECT_EQ(good.get("k", 1s), "v");

  // The right token works: the second worker completes the rendezvous.
  CoordinatorClient second = connect(server, kJob, kToken);
  JoinResult r2 = second.join(worker(1));
  JoinResult r1 = first.get();
  EXPECT_EQ(std::set<int>({r1.rank, r2.rank}), (std::set<int>{0, 1}));
  EXPECT_EQ(good.status().state, JobState::kRunning);
}

// ---- key-value store ----

TEST(Coordinator, KeyValueSetGetWait) {
  CoordinatorServer server(server_options(2));
  CoordinatorClient a = connect(server);
  CoordinatorClient b = connect(server);
  a.set("addr/0", "10.0.0.1:4000");
  EXPECT_EQ(b.get("addr/0", 1s), "10.0.0.1:4000");
  EXPECT_EQ(b.try_get("addr/0").value_or(""), "10.0.0.1:4000");
  EXPECT_FALSE(b.try_get("addr/1").has_value());
  a.set("addr/0", std::string("\0bin\xff", 5));  // overwrite; values are bytes
  EXPECT_EQ(b.get("addr/0", 1s), std::string("\0bin\xff", 5));

  // get waits for a key set later.
  auto later = std::async(std::launch::async, [&] {
    std::this_thread::sleep_for(200ms);
    a.set("addr/1", "10.0.0.2:4000");
  });
  EXPECT_EQ(b.get("addr/1", 5s), "10.0.0.2:4000");
  later.get();

  // wait for several keys.
  auto more = std::async(std::launch::async, [&] {
    std::this_thread::sleep_for(100ms);
    a.set("x", "1");
    a.set("y", "2");
  });
  b.wait({"addr/0", "x", "y"}, 5s);
  more.get();

  // Timeouts name what is missing.
  auto t0 = std::chrono::steady_clock::now();
  std::string msg = thrown<dtrain::TimeoutError>([&] { b.get("never", 300ms); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  EXPECT_TRUE(contains(msg, "Get 'never'")) << msg;
  EXPECT_TRUE(contains(msg, "key 'never' was not set in job 'job-a' within 300 ms")) << msg;
  msg = thrown<dtrain::TimeoutError>([&] { b.wait({"x", "missing1", "missing2"}, 300ms); });
  EXPECT_TRUE(contains(msg, "'missing1', 'missing2'")) << msg;
  EXPECT_FALSE(contains(msg, "'x'")) << msg;
  thrown<dtrain::InvalidArgument>([&] { a.set("", "v"); });
}

TEST(Coordinator, GrpcStoreIsACommStore) {
  CoordinatorServer server(server_options(1));
  CoordinatorClient c = connect(server);
  GrpcStore grpc_store(c);
  dtrain::comm::PrefixStore store("gen1/", grpc_store);
  dtrain::comm::Store& s = store;
  s.set("rank0", "host:1");
  EXPECT_EQ(s.get("rank0", 1s), "host:1");
  EXPECT_EQ(c.get("gen1/rank0", 1s), "host:1");
  std::string msg = thrown<dtrain::TimeoutError>([&] { s.get("rank1", 200ms); });
  EXPECT_TRUE(contains(msg, "gen1/rank1")) << msg;
}

// ---- barrier ----

TEST(Coordinator, BarrierReleasesAllRanksAndTimesOutWhenOneIsMissing) {
  constexpr int kN = 3;
  CoordinatorServer server(server_options(kN));
  std::vector<JoinResult> joined = join_all(server, kN);
  std::vector<CoordinatorClient> clients;
  for (int i = 0; i < kN; ++i) clients.push_back(connect(server));

  for (int round = 0; round < 2; ++round) {  // the same name twice: two rounds
    std::atomic<int> passed{0};
    std::vector<std::future<void>> f;
    for (int i = 0; i < kN; ++i) {
      f.push_back(std::async(std::launch::async, [&, i] {
        clients[i].barrier("step", joined[i].rank, joined[i].generation, 5s);
        ++passed;
      }));
    }
    for (auto& x : f) x.get();
    EXPECT_EQ(passed.load(), kN);
  }

  // Rank 2 never arrives: the others time out, naming it.
  std::vector<std::future<std::string>> f;
  for (int r = 0; r < 2; ++r) {
    f.push_back(std::async(std::launch::async, [&, r] {
      return thrown<dtrain::TimeoutError>([&] { clients[r].barrier("sync", r, 1, 400ms); });
    }));
  }
  for (int r = 0; r < 2; ++r) {
    // The first to give up sees "2 of 3 ranks arrived, missing ranks 2"; the other,
    // after the first withdrew, "1 of 3 ranks arrived, missing ranks 0, 2" (or 1, 2).
    std::string msg = f[r].get();
    EXPECT_TRUE(contains(msg, "Barrier 'sync'")) << msg;
    EXPECT_TRUE(contains(msg, "timed out after 400 ms")) << msg;
    EXPECT_TRUE(
        contains(msg, "2 of 3 ranks arrived, missing ranks 2 [") ||
        contains(msg, "1 of 3 ranks arrived, missing ranks " + std::to_string(1 - r) + ", 2 ["))
        << msg;
  }
  // A timed-out rank is withdrawn: the barrier works again afterwards.
  std::vector<std::future<void>> again;
  for (int r = 0; r < kN; ++r) {
    again.push_back(
        std::async(std::launch::async, [&, r] { clients[r].barrier("sync", r, 1, 5s); }));
  }
  for (auto& x : again) x.get();

  // Wrong generation and bad ranks are refused.
  std::string msg = thrown<dtrain::CommError>([&] { clients[0].barrier("g", 0, 7, 1s); });
  EXPECT_TRUE(contains(msg, "ABORTED")) << msg;
  thrown<dtrain::InvalidArgument>([&] { clients[0].barrier("g", 5, 1, 1s); });
}

TEST(Coordinator, BarrierBeforeRendezvousIsRefused) {
  CoordinatorServer server(server_options(2));
  CoordinatorClient c = connect(server);
  std::string msg = thrown<dtrain::InvalidArgument>([&] { c.barrier("b", 0, 1, 1s); });
  EXPECT_TRUE(contains(msg, "has not completed")) << msg;
}

// ---- heartbeats, failures, leaving ----

// The progress a heartbeat carries is what GetJobStatus shows for that rank (the
// latest one that carried any); a rank that sent none shows step -1.
TEST(Coordinator, HeartbeatProgressReachesTheStatus) {
  CoordinatorServer server(server_options(2));
  std::vector<JoinResult> joined = join_all(server, 2);
  CoordinatorClient c = connect(server);
  c.heartbeat(0, 1, WorkerProgress{40, 812.5, 0.25});
  c.heartbeat(0, 1);  // none: the last one stays
  JobStatus s = c.status();
  EXPECT_EQ(s.workers[0].progress.step, 40);
  EXPECT_EQ(s.workers[0].progress.samples_per_s, 812.5);
  EXPECT_EQ(s.workers[0].progress.loss, 0.25);
  EXPECT_EQ(s.workers[1].progress.step, -1);
  {
    HeartbeatSender sender(
        c, {.rank = 1, .generation = 1, .interval = 20ms, .on_change = {}, .progress = [] {
              return WorkerProgress{7, 1.5, 2.0};
            }});
    ASSERT_TRUE(eventually([&] { return c.status().workers[1].progress.step == 7; }));
  }
  EXPECT_EQ(c.status().workers[1].progress.loss, 2.0);
}

TEST(Coordinator, HeartbeatUpdatesStatus) {
  CoordinatorServer server(server_options(2));
  std::vector<JoinResult> joined = join_all(server, 2);
  CoordinatorClient c = connect(server);
  JobStatus before = c.status();
  EXPECT_EQ(before.workers[0].heartbeats, 0u);
  std::this_thread::sleep_for(150ms);
  HeartbeatResult h = c.heartbeat(0, joined[0].generation);
  EXPECT_EQ(h.generation, 1u);
  EXPECT_EQ(h.state, JobState::kRunning);
  JobStatus after = c.status();
  EXPECT_EQ(after.workers[0].heartbeats, 1u);
  EXPECT_EQ(after.workers[1].heartbeats, 0u);
  EXPECT_GE(after.workers[1].last_heartbeat_age, 150ms);  // since the rendezvous
  EXPECT_LT(after.workers[0].last_heartbeat_age, after.workers[1].last_heartbeat_age);

  {
    HeartbeatSender sender(
        c, {.rank = 1, .generation = 1, .interval = 20ms, .on_change = {}, .progress = {}});
    ASSERT_TRUE(eventually([&] { return sender.last().sent >= 3; }));
    EXPECT_EQ(sender.last().last.state, JobState::kRunning);
  }
  EXPECT_GE(c.status().workers[1].heartbeats, 3u);
  thrown<dtrain::InvalidArgument>([&] { c.heartbeat(2, 1); });  // out of range
}

TEST(Coordinator, SilentRankIsLostAndBlockedCallsAbort) {
  ServerOptions o = server_options(2);
  o.heartbeat_timeout = 300ms;
  CoordinatorServer server(o);
  join_all(server, 2);
  CoordinatorClient c0 = connect(server);
  CoordinatorClient c1 = connect(server);
  std::atomic<int> changes{0};
  HeartbeatSender alive(c0, {.rank = 0,
                             .generation = 1,
                             .interval = 50ms,
                             .on_change = [&](const HeartbeatSnapshot&) { ++changes; },
                             .progress = {}});
  c1.heartbeat(1, 1);  // rank 1 is monitored from here on, and then stays silent
  // Rank 0 waits at a barrier rank 1 never reaches: the loss aborts it.
  auto t0 = std::chrono::steady_clock::now();
  std::string msg = thrown<dtrain::CommError>([&] { c0.barrier("b", 0, 1, 10s); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_TRUE(contains(msg, "rank 1")) << msg;
  EXPECT_TRUE(contains(msg, "lost")) << msg;
  JobStatus st = c0.status();
  EXPECT_EQ(st.state, JobState::kFailed);
  EXPECT_EQ(st.failed_rank, 1);
  EXPECT_EQ(st.workers[1].state, WorkerState::kLost);
  EXPECT_EQ(st.workers[0].state, WorkerState::kAlive);
  // The survivor's heartbeat learns it, and its callback saw the change.
  ASSERT_TRUE(eventually([&] { return alive.last().last.state == JobState::kFailed; }));
  EXPECT_TRUE(contains(alive.last().last.reason, "rank 1")) << alive.last().last.reason;
  EXPECT_GE(changes.load(), 2);
}

// ---- grpc.health.v1 (Kubernetes grpc probes) ----

// Check(service) through the standard health stub, without a token; the status
// code and, when OK, the serving status.
std::pair<grpc::StatusCode, int> health_check(const CoordinatorServer& s,
                                              const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(s.address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  prepare(ctx, nullptr);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status st = stub->Check(&ctx, req, &resp);
  return {st.error_code(), static_cast<int>(resp.status())};
}

TEST(Coordinator, HealthServesWithoutTokenAndTurnsNotServingWhenTheJobFails) {
  using Response = grpc::health::v1::HealthCheckResponse;
  CoordinatorServer server(server_options(2, "s3cret"));
  const std::pair<grpc::StatusCode, int> serving{grpc::StatusCode::OK, Response::SERVING};
  EXPECT_EQ(health_check(server, ""), serving);
  EXPECT_EQ(health_check(server, "dtrain.v1.Coordinator"), serving);  // waiting for workers
  EXPECT_EQ(health_check(server, "no.such.Service").first, grpc::StatusCode::NOT_FOUND);
  CoordinatorClient c = connect(server, kJob, "s3cret");
  EXPECT_EQ(c.report_failure(1, "lost", 0), JobState::kFailed);
  EXPECT_EQ(health_check(server, ""), serving);  // the process still answers
  EXPECT_EQ(health_check(server, "dtrain.v1.Coordinator"),
            std::make_pair(grpc::StatusCode::OK, static_cast<int>(Response::NOT_SERVING)));
}

TEST(Coordinator, ReportFailureFailsTheJob) {
  CoordinatorServer server(server_options(2));
  std::vector<JoinResult> joined = join_all(server, 2);
  CoordinatorClient c = connect(server);
  auto waiting = std::async(std::launch::async, [&] {
    return thrown<dtrain::CommError>([&] { c.get("never-set", 10s); });
  });
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(c.report_failure(1, "connection reset by peer", 0), JobState::kFailed);
  std::string msg = waiting.get();
  EXPECT_TRUE(contains(msg, "rank 1 failed (reported by rank 0): connection reset by peer")) << msg;
  JobStatus st = c.status();
  EXPECT_EQ(st.state, JobState::kFailed);
  EXPECT_EQ(st.failed_rank, 1);
  EXPECT_EQ(st.workers[1].state, WorkerState::kFailed);
  EXPECT_EQ(c.heartbeat(0, 1).state, JobState::kFailed);
  msg = thrown<dtrain::InvalidArgument>([&] { c.join(worker(3, 1s)); });
  EXPECT_TRUE(contains(msg, "has failed")) << msg;
}

TEST(Coordinator, JobSucceedsWhenEveryRankLeaves) {
  CoordinatorServer server(server_options(2));
  join_all(server, 2);
  CoordinatorClient c = connect(server);
  EXPECT_EQ(c.leave(0, 1), JobState::kRunning);
  EXPECT_EQ(c.leave(1, 1), JobState::kSucceeded);
  EXPECT_EQ(c.status().workers[0].state, WorkerState::kLeft);
}

// ---- server life cycle ----

TEST(Coordinator, ShutdownEndsBlockedCalls) {
  auto server = std::make_unique<CoordinatorServer>(server_options(2));
  CoordinatorClient c = connect(*server);
  auto blocked = std::async(std::launch::async, [&] {
    return thrown<dtrain::CommError>([&] { c.join(worker(0, 20s)); });
  });
  ASSERT_TRUE(eventually([&] { return server->status().workers.size() == 1; }));
  auto t0 = std::chrono::steady_clock::now();
  server->shutdown();
  ASSERT_EQ(blocked.wait_for(5s), std::future_status::ready);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  std::string msg = blocked.get();
  EXPECT_TRUE(contains(msg, "UNAVAILABLE")) << msg;
  server.reset();
}

TEST(Coordinator, PortInUseIsAnIoError) {
  CoordinatorServer first(server_options(1));
  ServerOptions o = server_options(1);
  o.port = first.port();
  std::string msg = thrown<dtrain::IoError>([&] { CoordinatorServer second(o); });
  EXPECT_TRUE(contains(msg, std::to_string(first.port()))) << msg;
  ServerOptions bad = server_options(0);
  thrown<dtrain::InvalidArgument>([&] { CoordinatorServer s(bad); });
}

TEST(Coordinator, UnreachableCoordinatorIsACommError) {
  int port = 0;
  {
    CoordinatorServer s(server_options(1));
    port = s.port();
  }
  ClientOptions o;
  o.address = "127.0.0.1:" + std::to_string(port);
  o.connect_timeout = 300ms;
  std::string msg = thrown<dtrain::CommError>([&] { CoordinatorClient::connect(o); });
  EXPECT_TRUE(contains(msg, o.address)) << msg;
}

// ---- the `dtrain coordinator` binary ----

// Reads one line from fd within `timeout`.
std::string read_line(int fd, std::chrono::milliseconds timeout) {
  std::string line;
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    char ch;
    ssize_t n = read(fd, &ch, 1);
    if (n <= 0) break;
    if (ch == '\n') return line;
    line += ch;
  }
  return line;
}

// Waits up to `timeout` for pid; kills it (and fails) if it does not exit.
int wait_exit(pid_t pid, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  while (std::chrono::steady_clock::now() < end) {
    if (waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(20ms);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  ADD_FAILURE() << "dtrain coordinator did not exit within the timeout";
  return status;
}

TEST(CoordinatorBinary, StartsAnswersAndStopsOnSigterm) {
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  posix_spawn_file_actions_addclose(&actions, out[1]);
  std::vector<std::string> args = {DTRAIN_BIN,     "coordinator", "--port",   "0",
                                   "--world-size", "2",           "--job-id", "bin-job"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_strings = {"DTRAIN_JOB_TOKEN=tok-123"};
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::string(*e).rfind("DTRAIN_JOB_TOKEN=", 0) != 0) env_strings.emplace_back(*e);
  }
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, DTRAIN_BIN, &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);
  ASSERT_EQ(rc, 0) << "cannot start " << DTRAIN_BIN;

  std::string line = read_line(out[0], 15s);
  size_t at = line.find("listening on ");
  if (at == std::string::npos) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    close(out[0]);
    FAIL() << "no address line, got: '" << line << "'";
  }
  std::string address = line.substr(at + 13);
  EXPECT_TRUE(contains(address, "127.0.0.1:")) << line;
  EXPECT_TRUE(contains(line, "bin-job")) << line;

  {
    ClientOptions o;
    o.address = address;
    o.job_id = "bin-job";
    o.token = "tok-123";  // from DTRAIN_JOB_TOKEN
    o.connect_timeout = 5s;
    o.call_timeout = 5s;
    CoordinatorClient c = CoordinatorClient::connect(o);
    JobStatus st = c.status();
    EXPECT_EQ(st.job_id, "bin-job");
    EXPECT_EQ(st.world_size, 2);
    EXPECT_EQ(st.state, JobState::kWaiting);
    o.token = "";
    CoordinatorClient no_token = CoordinatorClient::connect(o);
    std::string msg = thrown<dtrain::InvalidArgument>([&] { no_token.status(); });
    EXPECT_TRUE(contains(msg, "UNAUTHENTICATED")) << msg;
  }

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = wait_exit(pid, 10s);
  close(out[0]);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal "
                                 << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
