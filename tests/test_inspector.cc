// The stall and desync inspector (comm/inspector.h) over the tcp backend, ranks as threads
// sharing a MemoryStore: a rank that skips a collective is named, with the collective,
// by the others within the stall timeout and the job fails; mismatched counts, orders,
// dtypes and roots are errors naming both sides with no data moved; a normal run through
// the decorator (every collective, async, split) matches a sequential oracle. Last, the
// acceptance test through `dtrain launch --nproc 2 -- dtrain train --stall-timeout`, with
// the DTRAIN_TEST_STALL_AT fault-injection hook.
#include "dtrain/comm/inspector.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <latch>
#include <mutex>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "subprocess.h"

namespace dtrain::comm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// What each rank logged and the error (what()) it ended with, "" when none.
struct RankOutcome {
  std::vector<std::string> log;
  std::string error;
};

// Runs fn(rank, comm) on `world` threads, each over its own inspected tcp communicator;
// rank `hold_rank` gets the fault-injection hook test_hold_at = hold_at.
template <typename Fn>
std::vector<RankOutcome> run_inspected(int world, InspectorOptions options, Fn fn,
                                       milliseconds timeout = std::chrono::seconds(20),
                                       int hold_rank = -1, uint64_t hold_at = 0) {
  MemoryStore store;
  std::vector<RankOutcome> out(static_cast<size_t>(world));
  std::mutex mu;
  std::latch done(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      std::unique_ptr<Communicator> c;
      try {
        TcpOptions tcp;
        tcp.tag = "inspect";
        InspectorOptions o = options;
        if (r == hold_rank) o.test_hold_at = hold_at;
        o.log = [&, r](const std::string& line) {
          std::lock_guard<std::mutex> lock(mu);
          out[static_cast<size_t>(r)].log.push_back(line);
        };
        c = make_inspected_communicator(
            make_tcp_communicator(store, r, world, CommOptions{timeout}, tcp), &store, o);
        fn(r, *c);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mu);
        out[static_cast<size_t>(r)].error = e.what();
      }
      done.arrive_and_wait();  // close only once every rank is done
    });
  }
  for (std::thread& t : threads) t.join();
  return out;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string s;
  for (const std::string& l : lines) s += l + "\n";
  return s;
}

InspectorOptions stall_options(milliseconds stall, bool check) {
  InspectorOptions o;
  o.stall_timeout = stall;
  o.check_collectives = check;
  return o;
}

// ---- (a) a rank skips a collective ----------------------------------------------------

class SkippedCollective : public ::testing::TestWithParam<bool> {};

TEST_P(SkippedCollective, OthersNameTheRankAndTheCollectiveWithinTheTimeoutAndFail) {
  const milliseconds stall(600);
  std::vector<double> seconds(3, -1);
  auto out = run_inspected(3, stall_options(stall, GetParam()), [&](int r, Communicator& c) {
    std::vector<float> x(4, 1.0f);
    c.name_next("step 0");
    c.allreduce(x.data(), x.size(), DType::f32, ReduceOp::kSum);
    if (r == 1) {
      // Skips 'bucket 3' and is busy elsewhere; when it comes back, the job is over.
      std::this_thread::sleep_for(stall * 4);
      c.barrier();
      return;
    }
    const auto t0 = Clock::now();
    c.name_next("bucket 3");
    try {
      c.allreduce(x.data(), x.size(), DType::f32, ReduceOp::kSum);
    } catch (...) {
      seconds[static_cast<size_t>(r)] = std::chrono::duration<double>(Clock::now() - t0).count();
      throw;
    }
  });
  // The first of ranks 0 and 2 to notice logs the report and aborts; the other may fail
  // with that reason before its own watchdog looks.
  const std::string log = joined(out[0].log) + joined(out[2].log);
  EXPECT_TRUE(contains(log,
                       "stall: rank 1 has not entered #2: its last collective is #1 "
                       "'step 0' (allreduce(sum) of 4 f32)"))
      << log;
  EXPECT_TRUE(contains(log, "waits in allreduce #2 'bucket 3' for")) << log;
  for (int r : {0, 2}) {
    const RankOutcome& o = out[static_cast<size_t>(r)];
    EXPECT_TRUE(contains(o.error, "rank 1 has not entered it")) << o.error;
    EXPECT_TRUE(contains(o.error, "allreduce #2 'bucket 3'")) << o.error;
    // Within the stall timeout plus a bound (the watchdog ticks every stall / 4), and
    // not before it: the error comes from the inspector, not the 20 s comm timeout.
    EXPECT_GE(seconds[static_cast<size_t>(r)], 0.6) << "rank " << r;
    EXPECT_LT(seconds[static_cast<size_t>(r)], 0.6 + 5.0) << "rank " << r;
  }
  // The rank that skipped learns it too: the first reporter's reason, as a CommError.
  EXPECT_TRUE(contains(out[1].error, "has not entered it")) << out[1].error;
  std::printf("the report:\n%sthe error: %s\n", log.c_str(), out[0].error.c_str());
}

