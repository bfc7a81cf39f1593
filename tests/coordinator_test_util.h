// Shared helpers of the coordinator tests (test_coordinator.cc,
// test_coordinator_recovery.cc): in-process servers on ephemeral ports, clients with
// deadlines, status summaries, raw stub calls and concurrent joins.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
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

namespace dtrain::coordinator::testing {

using namespace std::chrono_literals;
namespace v1 = ::dtrain::v1;

inline constexpr const char* kJob = "job-a";

inline ServerOptions server_options(int world_size, std::string token = "") {
  ServerOptions o;
  o.job_id = kJob;
  o.world_size = world_size;
  o.token = std::move(token);
  o.heartbeat_timeout = 0ms;
  return o;
}

inline CoordinatorClient connect(const CoordinatorServer& s, std::string job_id = kJob,
                                 std::string token = "") {
  ClientOptions o;
  o.address = s.address();
  o.job_id = std::move(job_id);
  o.token = std::move(token);
  o.connect_timeout = 5s;
  o.call_timeout = 5s;
  return CoordinatorClient::connect(std::move(o));
}

inline JoinOptions worker(int i, std::chrono::milliseconds timeout = 10s) {
  JoinOptions j;
  j.host = "host" + std::to_string(i % 2);
  j.address = "10.0.0." + std::to_string(i) + ":4000";
  j.pid = 1000 + i;
  j.timeout = timeout;
  return j;
}

// Everything in a status but the clocks, to compare before and after a refused call.
inline std::string summary(const JobStatus& s) {
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

inline bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 5s) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

inline bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// Runs f, expects it to throw E, returns the message.
template <class E, class F>
inline std::string thrown(F&& f) {
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
inline std::unique_ptr<v1::Coordinator::Stub> raw_stub(const CoordinatorServer& s) {
  return v1::Coordinator::NewStub(
      grpc::CreateChannel(s.address(), grpc::InsecureChannelCredentials()));
}

inline void prepare(grpc::ClientContext& ctx, const char* token) {
  ctx.set_deadline(std::chrono::system_clock::now() + 5s);
  if (token != nullptr) ctx.AddMetadata("x-dtrain-token", token);
}

inline grpc::Status raw_join(v1::Coordinator::Stub& stub, const std::string& job_id,
                             const char* token, uint64_t timeout_ms = 200) {
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
inline std::vector<JoinResult> join_all(const CoordinatorServer& s, int n) {
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

}  // namespace dtrain::coordinator::testing
