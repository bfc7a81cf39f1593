// tcp backend, the single-copy one-host collectives (Algo::kDirect): the setup probe
// turns them on for every rank or for none (DTRAIN_DIRECT=0 on one rank, a failing
// read of one rank's memory), a forced `direct` then runs the ring with the same
// results; every rank ends with the bits of the sequential rank-order float sum; a
// mismatched call fails on every rank. Every collective, dtype, op and count with
// direct forced runs in test_comm_tcp.cc (OneHost/*_direct), the lost peers there too
// (DataPath/*shm_direct).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "comm_tcp_test_util.h"
#include "dtrain/comm/algorithm.h"
#include "dtrain/comm/tcp.h"

namespace dtrain::comm {
namespace {

using namespace tcptest;

// Options of rank r: every collective forced to direct, `tweak` applied.
std::function<TcpOptions(int)> forced_direct(std::function<void(int, TcpOptions&)> tweak = {}) {
  return [tweak](int rank) {
    TcpOptions o = small_chunks();
    o.algos.algo.fill(Algo::kDirect);
    if (tweak) tweak(rank, o);
    return o;
  };
}

// allreduce of `count` elements (the oracle's inputs) on every rank, checked.
void expect_allreduce_right(Communicator& comm, size_t count) {
  const int n = comm.size();
  Buffer buf(DType::f32, count), want(DType::f32, count);
  for (size_t i = 0; i < count; ++i) {
    buf.set(i, input(comm.rank(), i, DType::f32));
    double acc = 0;
    for (int r = 0; r < n; ++r) acc += input(r, i, DType::f32);
    want.set(i, acc);
  }
  comm.allreduce(buf.data(), count, DType::f32, ReduceOp::kSum);
  EXPECT_EQ(compare(buf, want), "") << "rank " << comm.rank();
}

TEST(TcpDirect, ProbeTurnsItOnForOneHost) {
  if (!cma_available()) GTEST_SKIP() << "process_vm_readv is not allowed here";
  TcpOptions o;  // auto picks direct above the slots once its window starts there
  o.algos.direct_min_bytes = o.algos.local_max_bytes + 1;
  o.algos.allreduce_direct_min_bytes = o.algos.local_max_bytes + 1;
  for (int n : {2, 3}) {
    run_ranks(n, TcpOptions{}, milliseconds(10000), [&](Communicator& comm) {
      // Defaults: allreduce from 512 KiB, broadcast never.
      EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, (512 << 10) - 1), Algo::kRing);
      EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, 64 << 20), Algo::kDirect);
      EXPECT_EQ(tcp_algorithm(comm, Collective::kBroadcast, 64 << 20), Algo::kRing);
    });
    run_ranks(n, o, milliseconds(10000), [&](Communicator& comm) {
      const size_t slots = AlgoOptions{}.local_max_bytes;
      EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, slots), Algo::kLocal);
      EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, slots + 1), Algo::kDirect);
      EXPECT_EQ(tcp_algorithm(comm, Collective::kReduceScatter, 64 << 20), Algo::kDirect);
      EXPECT_EQ(tcp_algorithm(comm, Collective::kAllgather, 64 << 20), Algo::kDirect);
      EXPECT_EQ(tcp_algorithm(comm, Collective::kBroadcast, 64 << 20), Algo::kRing);
    });
  }
}

TEST(TcpDirect, OffOnOneRankMeansTheRingEverywhere) {
  auto off_on_1 = forced_direct([](int rank, TcpOptions& o) { o.direct = rank != 1; });
  run_ranks(3, off_on_1, milliseconds(10000), [&](Communicator& comm) {
    EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, 1 << 20), Algo::kRing);
    expect_allreduce_right(comm, 100003);
  });
}

TEST(TcpDirect, AFailingProbeReadMeansTheRingEverywhere) {
  auto fault_on_2 =
      forced_direct([](int rank, TcpOptions& o) { o.direct_probe_fault = rank == 2; });
  run_ranks(3, fault_on_2, milliseconds(10000), [&](Communicator& comm) {
    EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, 1 << 20), Algo::kRing);
    EXPECT_EQ(tcp_algorithm(comm, Collective::kAllgather, 1 << 20), Algo::kRing);
    expect_allreduce_right(comm, 100003);
  });
}

