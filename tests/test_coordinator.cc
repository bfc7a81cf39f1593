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

extern char** environ;

namespace {

using namespace dtrain::coordinator;
using namespace std::chrono_literals;
namespace v1 = ::dtrain::v1;

constexpr const char* kJob = "job-a";

ServerOptions server_options(int world_size, std::string token = "") {
  ServerOptions o;
  o.job_id = kJob;
  o.world_size = world_size;
  o.token = std::move(token);
  o.heartbeat_timeout = 0ms;
  return o;
}

CoordinatorClient connect(const CoordinatorServer& s, std::string job_id = kJob,
                          std::string token = "") {
  ClientOptions o;
  o.address = s.address();
  o.job_id = std::move(job_id);
  o.token = std::move(token);
  o.connect_timeout = 5s;
  o.call_timeout = 5s;
  return CoordinatorClient::connect(std::move(o));
}

JoinOptions worker(int i, std::chrono::milliseconds timeout = 10s) {
  JoinOptions j;
  j.host = "host" + std::to_string(i % 2);
  j.address = "10.0.0." + std::to_string(i) + ":4000";
  j.pid = 1000 + i;
  j.timeout = timeout;
  return j;
}

// Everything in a status but the clocks, to compare before and after a refused call.
std::string summary(const JobStatus& s) {
  std::string out = s.job_id + " " + job_state_name(s.state) +
                    " ws=" + std::to_string(s.world_size) + " gen=" + std::to_string(s.generation) +
                    " failed=" + std::to_string(s.failed_rank) + " reason=" + s.reason;
  for (const WorkerStatus& w : s.workers) {
    out += " | " + std::to_string(w.rank) + " " + w.host + " " + w.address + " " +
           std::to_string(w.pid) + " " + worker_state_name(w.state) +
           " hb=" + std::to_string(w.heartbeats);
  }
  return out;
}

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 5s) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// Runs f, expects it to throw E, returns the message.
template <class E, class F>
std::string thrown(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.message();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no exception";
  return "";
}

// Raw stub calls, for the exact status codes and for calls without a token.
std::unique_ptr<v1::Coordinator::Stub> raw_stub(const CoordinatorServer& s) {
  return v1::Coordinator::NewStub(
      grpc::CreateChannel(s.address(), grpc::InsecureChannelCredentials()));
}

void prepare(grpc::ClientContext& ctx, const char* token) {
  ctx.set_deadline(std::chrono::system_clock::now() + 5s);
  if (token != nullptr) ctx.AddMetadata("x-dtrain-token", token);
}

grpc::Status raw_join(v1::Coordinator::Stub& stub, const std::string& job_id, const char* token,
                      uint64_t timeout_ms = 200) {
  grpc::ClientContext ctx;
  prepare(ctx, token);
  v1::JoinRequest req;
  req.set_job_id(job_id);
  req.set_host("intruder");
  req.set_pid(666);
  req.set_timeout_ms(timeout_ms);
  v1::JoinResponse resp;
  return stub.Join(&ctx, req, &resp);
}

// Joins n workers from n threads; returns their results in worker order.
std::vector<JoinResult> join_all(const CoordinatorServer& s, int n) {
  std::vector<std::future<JoinResult>> futures;
  for (int i = 0; i < n; ++i) {
    futures.push_back(std::async(std::launch::async, [&s, i] {
      CoordinatorClient c = connect(s);
      return c.join(worker(i));
    }));
  }
  std::vector<JoinResult> results;
  for (auto& f : futures) results.push_back(f.get());
  return results;
}

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
    HeartbeatSender sender(c, {.rank = 1, .generation = 1, .interval = 20ms, .on_change = {}});
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
                             .on_change = [&](const HeartbeatSnapshot&) { ++changes; }});
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

// ---- recovery: generations, restarts, state folder, two-phase checkpoint commit ----

ServerOptions recovering_options(int world_size, int max_restarts, std::string state_dir = "") {
  ServerOptions o = server_options(world_size);
  o.max_restarts = max_restarts;
  o.state_dir = std::move(state_dir);
  return o;
}

