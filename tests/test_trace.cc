// The timeline (parallel/trace.h): the overlap arithmetic against hand-computed
// intervals, the per-rank file names, the Chrome trace JSON, DDP's spans over the
// real tcp backend (two ranks as threads), and `dtrain train --trace` through
// `dtrain launch --nproc 2`.
//
// The trace checks are structural, never timed: every span kind is present with a
// non-negative duration and the rank as pid, each all-reduce lies inside its step and
// starts after the last pack of its bucket in that step, and the wait ends after
// every all-reduce of its step has completed.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <latch>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/threading.h"
#include "dtrain/parallel/ddp.h"
#include "dtrain/parallel/trace.h"
#include "subprocess.h"

namespace fs = std::filesystem;
using dtrain::parallel::CommOverlap;
using dtrain::parallel::Span;
using dtrain::parallel::SpanKind;
using dtrain::parallel::TraceClock;
using dtrain::parallel::Tracer;
using Json = nlohmann::json;

namespace {

// A span [start_ms, end_ms) after a fixed origin.
Span at(SpanKind kind, double start_ms, double end_ms, int64_t step, int bucket = -1) {
  const TraceClock::time_point t0 = TraceClock::time_point(std::chrono::seconds(1000));
  auto ms = [&](double v) {
    return t0 + std::chrono::duration_cast<TraceClock::duration>(
                    std::chrono::duration<double, std::milli>(v));
  };
  return Span{kind, ms(start_ms), ms(end_ms), bucket, step};
}

// Step 1: backward [0,10); buckets 0 [4,12) and 1 [8,15) overlap each other (union
// [4,15) = 11 ms), 6 ms of it inside backward; wait [10,15).
// Step 2: backward [20,30); bucket 0 [25,35) = 10 ms, 5 hidden; wait [30,35).
// A forward [15,20) overlaps nothing that counts.
std::vector<Span> hand_example() {
  return {at(SpanKind::kBackward, 0, 10, 1),      at(SpanKind::kAllReduce, 4, 12, 1, 0),
          at(SpanKind::kAllReduce, 8, 15, 1, 1),  at(SpanKind::kWait, 10, 15, 1),
          at(SpanKind::kForward, 15, 20, 2),      at(SpanKind::kBackward, 20, 30, 2),
          at(SpanKind::kAllReduce, 25, 35, 2, 0), at(SpanKind::kWait, 30, 35, 2)};
}

TEST(TraceOverlap, HandComputedExample) {
  const CommOverlap o = dtrain::parallel::communication_overlap(hand_example());
  EXPECT_NEAR(o.allreduce_s, 0.021, 1e-9);
  EXPECT_NEAR(o.hidden_s, 0.011, 1e-9);
  EXPECT_NEAR(o.exposed_s(), 0.010, 1e-9);
  EXPECT_NEAR(o.wait_s, 0.010, 1e-9);
  EXPECT_NEAR(o.hidden_fraction(), 11.0 / 21.0, 1e-9);
  EXPECT_EQ(dtrain::parallel::overlap_line(o),
            "communication: 21.0 ms in all-reduce, 11.0 ms hidden behind backward (52%), "
            "10.0 ms exposed; 10.0 ms waiting after backward");
}

TEST(TraceOverlap, PerStep) {
  auto steps = dtrain::parallel::communication_overlap_by_step(hand_example());
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].first, 1);
  EXPECT_NEAR(steps[0].second.allreduce_s, 0.011, 1e-9);
  EXPECT_NEAR(steps[0].second.hidden_s, 0.006, 1e-9);
  EXPECT_EQ(steps[1].first, 2);
  EXPECT_NEAR(steps[1].second.allreduce_s, 0.010, 1e-9);
  EXPECT_NEAR(steps[1].second.hidden_s, 0.005, 1e-9);
}