TEST(TcpDirect, EnvironmentTurnsItOff) {
  ::unsetenv("DTRAIN_DIRECT");
  EXPECT_TRUE(TcpOptions::from_env().direct);
  ::setenv("DTRAIN_DIRECT", "yes", 1);
  EXPECT_THROW(TcpOptions::from_env(), InvalidArgument);
  ::setenv("DTRAIN_DIRECT_CHUNK_BYTES", "65536", 1);
  ::setenv("DTRAIN_DIRECT", "0", 1);
  TcpOptions off = TcpOptions::from_env();
  ::unsetenv("DTRAIN_DIRECT");
  ::unsetenv("DTRAIN_DIRECT_CHUNK_BYTES");
  EXPECT_FALSE(off.direct);
  EXPECT_EQ(off.direct_chunk_bytes, 65536u);
  off.algos.algo.fill(Algo::kDirect);
  run_ranks(2, off, milliseconds(10000), [&](Communicator& comm) {
    EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, 1 << 20), Algo::kRing);
    expect_allreduce_right(comm, 1023);
  });
}

// Inputs whose float sum depends on the order of the additions.
std::vector<float> random_floats(int rank, size_t count) {
  std::mt19937 gen(static_cast<uint32_t>(1000 + rank));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(count);
  for (float& x : v) x = dist(gen) * (1.0f + static_cast<float>(rank) * 1000.0f);
  return v;
}

// x0 + x1 + ... + x_{n-1} in float, in rank order.
std::vector<float> rank_order_sum(int n, size_t count) {
  std::vector<float> acc = random_floats(0, count);
  for (int r = 1; r < n; ++r) {
    std::vector<float> x = random_floats(r, count);
    for (size_t i = 0; i < count; ++i) acc[i] += x[i];
  }
  return acc;
}

size_t bits_differ(const std::vector<float>& got, const std::vector<float>& want, size_t from) {
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += std::memcmp(&got[i], &want[from + i], 4) != 0;
  return bad;
}

TEST(TcpDirect, EveryRankHoldsTheBitsOfTheRankOrderSum) {
  if (!cma_available()) GTEST_SKIP() << "process_vm_readv is not allowed here";
  for (int n : {2, 3, 5}) {
    SCOPED_TRACE(fmt::format("{} ranks", n));
    const size_t count = 100003;
    const std::vector<float> want = rank_order_sum(n, count * static_cast<size_t>(n));
    run_ranks(n, forced_direct(), milliseconds(20000), [&](Communicator& comm) {
      const int rank = comm.rank();
      std::vector<float> all = random_floats(rank, count * static_cast<size_t>(n));
      std::vector<float> part(count);
      comm.reduce_scatter(all.data(), part.data(), count, DType::f32, ReduceOp::kSum);
      EXPECT_EQ(bits_differ(part, want, count * static_cast<size_t>(rank)), 0u)
          << "reduce_scatter on rank " << rank;
      comm.allreduce(all.data(), all.size(), DType::f32, ReduceOp::kSum);
      EXPECT_EQ(bits_differ(all, want, 0), 0u) << "allreduce on rank " << rank;
    });
  }
}

TEST(TcpDirect, MismatchedCountsFailOnEveryRank) {
  if (!cma_available()) GTEST_SKIP() << "process_vm_readv is not allowed here";
  run_ranks(2, forced_direct(), milliseconds(5000), [&](Communicator& comm) {
    std::vector<float> a(2000, 1.0f);
    try {
      comm.allreduce(a.data(), comm.rank() == 0 ? 1000 : 2000, DType::f32, ReduceOp::kSum);
      ADD_FAILURE() << "rank " << comm.rank() << ": a mismatched allreduce succeeded";
    } catch (const CommError& e) {
      EXPECT_NE(std::string(e.what()).find("mismatch"), std::string::npos) << e.what();
    }
  });
}

}  // namespace
}  // namespace dtrain::comm
