// The mpi backend under mpirun: every collective, op, dtype and count, for each
// algorithm (kRing = dtrain's ring over MPI point-to-point, kNative = MPI's own
// collectives, kAuto = the size table), checked element by element against an oracle
// computed locally; send/recv, barrier, async ordering, the runtime, and main(). The
// timeouts, abort and split() are in test_comm_mpi_failures.cc (the same binary), the
// shared helpers and the fixture in comm_mpi_test_util.h.
//
// Ranks are MPI processes (ctest runs this binary at -np 1, 2, 3, 4). Every rank can
// compute every rank's input from (rank, index, salt), so each rank checks its own
// result without trusting any communication. Inputs are chosen so that every sum is
// exact in its dtype (small multiples of 1/2 or 1/4 for floats, no integer overflow), so
// the result does not depend on the reduction order and the check is exact; kAvg is
// then the library's documented scaling (comm::scale_in_place), recomputed here.
//
// Output and failures: only rank 0 keeps GoogleTest's printer; the other ranks print
// only their failures, prefixed "[rank r]". Every test ends with a collective check
// (Fixture::TearDown) that fails the test on every rank when it failed on any, and the
// exit status is agreed by all ranks, so mpirun's status reflects a failure anywhere.
//
// DTRAIN_TEST_MPI_INIT selects who initialises MPI (ctest runs each):
//   unset/"dtrain"  MpiRuntime::init() does (MPI_THREAD_MULTIPLE) and finalises;
//   "serialized"    main() calls MPI_Init_thread(MPI_THREAD_SERIALIZED) first, so the
//                   runtime attaches, serialises its MPI calls, and never finalises;
//   "funneled"      main() initialises with MPI_THREAD_FUNNELED and checks that
//                   MpiRuntime::init() refuses it with UnsupportedError (no tests run).
// DTRAIN_TEST_MPI_ABORT_JOB=1 enables MpiAbortJob, which ends the job with MPI_Abort
// (ctest expects mpirun's "MPI_ABORT was invoked" report).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm_mpi_test_util.h"
#include "dtrain/comm/communicator.h"
#include "dtrain/comm/mpi.h"

namespace dtrain::comm {
namespace {

using namespace mpitest;

TEST_P(MpiComm, IdentityMatchesMpiWorld) {
  EXPECT_EQ(comm().backend(), "mpi");
  EXPECT_EQ(comm().rank(), me());
  EXPECT_EQ(comm().size(), n());
  int r = -1, s = -1;
  {
    auto lock = runtime()->lock_mpi();
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    MPI_Comm_size(MPI_COMM_WORLD, &s);
  }
  EXPECT_EQ(comm().rank(), r);
  EXPECT_EQ(comm().size(), s);
  EXPECT_EQ(comm().timeout(), milliseconds(20'000));
  comm().set_timeout(milliseconds(1234));
  EXPECT_EQ(comm().timeout(), milliseconds(1234));
  EXPECT_THROW(comm().set_timeout(milliseconds(0)), InvalidArgument);
}

TEST_P(MpiComm, AllreduceEveryOpDtypeCount) {
  uint64_t salt = 1;
  for (DType dtype : kDTypes) {
    for (ReduceOp op : kOps) {
      for (size_t count : counts()) {
        ++salt;
        SCOPED_TRACE(label("allreduce", dtype, count) + " " + reduce_op_name(op));
        Buffer data = make_input(dtype, me(), 0, count, salt);
        comm().allreduce(data.data(), count, dtype, op);
        Buffer want(dtype, count);
        for (size_t i = 0; i < count; ++i) oracle_reduce(want, i, i, op, n(), salt);
        EXPECT_TRUE(same_elements(data, want));
      }
    }
  }
}

TEST_P(MpiComm, ReduceScatterEveryOpDtypeCount) {
  uint64_t salt = 1000;
  for (DType dtype : kDTypes) {
    for (ReduceOp op : kOps) {
      // Per-rank counts; the large one keeps the whole send buffer near kLarge.
      for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{37} * n() + 1, kLarge / n()}) {
        ++salt;
        SCOPED_TRACE(label("reduce_scatter", dtype, count) + " " + reduce_op_name(op));
        Buffer send = make_input(dtype, me(), 0, count * n(), salt);
        const Buffer sent = send;
        Buffer recv(dtype, count);
        comm().reduce_scatter(send.data(), recv.data(), count, dtype, op);
        Buffer want(dtype, count);
        for (size_t i = 0; i < count; ++i) oracle_reduce(want, i, me() * count + i, op, n(), salt);
        EXPECT_TRUE(same_elements(recv, want));
        EXPECT_TRUE(same_elements(send, sent)) << "the send buffer must not change";
      }
    }
  }
}

TEST_P(MpiComm, AllgatherEveryDtypeCount) {
  uint64_t salt = 2000;
  for (DType dtype : kDTypes) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{37} * n() + 1, kLarge / n()}) {
      ++salt;
      SCOPED_TRACE(label("allgather", dtype, count));
      Buffer send = make_input(dtype, me(), 0, count, salt);
      Buffer recv(dtype, count * n());
      comm().allgather(send.data(), recv.data(), count, dtype);
      Buffer want(dtype, count * n());
      for (int r = 0; r < n(); ++r) {
        for (size_t i = 0; i < count; ++i) want.set(r * count + i, input_value(dtype, r, i, salt));
      }
      EXPECT_TRUE(same_elements(recv, want));
    }
  }
}