INSTANTIATE_TEST_SUITE_P(CheckOnOff, SkippedCollective, ::testing::Bool());

// The fault-injection hook: rank 1 holds before its #2 (for its 3 s comm timeout), then
// enters it and finds the communicator aborted by rank 0's report.
TEST(Inspector, HookHoldsARankWhichTheOthersReport) {
  auto out = run_inspected(
      2, stall_options(milliseconds(500), true),
      [&](int r, Communicator& c) {
        std::vector<double> x(3, r);
        c.name_next("warm-up");
        c.allreduce(x.data(), x.size(), DType::f64, ReduceOp::kSum);
        c.name_next("grads");
        c.allreduce(x.data(), x.size(), DType::f64, ReduceOp::kSum);
      },
      std::chrono::seconds(3), /*hold_rank=*/1, /*hold_at=*/2);
  EXPECT_TRUE(contains(out[0].error, "stall: rank 0 waited")) << out[0].error;
  EXPECT_TRUE(contains(out[0].error,
                       "allreduce #2 'grads' (group world); rank 1 has not "
                       "entered it"))
      << out[0].error;
  EXPECT_TRUE(contains(joined(out[1].log), "rank 1 holds before allreduce #2 'grads'"));
  EXPECT_TRUE(contains(out[1].error, "rank 1 has not entered it")) << out[1].error;
}

// ---- (b) mismatches are errors naming both sides -----------------------------------------

struct MismatchCase {
  const char* what;
  // Issues rank r's collective #1 on buffer x (1024 f32, all = r + 1).
  void (*issue)(int r, Communicator& c, std::vector<float>& x);
  const char* message;
};

const MismatchCase kMismatches[] = {
    {"count",
     [](int r, Communicator& c, std::vector<float>& x) {
       c.name_next(r == 1 ? "bucket 2" : "bucket 3");
       c.allreduce(x.data(), r == 1 ? 512 : 1024, DType::f32, ReduceOp::kAvg);
     },
     "collective mismatch at #1 in group world: rank 0 calls allreduce(avg) of 1024 f32 'bucket "
     "3', rank 1 calls allreduce(avg) of 512 f32 'bucket 2'"},
    {"order",
     [](int r, Communicator& c, std::vector<float>& x) {
       if (r == 2) return c.broadcast(x.data(), x.size(), DType::f32, 0);
       c.allreduce(x.data(), x.size(), DType::f32, ReduceOp::kSum);
     },
     "collective mismatch at #1 in group world: rank 0 calls allreduce(sum) of 1024 f32, rank 2 "
     "calls broadcast of 1024 f32 from rank 0"},
    {"dtype",
     [](int r, Communicator& c, std::vector<float>& x) {
       c.allreduce(x.data(), r == 1 ? 2048 : 1024, r == 1 ? DType::bf16 : DType::f32,
                   ReduceOp::kSum);
     },
     "rank 0 calls allreduce(sum) of 1024 f32, rank 1 calls allreduce(sum) of 2048 bf16"},
    {"root",
     [](int r, Communicator& c, std::vector<float>& x) {
       c.broadcast(x.data(), x.size(), DType::f32, r == 2 ? 2 : 0);
     },
     "rank 0 calls broadcast of 1024 f32 from rank 0, rank 2 calls broadcast of 1024 f32 from "
     "rank 2"},
    {"name",
     [](int r, Communicator& c, std::vector<float>& x) {
       c.name_next(r == 0 ? "bucket 0 (grads of fc2.weight ..)"
                          : "bucket 1 (grads of fc1.weight ..)");
       c.allreduce(x.data(), x.size(), DType::f32, ReduceOp::kSum);
     },
     "rank 0 calls allreduce(sum) of 1024 f32 'bucket 0 (grads of fc2.weight ..)', rank 1 calls "
     "allreduce(sum) of 1024 f32 'bucket 1 (grads of fc1.weight ..)'"},
};