TEST(TraceOverlap, AllReduceEntirelyInsideOrOutsideBackward) {
  std::vector<Span> inside = {at(SpanKind::kBackward, 0, 10, 1),
                              at(SpanKind::kAllReduce, 2, 5, 1, 0)};
  EXPECT_NEAR(dtrain::parallel::communication_overlap(inside).hidden_fraction(), 1.0, 1e-9);
  std::vector<Span> after = {at(SpanKind::kBackward, 0, 10, 1),
                             at(SpanKind::kAllReduce, 10, 14, 1, 0)};
  EXPECT_NEAR(dtrain::parallel::communication_overlap(after).hidden_fraction(), 0.0, 1e-9);
  EXPECT_EQ(dtrain::parallel::overlap_line(dtrain::parallel::communication_overlap({})),
            "communication: no bucketed all-reduce traced on this rank");
}

TEST(TracePath, RankInserted) {
  using dtrain::parallel::trace_path_for_rank;
  EXPECT_EQ(trace_path_for_rank("out/trace.json", 3), "out/trace.rank3.json");
  EXPECT_EQ(trace_path_for_rank("timeline", 0), "timeline.rank0.json");
  EXPECT_EQ(trace_path_for_rank("traces/", 1), "traces/trace.rank1.json");
  const fs::path dir = dtrain::testing::scratch_dir("dtrain_test_trace", "pathdir");
  EXPECT_EQ(trace_path_for_rank(dir.string(), 2), (dir / "trace.rank2.json").string());
  EXPECT_THROW(dtrain::parallel::check_trace_writable("/nonexistent-dir/x/trace.rank0.json"),
               dtrain::IoError);
}

// ---- checks on a parsed trace ----------------------------------------------------

struct Event {
  std::string name;
  double ts = 0, dur = 0;
  int tid = 0;
  int64_t step = -1;
  int bucket = -1;
};

// The "X" events of a trace, after checking every field of every event.
std::vector<Event> complete_events(const Json& trace, int rank) {
  std::vector<Event> out;
  EXPECT_TRUE(trace.contains("traceEvents") && trace["traceEvents"].is_array());
  for (const Json& e : trace["traceEvents"]) {
    EXPECT_EQ(e.at("pid").get<int>(), rank) << e.dump();
    if (e.at("ph") == "M") continue;
    EXPECT_EQ(e.at("ph"), "X") << e.dump();
    Event ev{e.at("name").get<std::string>(),
             e.at("ts").get<double>(),
             e.at("dur").get<double>(),
             e.at("tid").get<int>(),
             e.at("args").at("step").get<int64_t>(),
             e.at("args").value("bucket", -1)};
    EXPECT_FALSE(e.at("cat").get<std::string>().empty()) << e.dump();
    EXPECT_GE(ev.dur, 0) << e.dump();
    EXPECT_GT(ev.ts, 0) << e.dump();
    out.push_back(ev);
  }
  return out;
}