// Joins n workers asking for ranks 0..n-1 (pid 1000 + rank), as dtrain launch does.
std::vector<JoinResult> join_ranked(const CoordinatorServer& s, int n) {
  std::vector<std::future<JoinResult>> futures;
  for (int i = 0; i < n; ++i) {
    futures.push_back(std::async(std::launch::async, [&s, i] {
      CoordinatorClient c = connect(s);
      JoinOptions j = worker(i);
      j.rank = i;
      return c.join(j);
    }));
  }
  std::vector<JoinResult> results;
  for (auto& f : futures) results.push_back(f.get());
  return results;
}

std::filesystem::path fresh_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() /
           ("dtrain_test_coordinator_" + std::to_string(getpid())) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

// Writes the shard file of `rank` for `step` under root and returns its descriptor.
ShardInfo write_shard_file(const std::filesystem::path& root, int64_t step, int rank, int world,
                           const std::string& content) {
  std::string file = dtrain::ckpt::shard_file_name(rank, world);
  auto folder = root / dtrain::ckpt::checkpoint_name(step);
  std::filesystem::create_directories(folder);
  std::ofstream(folder / file, std::ios::binary) << content;
  return ShardInfo{rank, file, content.size(),
                   dtrain::ckpt::file_checksum((folder / file).string())};
}

CheckpointBegin begin_at(int rank, uint64_t generation, int64_t step,
                         const std::filesystem::path& root) {
  return CheckpointBegin{rank, generation, step, 0, root.string(), R"({"model":"mlp"})", 0};
}

TEST(CoordinatorRecovery, LostWorkerStartsANewGenerationTheSurvivorsRejoin) {
  CoordinatorServer server(recovering_options(2, 2));
  join_ranked(server, 2);
  CoordinatorClient c = connect(server);
  auto blocked = std::async(std::launch::async, [&] {
    return thrown<dtrain::CommError>([&] { c.barrier("b", 0, 1, 10s); });
  });
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(c.report_failure(1, "connection reset", 0, 1), JobState::kRecovering);
  std::string msg = blocked.get();
  EXPECT_TRUE(contains(msg, "join again")) << msg;
  JobStatus st = c.status();
  EXPECT_EQ(st.state, JobState::kRecovering);
  EXPECT_EQ(st.generation, 2u);
  EXPECT_EQ(st.restarts, 1);
  EXPECT_TRUE(st.workers.empty());
  // A survivor's heartbeat of generation 1 learns generation 2.
  HeartbeatResult h = c.heartbeat(0, 1);
  EXPECT_EQ(h.generation, 2u);
  EXPECT_EQ(h.state, JobState::kRecovering);
  // A second report of the same (old) generation is the same loss: ignored.
  EXPECT_EQ(c.report_failure(-1, "lost rank 1", 0, 1), JobState::kRecovering);
  EXPECT_EQ(c.status().restarts, 1);
  std::vector<JoinResult> again = join_ranked(server, 2);
  EXPECT_EQ(again[0].generation, 2u);
  EXPECT_EQ(again[1].rank, 1);
  EXPECT_EQ(c.status().state, JobState::kRunning);
}

TEST(CoordinatorRecovery, SilentRankIsLostAndStartsANewGeneration) {
  ServerOptions o = recovering_options(2, 1);
  o.heartbeat_timeout = 300ms;
  CoordinatorServer server(o);
  join_ranked(server, 2);
  CoordinatorClient c0 = connect(server);
  HeartbeatSender alive(c0, {.rank = 0, .generation = 1, .interval = 50ms, .on_change = {}});
  c0.heartbeat(1, 1);  // rank 1 is monitored from here on, and then stays silent
  ASSERT_TRUE(eventually([&] { return alive.last().last.generation == 2; }));
  EXPECT_EQ(alive.last().last.state, JobState::kRecovering);
  JobStatus st = c0.status();
  EXPECT_EQ(st.restarts, 1);
  EXPECT_EQ(st.failed_rank, 1);
  EXPECT_TRUE(contains(st.reason, "no heartbeat")) << st.reason;
  EXPECT_EQ(st.failed_pid, 1001);  // the silent process, for its launcher to kill
}

