// Tests of the coordinator's recovery: generations, restarts, elastic rendezvous,
// the state folder and the two-phase checkpoint commit checked against the
// checkpoint store. Servers run in-process on ephemeral loopback ports.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <vector>

#include "coordinator_test_util.h"
#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/error.h"

namespace {

using namespace dtrain::coordinator;
using namespace dtrain::coordinator::testing;
using namespace std::chrono_literals;

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
  HeartbeatSender alive(
      c0, {.rank = 0, .generation = 1, .interval = 50ms, .on_change = {}, .progress = {}});
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

}  // namespace
