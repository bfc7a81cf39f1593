// The mpi backend's failures and sub-communicators under mpirun (the second file of
// test_comm_mpi, see test_comm_mpi.cc for how the ranks run and report): a silent peer,
// a collective or a split entered by rank 0 alone, and the guard of MPI's blocking
// collective each give TimeoutError within the timeout; abort() fails pending and later
// operations, and with mpi_abort_on_abort ends the job; split() into a 2x2 grid (4 ranks)
// or color = rank % 2 (other sizes), reversed keys, kNoColor and a split of a split, each
// group against a sequential reference over the members' inputs.
//
// The tests that leave a collective behind on purpose (*TimesOut*, *AbortFails*) run in
// mpirun jobs of their own (tests/CMakeLists.txt): MPI cannot cancel a collective.
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

// Rank 0 waits for a message rank 1 never sends: TimeoutError within the timeout that
// names the peer, and the communicator is unusable afterwards.
TEST_P(MpiComm, RecvFromSilentPeerTimesOut) {
  if (n() < 2) GTEST_SKIP() << "needs a peer";
  auto c = make(milliseconds(300));
  if (me() == 0) {
    int32_t v = 0;
    const auto start = Clock::now();
    try {
      c->recv(&v, 1, DType::i32, 1);
      ADD_FAILURE() << "recv from a silent peer returned";
    } catch (const TimeoutError& e) {
      const auto took = Clock::now() - start;
      EXPECT_GE(took, milliseconds(250));
      EXPECT_LT(took, milliseconds(3000));
      EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
    }
    EXPECT_THROW(c->allreduce(&v, 1, DType::i32, ReduceOp::kSum), CommError);
  }
}

// Only rank 0 enters the collective: it fails with TimeoutError instead of hanging.
TEST_P(MpiComm, CollectiveWithoutPeersTimesOut) {
  if (n() < 2) GTEST_SKIP() << "needs a peer";
  auto c = make(milliseconds(300));
  if (me() == 0) {
    // MPI cannot cancel a collective: the buffer stays owned by MPI (see mpi.h).
    static std::vector<float> buf(1000, 1.0f);
    const auto start = Clock::now();
    EXPECT_THROW(c->allreduce(buf.data(), buf.size(), DType::f32, ReduceOp::kSum), TimeoutError);
    EXPECT_LT(Clock::now() - start, milliseconds(3000));
    EXPECT_THROW(c->allgather_async(buf.data(), buf.data(), 0, DType::f32), CommError);
  }
}

// MPI's blocking collective (the auto table's native window, MPI_THREAD_MULTIPLE) is
// entered only after the guard: when rank 0 alone calls it, the guard times out with
// TimeoutError instead of a hang inside MPI_Allreduce. The first allreduce, on every
// rank, sets up auto's shared-memory slots, so auto's guard is their barrier.
TEST_P(MpiComm, BlockingNativeWithoutPeersTimesOut) {
  if (n() < 2) GTEST_SKIP() << "needs a peer";
  auto c = make(milliseconds(300));
  float one = 1.0f;
  c->allreduce(&one, 1, DType::f32, ReduceOp::kSum);
  EXPECT_EQ(one, static_cast<float>(n()));
  if (me() == 0) {
    static std::vector<float> buf((AlgoOptions{}.native_min_bytes + 1024) / 4, 1.0f);
    const auto start = Clock::now();
    EXPECT_THROW(c->allreduce(buf.data(), buf.size(), DType::f32, ReduceOp::kSum), TimeoutError);
    EXPECT_LT(Clock::now() - start, milliseconds(3000));
    EXPECT_THROW(c->allreduce(&one, 1, DType::f32, ReduceOp::kSum), CommError);
  }
}