TEST(CoordinatorRecovery, ExhaustedRestartsFailTheJobWithTheReason) {
  CoordinatorServer server(recovering_options(2, 1));
  join_ranked(server, 2);
  CoordinatorClient c = connect(server);
  EXPECT_EQ(c.report_failure(1, "killed", 0, 1), JobState::kRecovering);
  join_ranked(server, 2);
  EXPECT_EQ(c.report_failure(1, "killed again", 0, 2), JobState::kFailed);
  JobStatus st = c.status();
  EXPECT_TRUE(contains(st.reason, "killed again")) << st.reason;
  EXPECT_TRUE(contains(st.reason, "restarts exhausted (1 of 1 used)")) << st.reason;
  std::string msg = thrown<dtrain::InvalidArgument>([&] { c.join(worker(0, 1s)); });
  EXPECT_TRUE(contains(msg, "has failed")) << msg;
}

TEST(CoordinatorRecovery, FatalReportFailsAtOnceEvenWithRestartsLeft) {
  CoordinatorServer server(recovering_options(2, 3));
  join_ranked(server, 2);
  CoordinatorClient c = connect(server);
  EXPECT_EQ(c.report_failure(0, "--lr must be > 0", 0, 1, /*fatal=*/true), JobState::kFailed);
}

TEST(CoordinatorRecovery, ANewProcessUnderARunningRankStartsANewGeneration) {
  CoordinatorServer server(recovering_options(2, 3));
  join_ranked(server, 2);
  // Rank 1's launcher restarted it: a new pid asks for rank 1.
  auto replacement = std::async(std::launch::async, [&] {
    CoordinatorClient c = connect(server);
    JoinOptions j = worker(1);
    j.rank = 1;
    j.pid = 4242;
    return c.join(j);
  });
  CoordinatorClient c = connect(server);
  ASSERT_TRUE(eventually([&] { return c.status().generation == 2; }));
  EXPECT_TRUE(contains(c.status().reason, "replaced by a new process")) << c.status().reason;
  CoordinatorClient c0 = connect(server);
  JoinOptions j0 = worker(0);
  j0.rank = 0;
  j0.previous_rank = 0;
  j0.previous_generation = 1;
  JoinResult r0 = c0.join(j0);
  JoinResult r1 = replacement.get();
  EXPECT_EQ(r0.generation, 2u);
  EXPECT_EQ(r1.generation, 2u);
  EXPECT_EQ(r1.peers[1].pid, 4242);
}

TEST(CoordinatorRecovery, ElasticRendezvousGoesOnWithFewerAfterTheRejoinTimeout) {
  ServerOptions o = recovering_options(3, 2);
  o.min_workers = 2;
  o.rejoin_timeout = 300ms;
  CoordinatorServer server(o);
  join_ranked(server, 3);
  CoordinatorClient c = connect(server);
  EXPECT_EQ(c.report_failure(1, "node gone", 0, 1), JobState::kRecovering);
  auto t0 = std::chrono::steady_clock::now();
  // Ranks 0 and 2 come back; rank 1 does not.
  std::vector<std::future<JoinResult>> back;
  for (int r : {0, 2}) {
    back.push_back(std::async(std::launch::async, [&server, r] {
      CoordinatorClient w = connect(server);
      JoinOptions j = worker(r);
      j.rank = r;
      return w.join(j);
    }));
  }
  JoinResult r0 = back[0].get();
  JoinResult r2 = back[1].get();
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 300ms);
  EXPECT_EQ(r0.world_size, 2);
  EXPECT_EQ(r0.rank, 0);
  EXPECT_EQ(r2.rank, 1);  // ranks 0..n-1 in the order of the previous ranks
  EXPECT_EQ(r2.generation, 2u);
  JobStatus st = c.status();
  EXPECT_EQ(st.state, JobState::kRunning);
  EXPECT_EQ(st.world_size, 2);
  // A barrier of this generation needs the two, not three.
  auto b0 = std::async(std::launch::async, [&] { c.barrier("e", 0, 2, 5s); });
  c.barrier("e", 1, 2, 5s);
  b0.get();
}

TEST(CoordinatorRecovery, WithoutElasticTheRendezvousWaitsForEveryWorker) {
  CoordinatorServer server(recovering_options(3, 2));
  join_ranked(server, 3);
  CoordinatorClient c = connect(server);
  c.report_failure(1, "node gone", 0, 1);
  JoinOptions j = worker(0, 500ms);
  j.rank = 0;
  std::string msg = thrown<dtrain::TimeoutError>([&] { c.join(j); });
  EXPECT_TRUE(contains(msg, "1 of 3 workers joined")) << msg;
}