TEST_P(MpiComm, BroadcastEveryDtypeCountAndRoot) {
  uint64_t salt = 3000;
  for (DType dtype : kDTypes) {
    for (size_t count : counts()) {
      for (int root : {0, n() - 1}) {
        ++salt;
        SCOPED_TRACE(label("broadcast", dtype, count) + " root " + std::to_string(root));
        Buffer data = make_input(dtype, me(), 0, count, salt);
        comm().broadcast(data.data(), count, dtype, root);
        EXPECT_TRUE(same_elements(data, make_input(dtype, root, 0, count, salt)));
      }
    }
  }
  EXPECT_THROW(comm().broadcast(nullptr, 0, DType::f32, n()), InvalidArgument);
  EXPECT_THROW(comm().broadcast(nullptr, 0, DType::f32, -1), InvalidArgument);
}

// Even ranks send first, odd ranks receive first: every rank sends to its right
// neighbour and receives from its left one, including messages in rendezvous sizes.
TEST_P(MpiComm, SendRecvAroundTheRing) {
  if (n() < 2) {
    EXPECT_THROW(comm().send(nullptr, 0, DType::f32, 0), InvalidArgument);
    GTEST_SKIP() << "point-to-point needs two ranks";
  }
  const int right = (me() + 1) % n(), left = (me() + n() - 1) % n();
  uint64_t salt = 4000;
  for (DType dtype : kDTypes) {
    for (size_t count : {size_t{0}, size_t{1}, size_t{7}, kLarge}) {
      ++salt;
      SCOPED_TRACE(label("send/recv", dtype, count));
      Buffer out = make_input(dtype, me(), 0, count, salt);
      Buffer in(dtype, count);
      if (me() % 2 == 0) {
        comm().send(out.data(), count, dtype, right);
        comm().recv(in.data(), count, dtype, left);
      } else {
        comm().recv(in.data(), count, dtype, left);
        comm().send(out.data(), count, dtype, right);
      }
      EXPECT_TRUE(same_elements(in, make_input(dtype, left, 0, count, salt)));
    }
  }
  EXPECT_THROW(comm().send(nullptr, 0, DType::f32, me()), InvalidArgument);
  EXPECT_THROW(comm().recv(nullptr, 0, DType::f32, n()), InvalidArgument);
}

// Rank r arrives r * 40 ms late; nobody may leave the barrier before the last one
// arrived. Ranks share one host, so steady_clock (CLOCK_MONOTONIC) is comparable.
TEST_P(MpiComm, BarrierWaitsForTheLastRank) {
  std::this_thread::sleep_for(milliseconds(40 * me()));
  const int64_t entered = Clock::now().time_since_epoch().count();
  comm().barrier();
  const int64_t left = Clock::now().time_since_epoch().count();
  std::vector<int64_t> all(n());
  comm().allgather(&entered, all.data(), 1, DType::i64);
  for (int r = 0; r < n(); ++r) EXPECT_GE(left, all[r]) << "left before rank " << r << " arrived";
}