// abort() from another thread fails the pending operation promptly (long before the
// 20 s timeout) and every later one, with the reason in the message.
TEST_P(MpiComm, AbortFailsPendingAndLaterOperations) {
  auto c = make(milliseconds(20'000));
  if (n() >= 2 && me() == 0) {
    static std::vector<double> buf(64, 1.0);  // MPI keeps it (native collectives)
    auto pending = c->allreduce_async(buf.data(), buf.size(), DType::f64, ReduceOp::kSum);
    auto queued = c->broadcast_async(buf.data(), buf.size(), DType::f64, 0);
    std::this_thread::sleep_for(milliseconds(50));
    EXPECT_FALSE(pending->is_completed());
    EXPECT_FALSE(queued->is_completed());
    const auto start = Clock::now();
    std::thread aborter([&] { c->abort("test says stop"); });
    aborter.join();
    try {
      pending->wait();
      ADD_FAILURE() << "aborted operation succeeded";
    } catch (const CommError& e) {
      EXPECT_NE(std::string(e.what()).find("test says stop"), std::string::npos) << e.what();
    }
    EXPECT_THROW(queued->wait(), CommError);
    EXPECT_LT(Clock::now() - start, milliseconds(2000));
  } else {
    c->abort("test says stop");
  }
  c->abort("second reason is ignored");
  int32_t v = 1;
  try {
    c->allreduce(&v, 1, DType::i32, ReduceOp::kSum);
    ADD_FAILURE() << "allreduce on an aborted communicator succeeded";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("test says stop"), std::string::npos) << e.what();
  }
  EXPECT_THROW(c->barrier(), CommError);
}

// ---- split: sub-communicators over MPI_Comm_split ----

// The group of world rank `rank` under color(r)/key(r), by the definition (MPI_Comm_split):
// the ranks of its color ordered by (key, rank); a stable sort of the ranks in order.
std::vector<int> reference_group(int n, int rank, int (*color)(int), int (*key)(int)) {
  std::vector<int> members;
  for (int r = 0; r < n; ++r) {
    if (color(r) == color(rank)) members.push_back(r);
  }
  std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return key(a) < key(b); });
  return members;
}

// The sum over `members` of their input element `i`.
double member_sum(DType dtype, const std::vector<int>& members, size_t i, uint64_t salt) {
  double acc = 0;
  for (int p : members) acc += input_value(dtype, p, i, salt);
  return acc;
}

// Every collective and send/recv on `child`, the group `members` (world ranks in
// child-rank order), against a sequential reference over the members' inputs.
void check_group(Communicator& child, const std::vector<int>& members, uint64_t salt) {
  const int n = static_cast<int>(members.size());
  ASSERT_EQ(child.size(), n);
  ASSERT_EQ(members[static_cast<size_t>(child.rank())], world_rank());
  const int cr = child.rank();
  const size_t un = static_cast<size_t>(n);
  for (DType dtype : {DType::f32, DType::i64, DType::bf16, DType::f16}) {
    for (size_t count : {size_t{1}, size_t{7}, size_t{4099}}) {
      salt += 10;
      SCOPED_TRACE(label("split group", dtype, count));
      Buffer data = make_input(dtype, world_rank(), 0, count, salt), want(dtype, count);
      for (size_t i = 0; i < count; ++i) want.set(i, member_sum(dtype, members, i, salt));
      child.allreduce(data.data(), count, dtype, ReduceOp::kSum);
      EXPECT_TRUE(same_elements(data, want)) << "allreduce";

      Buffer mine = make_input(dtype, world_rank(), 0, count, salt + 1);
      Buffer all(dtype, count * un), all_want(dtype, count * un);
      for (size_t r = 0; r < un; ++r) {
        for (size_t i = 0; i < count; ++i) {
          all_want.set(r * count + i, input_value(dtype, members[r], i, salt + 1));
        }
      }
      child.allgather(mine.data(), all.data(), count, dtype);
      EXPECT_TRUE(same_elements(all, all_want)) << "allgather";

      Buffer rs_in = make_input(dtype, world_rank(), 0, count * un, salt + 2);
      Buffer rs_out(dtype, count), rs_want(dtype, count);
      for (size_t i = 0; i < count; ++i) {
        rs_want.set(i, member_sum(dtype, members, static_cast<size_t>(cr) * count + i, salt + 2));
      }
      child.reduce_scatter(rs_in.data(), rs_out.data(), count, dtype, ReduceOp::kSum);
      EXPECT_TRUE(same_elements(rs_out, rs_want)) << "reduce_scatter";

      const int root = n - 1;
      Buffer bc = make_input(dtype, world_rank(), 0, count, salt + 3);
      child.broadcast(bc.data(), count, dtype, root);
      EXPECT_TRUE(same_elements(bc, make_input(dtype, members[root], 0, count, salt + 3)))
          << "broadcast";

      if (n < 2) continue;
      const int next = (cr + 1) % n, prev = (cr + n - 1) % n;
      Buffer out = make_input(dtype, world_rank(), 0, count, salt + 4), in(dtype, count);
      if (cr % 2 == 0) {
        child.send(out.data(), count, dtype, next);
        child.recv(in.data(), count, dtype, prev);
      } else {
        child.recv(in.data(), count, dtype, prev);
        child.send(out.data(), count, dtype, next);
      }
      EXPECT_TRUE(same_elements(in, make_input(dtype, members[prev], 0, count, salt + 4)))
          << "send/recv";
    }
  }
}