TEST(CoordinatorRecovery, CheckpointIsCommittedOnlyWhenEveryShardIsIn) {
  auto root = fresh_dir("commit");
  CoordinatorServer server(server_options(2));
  join_ranked(server, 2);
  CoordinatorClient c = connect(server);
  EXPECT_EQ(c.begin_checkpoint(begin_at(0, 1, 5, root)), "step-00000005");
  EXPECT_EQ(c.begin_checkpoint(begin_at(1, 1, 5, root)), "step-00000005");
  ShardCommit first = c.commit_shard(1, 5, write_shard_file(root, 5, 0, 2, "rank zero"));
  EXPECT_FALSE(first.committed);
  EXPECT_EQ(first.shards_in, 1);
  EXPECT_FALSE(std::filesystem::exists(root / "latest"));
  EXPECT_TRUE(c.last_checkpoint().name.empty());
  ShardCommit second = c.commit_shard(1, 5, write_shard_file(root, 5, 1, 2, "rank one"));
  EXPECT_TRUE(second.committed);
  EXPECT_EQ(second.last.name, "step-00000005");
  dtrain::ckpt::CheckpointStore store(root.string());
  ASSERT_TRUE(store.latest().has_value());
  EXPECT_EQ(store.latest()->shards.size(), 2u);
  EXPECT_EQ(store.latest()->config.value("model", ""), "mlp");
  EXPECT_EQ(c.status().last_checkpoint.step, 5);

  // A shard whose checksum does not match: nothing is committed, 5 stays latest.
  c.begin_checkpoint(begin_at(0, 1, 10, root));
  c.commit_shard(1, 10, write_shard_file(root, 10, 0, 2, "rank zero"));
  ShardInfo bad = write_shard_file(root, 10, 1, 2, "rank one");
  bad.checksum = "xxh3-64:0000000000000000";
  std::string msg = thrown<dtrain::InvalidArgument>([&] { c.commit_shard(1, 10, bad); });
  EXPECT_TRUE(contains(msg, "shard-00001-of-00002")) << msg;
  EXPECT_EQ(store.latest()->name, "step-00000005");
  EXPECT_EQ(c.last_checkpoint().name, "step-00000005");
  // A shard of another generation is refused.
  msg = thrown<dtrain::CommError>([&] { c.commit_shard(7, 10, bad); });
  EXPECT_TRUE(contains(msg, "generation 7")) << msg;
}

TEST(CoordinatorRecovery, RestartedCoordinatorContinuesTheJobFromItsStateFolder) {
  auto state = fresh_dir("state");
  auto root = fresh_dir("state-ckpt");
  {
    CoordinatorServer server(recovering_options(2, 3, state.string()));
    join_ranked(server, 2);
    CoordinatorClient c = connect(server);
    for (int r = 0; r < 2; ++r) c.begin_checkpoint(begin_at(r, 1, 20, root));
    for (int r = 0; r < 2; ++r) c.commit_shard(1, 20, write_shard_file(root, 20, r, 2, "x"));
  }  // the coordinator goes away
  CoordinatorServer server(recovering_options(2, 3, state.string()));
  CoordinatorClient c = connect(server);
  JobStatus st = c.status();
  EXPECT_EQ(st.state, JobState::kRecovering);
  EXPECT_EQ(st.generation, 2u);
  EXPECT_EQ(st.restarts, 0);
  EXPECT_EQ(st.last_checkpoint.name, "step-00000020");
  EXPECT_EQ(c.heartbeat(1, 1).generation, 2u);  // the workers learn to re-join
  std::vector<JoinResult> joined = join_ranked(server, 2);
  EXPECT_EQ(joined[0].generation, 2u);
  EXPECT_EQ(joined[0].last_checkpoint.name, "step-00000020");
  EXPECT_EQ(joined[0].last_checkpoint.root, root.string());
  EXPECT_EQ(c.status().state, JobState::kRunning);

  // A state folder of another job is refused, naming the file.
  ServerOptions other = recovering_options(2, 3, state.string());
  other.job_id = "job-b";
  std::string msg = thrown<dtrain::InvalidArgument>([&] { CoordinatorServer s(other); });
  EXPECT_TRUE(contains(msg, "job.json")) << msg;
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