TEST_P(MpiComm, AsyncOperationsCompleteInIssueOrder) {
  // broadcast(root 0) then allreduce(sum) on one buffer: n * 10 only if run in order.
  int32_t x = 10 + me();
  auto first = comm().broadcast_async(&x, 1, DType::i32, 0);
  auto second = comm().allreduce_async(&x, 1, DType::i32, ReduceOp::kSum);
  second->wait();
  EXPECT_TRUE(first->is_completed());
  first->wait();
  EXPECT_EQ(x, 10 * n());

  // Many in flight, waited in reverse order.
  constexpr int kOpsInFlight = 32;
  std::vector<std::vector<float>> bufs(kOpsInFlight);
  std::vector<std::shared_ptr<Work>> works;
  for (int k = 0; k < kOpsInFlight; ++k) {
    bufs[k].assign(1000 + 97 * k, static_cast<float>(k + me()));
    works.push_back(comm().allreduce_async(bufs[k].data(), bufs[k].size(), DType::f32,
                                           k % 2 ? ReduceOp::kMax : ReduceOp::kSum));
  }
  for (int k = kOpsInFlight - 1; k >= 0; --k) works[k]->wait();
  for (int k = 0; k < kOpsInFlight; ++k) {
    EXPECT_TRUE(works[k]->is_completed());
    const float want =
        k % 2 ? static_cast<float>(k + n() - 1) : static_cast<float>(k * n() + n() * (n() - 1) / 2);
    for (float v : bufs[k]) ASSERT_EQ(v, want) << "op " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(Algorithms, MpiComm,
                         testing::Values(MpiAlgorithm::kRing, MpiAlgorithm::kNative,
                                         MpiAlgorithm::kAuto),
                         AlgoName());

TEST(MpiRuntime, OneRuntimePerProcessMatchingHowMpiWasInitialised) {
  auto again = MpiRuntime::init();
  EXPECT_EQ(again.get(), runtime().get());
  EXPECT_EQ(again->world_size(), world_size());
  int level = 0, finalized = 1;
  MPI_Query_thread(&level);
  MPI_Finalized(&finalized);
  EXPECT_EQ(finalized, 0);
  EXPECT_EQ(again->thread_level(), level);
  if (init_mode() == InitMode::kDtrain) {
    EXPECT_TRUE(again->owns_mpi());
    EXPECT_EQ(level, MPI_THREAD_MULTIPLE);
    EXPECT_FALSE(again->lock_mpi().owns_lock());
  } else {
    EXPECT_FALSE(again->owns_mpi()) << "the application initialised MPI: it finalises it";
    EXPECT_EQ(level, MPI_THREAD_SERIALIZED);
    EXPECT_TRUE(again->lock_mpi().owns_lock());
  }
}

// The convenience form takes the live runtime (it does not initialise MPI twice).
TEST(MpiRuntime, ConvenienceFactoryUsesTheLiveRuntime) {
  auto c = make_mpi_communicator(CommOptions{milliseconds(20'000)}, MpiAlgorithm::kNative);
  EXPECT_EQ(c->size(), world_size());
  EXPECT_EQ(c->rank(), world_rank());
  int64_t v = int64_t{1} << 40;
  c->allreduce(&v, 1, DType::i64, ReduceOp::kSum);
  EXPECT_EQ(v, (int64_t{1} << 40) * world_size());
}

// Non-zero ranks print only their failures, prefixed with the rank.
class FailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

}  // namespace
}  // namespace dtrain::comm

// MPI_THREAD_FUNNELED is refused with an actionable message.
int check_funneled_is_refused() {
  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  int rc = 1;
  if (provided != MPI_THREAD_FUNNELED) {
    std::fprintf(stderr, "FAIL: asked for MPI_THREAD_FUNNELED, got level %d\n", provided);
  } else {
    try {
      dtrain::comm::MpiRuntime::init();
      std::fprintf(stderr, "FAIL: MpiRuntime::init() accepted MPI_THREAD_FUNNELED\n");
    } catch (const dtrain::UnsupportedError& e) {
      const bool actionable =
          std::string(e.what()).find("MPI_THREAD_MULTIPLE") != std::string::npos;
      std::printf("%s: refused: %s\n", actionable ? "PASS" : "FAIL (message)", e.what());
      rc = actionable ? 0 : 1;
    }
  }
  MPI_Finalize();
  return rc;
}

int main(int argc, char** argv) {
  using dtrain::comm::mpitest::InitMode;
  using dtrain::comm::mpitest::runtime;
  testing::InitGoogleTest(&argc, argv);
  const InitMode mode = dtrain::comm::mpitest::init_mode();
  if (mode == InitMode::kFunneled) return check_funneled_is_refused();
  if (mode == InitMode::kSerialized) {
    int provided = 0;
    MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
  }
  runtime() = dtrain::comm::MpiRuntime::init();
  const int rank = runtime()->world_rank();
  testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new dtrain::comm::FailurePrinter(rank));
  }
  const int mine = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any = 0;
  MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any && !mine) std::fprintf(stderr, "a rank other than 0 failed\n");
  runtime().reset();  // the last owner: MPI_Finalize when dtrain initialised MPI
  if (mode == InitMode::kSerialized) MPI_Finalize();
  return any;
}