int zero_key(int) { return 0; }
int by_row(int r) { return r / 2; }
int by_column(int r) { return r % 2; }
int reversed(int r) { return -r; }

// Splits by each of `colors` (children alive together, as in a mesh), then checks every
// group and the parent.
void check_splits(Communicator& comm, const std::vector<int (*)(int)>& colors) {
  std::vector<std::unique_ptr<Communicator>> children;
  for (auto color : colors) children.push_back(comm.split(color(world_rank()), 0));
  for (size_t k = 0; k < colors.size(); ++k) {
    ASSERT_NE(children[k], nullptr);
    EXPECT_EQ(children[k]->backend(), "mpi");
    EXPECT_EQ(children[k]->timeout(), comm.timeout());
    check_group(*children[k], reference_group(world_size(), world_rank(), colors[k], zero_key),
                100 * (k + 1));
  }
  int32_t v = 1;
  comm.allreduce(&v, 1, DType::i32, ReduceOp::kSum);
  EXPECT_EQ(v, world_size()) << "the parent after splitting";
}

// color = rank % 2: every world size (1 and 3 included).
TEST_P(MpiComm, SplitEvenAndOddRanks) { check_splits(comm(), {by_column}); }

// The 2x2 grid both ways (rows and columns).
TEST_P(MpiComm, SplitTwoByTwoGrid) {
  if (n() != 4) GTEST_SKIP() << "the 2x2 grid needs 4 ranks";
  check_splits(comm(), {by_row, by_column});
}

TEST_P(MpiComm, SplitKeyReversesTheOrder) {
  auto child = comm().split(by_column(me()), reversed(me()));
  ASSERT_NE(child, nullptr);
  const std::vector<int> members = reference_group(n(), me(), by_column, reversed);
  EXPECT_EQ(child->rank(),
            static_cast<int>(std::find(members.begin(), members.end(), me()) - members.begin()));
  check_group(*child, members, 700);
}

// Rank 0 opts out (nullptr); the others form one group. A bad color is refused locally.
TEST_P(MpiComm, SplitNoColorAndSplitOfASplit) {
  EXPECT_THROW(comm().split(-5, 0), InvalidArgument);
  auto child = comm().split(me() == 0 ? Communicator::kNoColor : 3, 0);
  if (me() == 0) {
    EXPECT_EQ(child, nullptr);
  } else {
    ASSERT_NE(child, nullptr);
    std::vector<int> members;
    for (int r = 1; r < n(); ++r) members.push_back(r);
    check_group(*child, members, 900);
    // Split again: the child's even and odd ranks.
    auto grandchild = child->split(child->rank() % 2, 0);
    ASSERT_NE(grandchild, nullptr);
    std::vector<int> sub;
    for (int r = 1; r < n(); ++r) {
      if ((r - 1) % 2 == (me() - 1) % 2) sub.push_back(r);
    }
    check_group(*grandchild, sub, 1100);
  }
}

// Only rank 0 enters the split: it fails with TimeoutError (the all-gather before
// MPI_Comm_split is bounded) instead of hanging in MPI_Comm_split.
TEST_P(MpiComm, SplitWithoutPeersTimesOut) {
  if (n() < 2) GTEST_SKIP() << "needs a peer";
  auto c = make(milliseconds(300));
  if (me() == 0) {
    const auto start = Clock::now();
    EXPECT_THROW(c->split(0, 0), TimeoutError);
    EXPECT_LT(Clock::now() - start, milliseconds(3000));
  }
}

// Runs only with DTRAIN_TEST_MPI_ABORT_JOB=1: abort() with mpi_abort_on_abort ends every
// process of the job (ctest checks mpirun's report).
// Runs only in the comm_mpi_abort_job_np2 entry (the other entries filter it out):
// mpirun must end with the abort's exit code, 77, which no other outcome produces.
TEST(MpiAbortJob, AbortWithMpiAbortOnAbortEndsTheJob) {
  MpiOptions mpi;
  mpi.mpi_abort_on_abort = true;
  mpi.mpi_abort_exit_code = 77;
  auto c = make_mpi_communicator(runtime(), CommOptions{milliseconds(20'000)}, mpi);
  if (world_rank() == 0) c->abort("the test ends the job");
  c->barrier();  // the other ranks wait here until MPI_Abort takes them down
  ADD_FAILURE() << "still running after MPI_Abort";
}

}  // namespace
}  // namespace dtrain::comm