void PrintTo(const MismatchCase& m, std::ostream* os) { *os << m.what; }

class Mismatch : public ::testing::TestWithParam<MismatchCase> {};

TEST_P(Mismatch, IsAnErrorNamingBothSidesWithNoDataMoved) {
  const MismatchCase& m = GetParam();
  std::vector<std::vector<float>> data(3);
  std::vector<std::string> later(3);
  auto out = run_inspected(3, stall_options(milliseconds(0), true), [&](int r, Communicator& c) {
    std::vector<float>& x = data[static_cast<size_t>(r)];
    x.assign(1024, static_cast<float>(r + 1));
    try {
      m.issue(r, c, x);
    } catch (const InvalidArgument&) {
      try {
        c.barrier();  // the communicator stays failed
      } catch (const CommError& e) {
        later[static_cast<size_t>(r)] = e.what();
      }
      throw;
    }
  });
  for (int r = 0; r < 3; ++r) {
    const size_t i = static_cast<size_t>(r);
    EXPECT_TRUE(contains(out[i].error, m.message)) << "rank " << r << ": " << out[i].error;
    EXPECT_TRUE(contains(later[i], "collective mismatch at #1")) << later[i];
    // No wrong sum: the data op never ran.
    EXPECT_EQ(data[i], std::vector<float>(1024, static_cast<float>(r + 1))) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, Mismatch, ::testing::ValuesIn(kMismatches),
                         [](const auto& info) { return std::string(info.param.what); });

// ---- (c) a normal run matches the oracle ------------------------------------------------

// Rank r's input element i.
float input(int r, size_t i) { return static_cast<float>((r + 1) * 100 + static_cast<int>(i % 7)); }

void check_every_collective(int r, int world, Communicator& c) {
  const size_t n = 37;
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = input(r, i);
  // Async, two in flight, then waited: sum and max.
  std::vector<float> y = x;
  c.name_next("sum");
  auto a = c.allreduce_async(x.data(), n, DType::f32, ReduceOp::kSum);
  auto b = c.allreduce_async(y.data(), n, DType::f32, ReduceOp::kMax);
  a->wait();
  b->wait();
  for (size_t i = 0; i < n; ++i) {
    float sum = 0;
    for (int q = 0; q < world; ++q) sum += input(q, i);
    ASSERT_EQ(x[i], sum) << i;
    ASSERT_EQ(y[i], input(world - 1, i)) << i;
  }
  std::vector<int64_t> v = {r == 1 ? 42 : -1};
  c.broadcast(v.data(), 1, DType::i64, 1);
  ASSERT_EQ(v[0], 42);
  std::vector<int32_t> mine = {r, 10 * r}, all(2 * static_cast<size_t>(world));
  c.allgather(mine.data(), all.data(), 2, DType::i32);
  for (int q = 0; q < world; ++q) ASSERT_EQ(all[2 * static_cast<size_t>(q) + 1], 10 * q);
  std::vector<double> send(static_cast<size_t>(world), r + 1.0), recv(1);
  c.reduce_scatter(send.data(), recv.data(), 1, DType::f64, ReduceOp::kSum);
  ASSERT_EQ(recv[0], world * (world + 1) / 2.0);
  c.barrier();
}

TEST(Inspector, NormalRunMatchesTheOracleAndReportsNothing) {
  std::vector<std::string> backends(3);
  auto out = run_inspected(3, stall_options(milliseconds(2000), true), [&](int r, Communicator& c) {
    backends[static_cast<size_t>(r)] = c.backend();
    for (int round = 0; round < 3; ++round) check_every_collective(r, 3, c);
    // Children are inspected too: groups {0, 2} and {1}.
    std::unique_ptr<Communicator> child = c.split(r % 2, r);
    ASSERT_NE(child, nullptr);
    std::vector<float> x = {static_cast<float>(r)};
    child->allreduce(x.data(), 1, DType::f32, ReduceOp::kSum);
    ASSERT_EQ(x[0], r % 2 == 0 ? 2.0f : 1.0f);
    if (r % 2 == 0) check_every_collective(r / 2, 2, *child);
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(out[static_cast<size_t>(r)].error, "") << "rank " << r;
    EXPECT_TRUE(out[static_cast<size_t>(r)].log.empty()) << joined(out[static_cast<size_t>(r)].log);
    EXPECT_EQ(backends[static_cast<size_t>(r)], "tcp");
  }
}

TEST(Inspector, MismatchInsideASplitNamesTheChildGroup) {
  auto out = run_inspected(2, stall_options(milliseconds(0), true), [&](int r, Communicator& c) {
    std::unique_ptr<Communicator> child = c.split(0, r);
    std::vector<float> x(8, 1.0f);
    child->allreduce(x.data(), r == 0 ? 8 : 4, DType::f32, ReduceOp::kSum);
  });
  EXPECT_TRUE(contains(out[0].error,
                       "collective mismatch at #1 in group world/split0/c0: rank 0 "
                       "calls allreduce(sum) of 8 f32, rank 1 calls allreduce(sum) "
                       "of 4 f32"))
      << out[0].error;
}

TEST(Inspector, RejectsANegativeStallTimeout) {
  MemoryStore store;
  InspectorOptions o;
  o.stall_timeout = milliseconds(-1);
  EXPECT_THROW(
      make_inspected_communicator(make_tcp_communicator(store, 0, 1, CommOptions{}), &store, o),
      InvalidArgument);
}

// ---- the acceptance test through the CLI -------------------------------------------------

#ifdef DTRAIN_BIN
TEST(InspectorCli, LaunchReportsTheHeldRankAndTheCollectiveAndFails) {
  const auto dir = testing::scratch_dir("dtrain_test_inspector", "cli");
  const std::string cmd =
      "env DTRAIN_TEST_STALL_AT=1:12 " + std::string(DTRAIN_BIN) +
      " launch --nproc 2 --max-restarts 0 --failure-wait 2 -- dtrain train --no-progress "
      "--model mlp --max-steps 40 --data-cache " +
      std::string(DTRAIN_DATA_CACHE) + " --metrics " + (dir / "m.jsonl").string() +
      " --stall-timeout 3 --check-collectives";
  const auto t0 = Clock::now();
  testing::CommandResult r = testing::run_command(cmd, 120);
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "fault injection (DTRAIN_TEST_STALL_AT): rank 1 holds before"))
      << r.out;
  EXPECT_TRUE(contains(r.out, "stall: rank 1 has not entered #12")) << r.out;
  EXPECT_TRUE(contains(r.out, "rank 1 has not entered it")) << r.out;
  EXPECT_LT(s, 60.0) << "the job should end long before the 60 s comm timeout\n" << r.out;
}
#endif

}  // namespace
}  // namespace dtrain::comm