// The all-reduces of each (step, bucket) against that step's packs, waits and span.
void check_ddp_order(const std::vector<Event>& events) {
  std::map<std::pair<int64_t, int>, double> last_pack_end;
  std::map<int64_t, std::pair<double, double>> step_span;
  std::map<int64_t, double> wait_end;
  for (const Event& e : events) {
    if (e.name == "pack") {
      double& end = last_pack_end[{e.step, e.bucket}];
      end = std::max(end, e.ts + e.dur);
    }
    if (e.name == "step") step_span[e.step] = {e.ts, e.ts + e.dur};
    if (e.name == "wait") wait_end[e.step] = e.ts + e.dur;
  }
  int checked = 0;
  for (const Event& e : events) {
    if (e.name != "allreduce") continue;
    EXPECT_GE(e.bucket, 0);
    EXPECT_EQ(e.tid, 1 + e.bucket) << "each bucket's all-reduce has its own track";
    const std::pair<int64_t, int> key{e.step, e.bucket};
    ASSERT_TRUE(last_pack_end.count(key)) << "step " << e.step;
    EXPECT_GE(e.ts, last_pack_end[key]) << "bucket " << e.bucket;
    if (step_span.count(e.step)) {  // the CLI's trace: the Trainer's step spans
      EXPECT_GE(e.ts, step_span[e.step].first);
      EXPECT_LE(e.ts + e.dur, step_span[e.step].second);
    }
    ASSERT_TRUE(wait_end.count(e.step));
    EXPECT_LE(e.ts + e.dur, wait_end[e.step]) << "completed before the wait returned";
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

std::set<std::string> names(const std::vector<Event>& events) {
  std::set<std::string> s;
  for (const Event& e : events) s.insert(e.name);
  return s;
}

// ---- DDP over tcp, two ranks as threads --------------------------------------------

// Three traced DDP steps of the MLP per rank, small buckets (several per step).
std::string traced_ddp_rank(int rank, dtrain::comm::Communicator& comm) {
  dtrain::set_num_threads(1);
  Tracer tracer(rank);
  dtrain::Generator gen(7);
  auto model = dtrain::nn::make_model("mlp", gen);
  dtrain::parallel::DdpOptions options;
  options.first_bucket_bytes = 4 << 10;
  options.bucket_bytes = 64 << 10;
  options.tracer = &tracer;
  dtrain::parallel::DistributedDataParallel ddp(model, comm, options);
  EXPECT_GT(ddp.buckets().size(), 1u);
  dtrain::Generator data(100 + static_cast<uint64_t>(rank));
  for (int64_t step = 1; step <= 3; ++step) {
    tracer.set_step(step);
    dtrain::nn::Batch b = dtrain::nn::make_random_batch("mlp", 8, data);
    dtrain::cross_entropy(ddp(b.input), b.target).backward();
    ddp.finish_gradient_sync();
  }
  return dtrain::parallel::chrome_trace_json(tracer);
}

TEST(TraceDdp, SpansOfEveryBucketInOrder) {
  dtrain::comm::MemoryStore store;
  std::vector<std::string> traces(2), errors(2);
  std::latch done(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      try {
        dtrain::comm::TcpOptions tcp;
        tcp.tag = "trace-ddp";
        auto comm = dtrain::comm::make_tcp_communicator(
            store, r, 2, dtrain::comm::CommOptions{std::chrono::seconds(20)}, tcp);
        traces[r] = traced_ddp_rank(r, *comm);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
      done.arrive_and_wait();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    ASSERT_EQ(errors[r], "") << "rank " << r;
    std::vector<Event> events = complete_events(Json::parse(traces[r]), r);
    EXPECT_EQ(names(events), (std::set<std::string>{"pack", "allreduce", "wait", "unpack"}));
    check_ddp_order(events);
  }
}

// ---- dtrain launch --nproc 2 -- dtrain train --trace ----------------------------------

#if defined(DTRAIN_BIN) && defined(DTRAIN_DATA_CACHE)
TEST(TraceCli, LaunchTwoRanksWritesBothFilesAndPrintsOverlap) {
  const fs::path dir = dtrain::testing::scratch_dir("dtrain_test_trace", "cli");
  const std::string cmd =
      std::string(DTRAIN_BIN) +
      " launch --nproc 2 -- dtrain train --model mlp --epochs 1 "
      "--max-steps 30 --no-progress --data-cache " DTRAIN_DATA_CACHE " --metrics " +
      (dir / "metrics.jsonl").string() + " --trace " + (dir / "trace.json").string();
  dtrain::testing::CommandResult r = dtrain::testing::run_command(cmd);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("ms hidden behind backward ("), std::string::npos) << r.out;
  for (int rank = 0; rank < 2; ++rank) {
    const fs::path file = dir / ("trace.rank" + std::to_string(rank) + ".json");
    ASSERT_TRUE(fs::exists(file)) << file << "\n" << r.out;
    std::ifstream in(file);
    const Json trace = Json::parse(in, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(trace.is_discarded()) << file;
    std::vector<Event> events = complete_events(trace, rank);
    for (const char* kind : {"step", "forward", "backward", "sync gradients", "optimizer", "pack",
                             "allreduce", "wait", "unpack"}) {
      EXPECT_TRUE(names(events).count(kind)) << kind << " missing from " << file;
    }
    check_ddp_order(events);
  }
}

TEST(TraceCli, UnwritablePathFailsBeforeTraining) {
  dtrain::testing::CommandResult r = dtrain::testing::run_command(
      std::string(DTRAIN_BIN) +
      " train --model mlp --epochs 1 --max-steps 5 --no-progress "
      "--data-cache " DTRAIN_DATA_CACHE " --trace /nonexistent-dir/sub/trace.json");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("/nonexistent-dir/sub/trace.rank0.json"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("dtrain train: mlp"), std::string::npos) << "trained anyway:\n" << r.out;
}
#endif

}  // namespace
