// The mpi backend under mpirun: every collective, op, dtype and count, for both
// algorithms (kRing = dtrain's ring over MPI point-to-point, kNative = MPI's own
// collectives), checked element by element against an oracle computed locally; and
// split() into a 2x2 grid (4 ranks) or color = rank % 2 (other sizes), reversed keys,
// kNoColor and a split of a split, each group against a sequential reference.
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

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/comm/mpi.h"

namespace dtrain::comm {

// GoogleTest names the parameter in failure lines (found by ADL, so not in namespace {}).
void PrintTo(MpiAlgorithm algo, std::ostream* os) { *os << mpi_algorithm_name(algo); }

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr DType kDTypes[] = {DType::f32, DType::f64, DType::i32, DType::i64,
                             DType::u8,  DType::f16, DType::bf16};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};
constexpr size_t kLarge = 1'000'003;  // odd, and not divisible by 2, 3 or 4

// The process's runtime, set by main() before RUN_ALL_TESTS.
std::shared_ptr<MpiRuntime>& runtime() {
  static std::shared_ptr<MpiRuntime> r;
  return r;
}

enum class InitMode { kDtrain, kSerialized, kFunneled };

InitMode init_mode() {
  const char* v = std::getenv("DTRAIN_TEST_MPI_INIT");
  const std::string mode = v ? v : "dtrain";
  if (mode == "serialized") return InitMode::kSerialized;
  if (mode == "funneled") return InitMode::kFunneled;
  return InitMode::kDtrain;
}

int world_rank() { return runtime()->world_rank(); }
int world_size() { return runtime()->world_size(); }

// ---- deterministic inputs and typed element access ----

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Rank `rank`'s input element `i` for a test `salt`, as a double that the dtype holds
// exactly; any sum of up to 4 of them is exact in the dtype too.
double input_value(DType dtype, int rank, size_t i, uint64_t salt) {
  const uint64_t h = splitmix64((static_cast<uint64_t>(rank) << 48) ^ (salt << 40) ^ i);
  auto centered = [&](uint64_t range) {  // uniform integer in [-(range/2), range/2]
    // Powers of two by mask, others by multiply-shift (no division: this runs ~1e8 times).
    const uint64_t u = (range & (range - 1)) == 0 ? h & (range - 1) : ((h >> 32) * range) >> 32;
    return static_cast<double>(static_cast<int64_t>(u) - static_cast<int64_t>(range / 2));
  };
  switch (dtype) {
    case DType::f32:
      return centered(2001) * 0.25;
    case DType::f64:
      return centered(20001) * 0.125;
    case DType::f16:
      return centered(61) * 0.25;
    case DType::bf16:
      return centered(31) * 0.5;
    case DType::i32:
      return centered(uint64_t{1} << 29);
    case DType::i64:
      return centered(uint64_t{1} << 50);
    case DType::u8:
      return static_cast<double>(h & 63);
  }
  return 0;
}

double read(DType dtype, const void* base, size_t i) {
  switch (dtype) {
    case DType::f32:
      return static_cast<const float*>(base)[i];
    case DType::f64:
      return static_cast<const double*>(base)[i];
    case DType::f16:
      return static_cast<float>(static_cast<const Half*>(base)[i]);
    case DType::bf16:
      return static_cast<float>(static_cast<const BFloat16*>(base)[i]);
    case DType::i32:
      return static_cast<const int32_t*>(base)[i];
    case DType::i64:
      return static_cast<double>(static_cast<const int64_t*>(base)[i]);
    case DType::u8:
      return static_cast<const uint8_t*>(base)[i];
  }
  return 0;
}

void write(DType dtype, void* base, size_t i, double v) {
  switch (dtype) {
    case DType::f32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      return;
    case DType::f64:
      static_cast<double*>(base)[i] = v;
      return;
    case DType::f16:
      static_cast<Half*>(base)[i] = Half(static_cast<float>(v));
      return;
    case DType::bf16:
      static_cast<BFloat16*>(base)[i] = BFloat16(static_cast<float>(v));
      return;
    case DType::i32:
      static_cast<int32_t*>(base)[i] = static_cast<int32_t>(static_cast<int64_t>(v));
      return;
    case DType::i64:
      static_cast<int64_t*>(base)[i] = static_cast<int64_t>(v);
      return;
    case DType::u8:
      static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(static_cast<int64_t>(v));
      return;
  }
}

// A typed buffer of `count` elements.
struct Buffer {
  DType dtype;
  size_t count;
  std::vector<std::byte> bytes;
  Buffer(DType t, size_t n) : dtype(t), count(n), bytes(n * dtype_size(t) + 1) {}
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  double get(size_t i) const { return read(dtype, data(), i); }
  void set(size_t i, double v) { write(dtype, data(), i, v); }
};

// Buffer holding `rank`'s input elements [first, first + count).
Buffer make_input(DType dtype, int rank, size_t first, size_t count, uint64_t salt) {
  Buffer b(dtype, count);
  for (size_t i = 0; i < count; ++i) b.set(i, input_value(dtype, rank, first + i, salt));
  return b;
}

// kAvg's final scaling exactly as comm::scale_in_place documents it: floats multiply
// by 1/n rounded to their compute type (float for f32/f16/bf16), integers round to
// nearest.
double scale_like_library(DType dtype, double v, int n) {
  const double factor = 1.0 / n;
  switch (dtype) {
    case DType::f64:
      return v * factor;
    case DType::f32:
    case DType::f16:
    case DType::bf16:
      return static_cast<double>(static_cast<float>(v) * static_cast<float>(factor));
    case DType::i32:
    case DType::i64:
    case DType::u8:
      return static_cast<double>(std::llround(v * factor));
  }
  return v;
}

// The reduction over every rank of input element `i`, as stored in the dtype.
void oracle_reduce(Buffer& out, size_t out_i, size_t in_i, ReduceOp op, int n, uint64_t salt) {
  double acc = input_value(out.dtype, 0, in_i, salt);
  for (int r = 1; r < n; ++r) {
    const double v = input_value(out.dtype, r, in_i, salt);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg:
        acc += v;
        break;
      case ReduceOp::kMax:
        acc = std::max(acc, v);
        break;
      case ReduceOp::kMin:
        acc = std::min(acc, v);
        break;
    }
  }
  out.set(out_i, acc);
  if (op == ReduceOp::kAvg) out.set(out_i, scale_like_library(out.dtype, out.get(out_i), n));
}

// Element-by-element comparison; reports the first few mismatches.
testing::AssertionResult same_elements(const Buffer& got, const Buffer& want) {
  size_t wrong = 0;
  std::string detail;
  for (size_t i = 0; i < want.count; ++i) {
    const double g = got.get(i), w = want.get(i);
    if (g == w) continue;
    if (++wrong <= 5)
      detail += " [" + std::to_string(i) + "] got " + std::to_string(g) + " want " +
                std::to_string(w) + ";";
  }
  if (wrong == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure()
         << wrong << " of " << want.count << " elements wrong:" << detail;
}

std::string label(const char* what, DType dtype, size_t count) {
  return std::string(what) + " " + dtype_name(dtype) + " count " + std::to_string(count);
}

// ---- the fixture: one fresh communicator per test, a collective verdict at the end ----

struct AlgoName {
  std::string operator()(const testing::TestParamInfo<MpiAlgorithm>& info) const {
    return mpi_algorithm_name(info.param);
  }
};

class MpiComm : public testing::TestWithParam<MpiAlgorithm> {
 protected:
  void SetUp() override { comm_ = make(milliseconds(20'000)); }

  void TearDown() override {
    comm_.reset();
    // Every rank learns whether the test failed anywhere (bounded: never hangs).
    int mine = HasFailure() ? 1 : 0, any = 0;
    MPI_Request req;
    {
      auto lock = runtime()->lock_mpi();
      MPI_Iallreduce(&mine, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD, &req);
    }
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    for (int done = 0; !done;) {
      {
        auto lock = runtime()->lock_mpi();  // the test's own MPI calls, too, under SERIALIZED
        MPI_Test(&req, &done, MPI_STATUS_IGNORE);
      }
      if (!done && Clock::now() > deadline) {
        std::fprintf(stderr, "[rank %d] ranks diverged: the end-of-test check timed out\n",
                     world_rank());
        runtime()->abort_job(3);
      }
      if (!done) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    if (any && !mine) ADD_FAILURE() << "this test failed on another rank (see its [rank r] lines)";
  }

  std::unique_ptr<Communicator> make(milliseconds timeout) const {
    MpiOptions mpi;
    mpi.algorithm = GetParam();
    return make_mpi_communicator(runtime(), CommOptions{timeout}, mpi);
  }

  Communicator& comm() { return *comm_; }
  int n() const { return world_size(); }
  int me() const { return world_rank(); }
  std::vector<size_t> counts() const {
    // 65537: inside auto's native window (512 KiB - 1 MiB) for the 8-byte types.
    return {0, 1, 7, 1023, static_cast<size_t>(37 * n() + 1), 65537, kLarge};
  }

  std::unique_ptr<Communicator> comm_;
};

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
  using dtrain::comm::InitMode;
  using dtrain::comm::runtime;
  testing::InitGoogleTest(&argc, argv);
  const InitMode mode = dtrain::comm::init_mode();
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
