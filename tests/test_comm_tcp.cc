// tcp backend: every collective at world sizes 1-4, every dtype and awkward counts,
// checked element by element against a sequential oracle computed here, over each
// data path (same-host shared memory, plain TCP with the fast path off, and a mix);
// each algorithm forced (local, direct, ring on one host; rd, ring across hosts);
// async ordering; argument checks; timeouts; lost peers (an aborted rank, a
// destroyed rank, a SIGKILLed child process) over TCP, the shared-memory ring and
// the direct reads; stray connections; no shared-memory names left in /dev/shm; the
// reduction arithmetic; FileStore (split(): test_comm_tcp_split.cc; the direct
// probe, its fallback and its bits: test_comm_tcp_direct.cc). Ranks are threads
// sharing a MemoryStore unless stated otherwise.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm_tcp_test_util.h"
#include "dtrain/comm/communicator.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "shm/segment.h"

namespace dtrain::comm {
namespace {

using namespace tcptest;

// World size, data path, and the algorithm every collective is forced to (auto: by
// size; a forced one-host algorithm gets slots large enough for most counts).
class TcpWorld : public ::testing::TestWithParam<std::tuple<int, Path, Algo>> {
 protected:
  int world() const { return std::get<0>(GetParam()); }
  Path path() const { return std::get<1>(GetParam()); }
  Algo algo() const { return std::get<2>(GetParam()); }
  std::function<TcpOptions(int)> on_path(TcpOptions base) const {
    const Path p = path();
    const Algo a = algo();
    return [=](int rank) {
      TcpOptions o = base;
      o.shm = p == Path::kShm || (p == Path::kMixed && rank % 2 == 0);
      o.algos.algo.fill(a);
      if (a == Algo::kLocal) o.algos.local_max_bytes = 4 << 20;
      return o;
    };
  }
  // Segments each rank maps: its own and each same-host peer's, for every rank
  // that has a same-host peer on the fast path.
  int expected_mappings() const {
    const int n = world();
    const int on = path() == Path::kShm ? n : path() == Path::kTcp ? 0 : (n + 1) / 2;
    return on >= 2 ? on * on : 0;
  }
};

TEST_P(TcpWorld, AllreduceEveryOpDtypeAndCount) {
  const int n = world();
  run_ranks(n, on_path(small_chunks()), milliseconds(20000), [&](Communicator& comm) {
    EXPECT_EQ(comm.size(), n);
    EXPECT_EQ(comm.backend(), "tcp");
    const int rank = comm.rank();
    // Every communicator exists between the two barriers: the path is the one asked for.
    comm.barrier();
    EXPECT_EQ(shm_mappings(), expected_mappings()) << "rank " << rank;
    comm.barrier();
    for (DType t : kDTypes) {
      for (size_t count : counts_for(n)) {
        for (ReduceOp op : kOps) {
          Buffer buf(t, count), want(t, count);
          for (size_t i = 0; i < count; ++i) {
            buf.set(i, input(rank, i, t));
            double acc = input(0, i, t);
            for (int r = 1; r < n; ++r) {
              double x = input(r, i, t);
              acc = op == ReduceOp::kMax   ? std::max(acc, x)
                    : op == ReduceOp::kMin ? std::min(acc, x)
                                           : acc + x;
            }
            if (op == ReduceOp::kAvg) {
              want.set_avg(i, acc, n);
            } else {
              want.set(i, acc);
            }
          }
          comm.allreduce(buf.data(), count, t, op);
          EXPECT_EQ(compare(buf, want), "") << what("allreduce", t, count, reduce_op_name(op));
        }
      }
    }
  });
}

TEST_P(TcpWorld, BroadcastFromEveryRoot) {
  const int n = world();
  run_ranks(n, on_path(small_chunks()), milliseconds(20000), [&](Communicator& comm) {
    for (DType t : kDTypes) {
      for (size_t count : counts_for(n)) {
        for (int root = 0; root < n; ++root) {
          Buffer buf(t, count), want(t, count);
          for (size_t i = 0; i < count; ++i) {
            buf.set(i, input(comm.rank(), i, t, root));
            want.set(i, input(root, i, t, root));
          }
          comm.broadcast(buf.data(), count, t, root);
          std::string extra = fmt::format("root {}", root);
          EXPECT_EQ(compare(buf, want), "") << what("broadcast", t, count, extra.c_str());
        }
      }
    }
  });
}

TEST_P(TcpWorld, AllgatherEveryDtypeAndCount) {
  const int n = world();
  run_ranks(n, on_path(small_chunks()), milliseconds(20000), [&](Communicator& comm) {
    for (DType t : kDTypes) {
      for (size_t count : counts_for(n)) {
        Buffer mine(t, count), all(t, count * n), want(t, count * n);
        for (size_t i = 0; i < count; ++i) mine.set(i, input(comm.rank(), i, t));
        for (int r = 0; r < n; ++r) {
          for (size_t i = 0; i < count; ++i) want.set(r * count + i, input(r, i, t));
        }
        comm.allgather(mine.data(), all.data(), count, t);
        EXPECT_EQ(compare(all, want), "") << what("allgather", t, count);
      }
    }
  });
}

TEST_P(TcpWorld, ReduceScatterEveryOpDtypeAndCount) {
  const int n = world();
  run_ranks(n, on_path(small_chunks()), milliseconds(20000), [&](Communicator& comm) {
    const int rank = comm.rank();
    for (DType t : kDTypes) {
      for (size_t count : counts_for(n)) {
        for (ReduceOp op : kOps) {
          Buffer send(t, count * n), recv(t, count), want(t, count);
          for (size_t i = 0; i < count * n; ++i) send.set(i, input(rank, i, t));
          for (size_t i = 0; i < count; ++i) {
            size_t g = rank * count + i;  // this rank's block of the full vector
            double acc = input(0, g, t);
            for (int r = 1; r < n; ++r) {
              double x = input(r, g, t);
              acc = op == ReduceOp::kMax   ? std::max(acc, x)
                    : op == ReduceOp::kMin ? std::min(acc, x)
                                           : acc + x;
            }
            if (op == ReduceOp::kAvg) {
              want.set_avg(i, acc, n);
            } else {
              want.set(i, acc);
            }
          }
          Buffer before = send;
          comm.reduce_scatter(send.data(), recv.data(), count, t, op);
          EXPECT_EQ(compare(recv, want), "")
              << what("reduce_scatter", t, count, reduce_op_name(op));
          EXPECT_EQ(compare(send, before), "") << "reduce_scatter modified its send buffer";
        }
      }
    }
  });
}

TEST_P(TcpWorld, SendRecvBetweenEveryPair) {
  const int n = world();
  run_ranks(n, on_path(small_chunks()), milliseconds(20000), [&](Communicator& comm) {
    const int rank = comm.rank();
    // Every ordered pair in one global order, so a blocking send always meets its recv.
    for (DType t : {DType::f32, DType::f16, DType::i64}) {
      for (size_t count : counts_for(n)) {
        for (int from = 0; from < n; ++from) {
          for (int to = 0; to < n; ++to) {
            if (from == to) continue;
            int salt = from * 4 + to;
            if (rank == from) {
              Buffer msg(t, count);
              for (size_t i = 0; i < count; ++i) msg.set(i, input(from, i, t, salt));
              comm.send(msg.data(), count, t, to);
            } else if (rank == to) {
              Buffer got(t, count), want(t, count);
              for (size_t i = 0; i < count; ++i) want.set(i, input(from, i, t, salt));
              comm.recv(got.data(), count, t, from);
              std::string extra = fmt::format("{} -> {}", from, to);
              EXPECT_EQ(compare(got, want), "") << what("send/recv", t, count, extra.c_str());
            }
          }
        }
      }
    }
  });
}

TEST_P(TcpWorld, BarrierWaitsForEveryRank) {
  const int n = world();
  std::atomic<int> entered{0};
  run_ranks(n, on_path(TcpOptions{}), milliseconds(10000), [&](Communicator& comm) {
    for (int round = 0; round < 3; ++round) {
      std::this_thread::sleep_for(milliseconds(10 * comm.rank()));
      entered.fetch_add(1);
      comm.barrier();
      EXPECT_GE(entered.load(), n * (round + 1)) << "rank " << comm.rank() << " left early";
      comm.barrier();  // nobody enters the next round before everyone checked
    }
  });
}

TEST_P(TcpWorld, AsyncOperationsCompleteInIssueOrder) {
  const int n = world();
  run_ranks(n, on_path(small_chunks()), milliseconds(20000), [&](Communicator& comm) {
    const int rank = comm.rank();
    const size_t count = 50001;
    std::vector<float> a(count, static_cast<float>(rank + 1));
    std::vector<int32_t> mine(3, rank), all(3 * n, -1);
    // a is reduced, then overwritten by root's copy, then reduced again: the result
    // is only right if the three run in issue order.
    auto w1 = comm.allreduce_async(a.data(), count, DType::f32, ReduceOp::kSum);
    auto w2 = comm.allgather_async(mine.data(), all.data(), 3, DType::i32);
    auto w3 = comm.broadcast_async(a.data(), count, DType::f32, n - 1);
    auto w4 = comm.allreduce_async(a.data(), count, DType::f32, ReduceOp::kMax);
    w4->wait();
    EXPECT_TRUE(w1->is_completed());
    EXPECT_TRUE(w2->is_completed());
    EXPECT_TRUE(w3->is_completed());
    w1->wait();  // waiting again on completed work is fine
    w3->wait();
    w2->wait();
    const float want = n * (n + 1) / 2.0f;
    size_t bad = 0;
    for (float v : a) bad += v != want;
    EXPECT_EQ(bad, 0u);
    for (int r = 0; r < n; ++r) {
      for (int i = 0; i < 3; ++i) EXPECT_EQ(all[r * 3 + i], r);
    }
  });
}

TEST_P(TcpWorld, RejectsBadArgumentsWithoutFailing) {
  const int n = world();
  run_ranks(n, on_path(TcpOptions{}), milliseconds(10000), [&](Communicator& comm) {
    float x = 1;
    EXPECT_THROW(comm.broadcast(&x, 1, DType::f32, n), InvalidArgument);
    EXPECT_THROW(comm.broadcast(&x, 1, DType::f32, -1), InvalidArgument);
    EXPECT_THROW(comm.send(&x, 1, DType::f32, comm.rank()), InvalidArgument);
    EXPECT_THROW(comm.recv(&x, 1, DType::f32, n), InvalidArgument);
    EXPECT_THROW(comm.allreduce(nullptr, 3, DType::f32, ReduceOp::kSum), InvalidArgument);
    EXPECT_THROW(comm.set_timeout(milliseconds(0)), InvalidArgument);
    EXPECT_THROW(comm.allreduce(&x, 1, static_cast<DType>(99), ReduceOp::kSum), DTypeError);
    comm.allreduce(&x, 1, DType::f32, ReduceOp::kSum);  // still usable
    EXPECT_EQ(x, static_cast<float>(n));
  });
}

std::string world_name(const ::testing::TestParamInfo<std::tuple<int, Path, Algo>>& info) {
  const Algo a = std::get<2>(info.param);
  return "size" + std::to_string(std::get<0>(info.param)) + "_" +
         path_name(std::get<1>(info.param)) +
         (a == Algo::kAuto ? std::string() : std::string("_") + algo_name(a));
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, TcpWorld,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(Path::kShm, Path::kTcp, Path::kMixed),
                                            ::testing::Values(Algo::kAuto)),
                         world_name);
// Each algorithm forced, at world sizes that are and are not powers of two.
INSTANTIATE_TEST_SUITE_P(
    OneHost, TcpWorld,
    ::testing::Combine(::testing::Values(2, 3, 5), ::testing::Values(Path::kShm),
                       ::testing::Values(Algo::kLocal, Algo::kDirect, Algo::kRing)),
    world_name);
INSTANTIATE_TEST_SUITE_P(
    AcrossHosts, TcpWorld,
    ::testing::Combine(::testing::Values(2, 3, 5, 6), ::testing::Values(Path::kTcp),
                       ::testing::Values(Algo::kRecursiveDoubling, Algo::kRing)),
    world_name);

TEST(Algorithm, ChosenBySizeAndOverridable) {
  AlgoOptions o;
  AlgoCapabilities one_host{true, false, o.local_max_bytes}, hosts{}, mpi{false, true, 0};
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, 8, one_host), Algo::kLocal);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.local_max_bytes, one_host), Algo::kLocal);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.local_max_bytes + 1, one_host), Algo::kRing);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, 8, hosts), Algo::kRecursiveDoubling);
  EXPECT_EQ(algorithm_for(o, Collective::kAllgather, 8, hosts), Algo::kRing);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.small_max_bytes + 1, hosts), Algo::kRing);
  EXPECT_EQ(algorithm_for(o, Collective::kBroadcast, 8, mpi), Algo::kNative);
  // The mpi backend's window for MPI's own collectives, ahead of the slots and the ring.
  AlgoCapabilities mpi_node{true, true, o.local_max_bytes};
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, 8, mpi_node), Algo::kLocal);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.local_max_bytes, mpi_node), Algo::kLocal);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.native_min_bytes - 1, mpi_node),
            Algo::kRing);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.native_min_bytes, mpi_node), Algo::kNative);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.native_max_bytes, mpi), Algo::kNative);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.native_max_bytes + 1, mpi), Algo::kRing);
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, o.native_min_bytes, hosts), Algo::kRing);
  EXPECT_EQ(algorithm_for(o, Collective::kAllgather, o.allgather_native_min_bytes, mpi_node),
            Algo::kNative);
  EXPECT_EQ(algorithm_for(o, Collective::kAllgather, o.allgather_native_min_bytes - 1, mpi_node),
            Algo::kLocal);
  EXPECT_EQ(algorithm_for(o, Collective::kReduceScatter, o.native_min_bytes, mpi_node),
            Algo::kRing);
  EXPECT_EQ(algorithm_for(o, Collective::kBroadcast, o.local_max_bytes, mpi_node), Algo::kLocal);
  o[Collective::kAllreduce] = Algo::kRing;
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, 8, one_host), Algo::kRing);
  o[Collective::kAllreduce] = Algo::kLocal;  // cannot run across hosts: the ring does
  EXPECT_EQ(algorithm_for(o, Collective::kAllreduce, 8, hosts), Algo::kRing);
  EXPECT_EQ(parse_algo("rd", "x"), Algo::kRecursiveDoubling);
  EXPECT_EQ(parse_algo("direct", "x"), Algo::kDirect);
  // Single-copy reads of the peers' memory take over above the slots, on one host only.
  AlgoOptions d;
  AlgoCapabilities cma{true, false, d.local_max_bytes, true};
  // Defaults: allreduce, allgather, reduce_scatter from 512 KiB; no broadcast, one host.
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, (512 << 10) - 1, cma), Algo::kRing);
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, 512 << 10, cma), Algo::kDirect);
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, 64 << 20, cma), Algo::kDirect);
  EXPECT_EQ(algorithm_for(d, Collective::kAllgather, (512 << 10) - 1, cma), Algo::kRing);
  EXPECT_EQ(algorithm_for(d, Collective::kAllgather, 512 << 10, cma), Algo::kDirect);
  EXPECT_EQ(algorithm_for(d, Collective::kAllgather, 64 << 20, cma), Algo::kDirect);
  EXPECT_EQ(algorithm_for(d, Collective::kReduceScatter, 64 << 20, cma), Algo::kDirect);
  EXPECT_EQ(algorithm_for(d, Collective::kBroadcast, 64 << 20, cma), Algo::kRing);
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, 4 << 20, hosts), Algo::kRing);
  d.allreduce_direct_min_bytes = d.local_max_bytes + 1;
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, d.local_max_bytes, cma), Algo::kLocal);
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, d.local_max_bytes + 1, cma), Algo::kDirect);
  d.allreduce_direct_max_bytes = 32 << 20;  // DTRAIN_ALLREDUCE_DIRECT_MAX_BYTES
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, 32 << 20, cma), Algo::kDirect);
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, (32 << 20) + 1, cma), Algo::kRing);
  d[Collective::kAllreduce] = Algo::kDirect;
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, 8, cma), Algo::kDirect);
  EXPECT_EQ(algorithm_for(d, Collective::kAllreduce, 8, hosts), Algo::kRing);
  try {
    parse_algo("tree", "DTRAIN_ALLREDUCE_ALGO");
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("DTRAIN_ALLREDUCE_ALGO 'tree'"), std::string::npos)
        << e.what();
  }
}

// shm::stream_copy (the ring's cold receives) against memcpy: every destination
// alignment within a cache line, lengths around the 64-byte body, bytes around the
// destination untouched.
TEST(ShmStreamCopy, EqualsMemcpyAtEveryAlignmentAndLength) {
  std::vector<std::byte> src(4096 + 128), dst(4096 + 256), want;
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>(i * 131 + 7);
  for (size_t align = 0; align < 64; ++align) {
    for (size_t n : {size_t{0}, size_t{1}, size_t{63}, size_t{64}, size_t{65}, size_t{127},
                     size_t{1000}, size_t{4096}}) {
      std::fill(dst.begin(), dst.end(), std::byte{0xAB});
      want = dst;
      std::byte* base = dst.data() + (64 - reinterpret_cast<uintptr_t>(dst.data()) % 64) % 64;
      const size_t at = static_cast<size_t>(base - dst.data()) + align;
      std::memcpy(want.data() + at, src.data() + 3, n);
      dtrain::comm::shm::stream_copy(dst.data() + at, src.data() + 3, n);
      ASSERT_EQ(dst, want) << "alignment " << align << ", " << n << " bytes";
    }
  }
}

TEST(TcpComm, LargeCountsWithDefaultChunks) {
  for (int n : {2, 3}) {
    for (bool shm : {true, false}) {
      SCOPED_TRACE(shm ? "shared memory" : "plain tcp");
      TcpOptions topts;
      topts.shm = shm;
      run_ranks(n, topts, milliseconds(20000), [&](Communicator& comm) {
        const size_t count = 1000003;
        const int rank = comm.rank();
        std::vector<float> a(count);
        for (size_t i = 0; i < count; ++i) a[i] = static_cast<float>(input(rank, i, DType::f32));
        comm.allreduce(a.data(), count, DType::f32, ReduceOp::kSum);
        size_t bad = 0;
        for (size_t i = 0; i < count; ++i) {
          double s = 0;
          for (int r = 0; r < n; ++r) s += input(r, i, DType::f32);
          bad += a[i] != static_cast<float>(s);
        }
        EXPECT_EQ(bad, 0u) << "allreduce of " << count << " floats on " << n << " ranks";

        std::vector<double> all(count * n);
        std::vector<double> mine(count, rank + 0.5);
        comm.allgather(mine.data(), all.data(), count, DType::f64);
        bad = 0;
        for (size_t i = 0; i < all.size(); ++i)
          bad += all[i] != static_cast<double>(i / count) + 0.5;
        EXPECT_EQ(bad, 0u) << "allgather";

        std::vector<double> part(count);
        comm.reduce_scatter(all.data(), part.data(), count, DType::f64, ReduceOp::kSum);
        bad = 0;
        for (double v : part) bad += v != n * (rank + 0.5);
        EXPECT_EQ(bad, 0u) << "reduce_scatter";
      });
    }
  }
}

TEST(TcpComm, SharedMemoryCanBeTurnedOffFromTheEnvironment) {
  ::unsetenv("DTRAIN_SHM");
  EXPECT_TRUE(TcpOptions::from_env().shm);
  ::setenv("DTRAIN_SHM", "0", 1);
  EXPECT_FALSE(TcpOptions::from_env().shm);
  ::setenv("DTRAIN_SHM", "1", 1);
  EXPECT_TRUE(TcpOptions::from_env().shm);
  ::setenv("DTRAIN_SHM", "yes", 1);
  EXPECT_THROW(TcpOptions::from_env(), InvalidArgument);
  ::unsetenv("DTRAIN_SHM");
  ::setenv("DTRAIN_SHM_RING_BYTES", "65536", 1);
  EXPECT_EQ(TcpOptions::from_env().shm_ring_bytes, 65536u);
  ::unsetenv("DTRAIN_SHM_RING_BYTES");
  TcpOptions bad;
  bad.shm_ring_bytes = 1000;  // not a multiple of 4096
  MemoryStore store;
  EXPECT_THROW(make_tcp_communicator(store, 0, 2, CommOptions{milliseconds(1000)}, bad),
               InvalidArgument);
}

TEST(TcpComm, SizeOneNeedsNoPeers) {
  MemoryStore store;
  auto comm = make_tcp_communicator(store, 0, 1, CommOptions{milliseconds(1000)}, TcpOptions{});
  std::vector<float> a = {1, 2, 3};
  comm->allreduce(a.data(), 3, DType::f32, ReduceOp::kAvg);
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3}));
  comm->barrier();
  EXPECT_THROW(comm->send(a.data(), 3, DType::f32, 0), InvalidArgument);
}

// The lost-peer tests over each data path of large collectives: loopback TCP, the
// ring over shared memory (direct off), and the single-copy reads (direct, chosen by
// auto above the slots when the probe passes and direct_min_bytes allows).
enum class Link { kTcp, kShmRing, kShmDirect };
class TcpPath : public ::testing::TestWithParam<Link> {
 protected:
  TcpOptions options() const {
    TcpOptions o;
    o.shm = GetParam() != Link::kTcp;
    o.direct = GetParam() == Link::kShmDirect;
    o.algos.allreduce_direct_max_bytes = SIZE_MAX;  // direct or the ring at every size
    o.algos.allreduce_direct_min_bytes = o.direct ? o.algos.local_max_bytes + 1 : SIZE_MAX;
    return o;
  }
  // The large allreduces below run the path under test.
  void expect_path(const Communicator& comm, size_t bytes) const {
    const Algo want =
        GetParam() == Link::kShmDirect && cma_available() ? Algo::kDirect : Algo::kRing;
    EXPECT_EQ(tcp_algorithm(comm, Collective::kAllreduce, bytes), want) << "rank " << comm.rank();
  }
};

TEST_P(TcpPath, TimeoutWhenAPeerStopsAnswering) {
  const milliseconds timeout(500);
  std::atomic<bool> others_done{false};
  run_ranks(3, options(), timeout, [&](Communicator& comm) {
    if (comm.rank() == 1) {  // alive but never joins the allreduce
      while (!others_done.load()) std::this_thread::sleep_for(milliseconds(5));
      return;
    }
    std::vector<float> a(1000, 1.0f);
    auto start = Clock::now();
    try {
      comm.allreduce(a.data(), a.size(), DType::f32, ReduceOp::kSum);
      ADD_FAILURE() << "allreduce without rank 1 succeeded";
    } catch (const TimeoutError& e) {
      double ms = elapsed_ms(start);
      EXPECT_LT(ms, timeout.count() + 1000.0) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank"), std::string::npos) << e.what();
    }
    // Failed for good: the next call throws at once.
    start = Clock::now();
    EXPECT_THROW(comm.barrier(), TimeoutError);
    EXPECT_LT(elapsed_ms(start), 100.0);
    if (comm.rank() == 0) {
      std::this_thread::sleep_for(milliseconds(50));
      others_done.store(true);
    }
  });
}

// Ranks 0 and 2 are in an allreduce that rank 1 never joins; rank 1 then aborts or
// destroys its communicator. Both must fail quickly with an error naming rank 1.
void expect_peer_failure_names_rank1(
    bool destroy, const TcpOptions& topts,
    const std::function<void(const Communicator&, size_t)>& expect_path) {
  const milliseconds timeout(2000);
  MemoryStore store;
  std::vector<std::thread> threads;
  std::atomic<bool> go{false};
  Clock::time_point event;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto comm = make_tcp_communicator(store, r, 3, CommOptions{timeout}, topts);
        if (r == 1) {
          std::this_thread::sleep_for(milliseconds(200));
          event = Clock::now();
          go.store(true);
          if (destroy) {
            comm.reset();
          } else {
            comm->abort("test abort");
            EXPECT_THROW(comm->barrier(), CommError);  // stays failed
          }
          return;
        }
        std::vector<float> a(1 << 20, 1.0f);
        expect_path(*comm, a.size() * 4);
        try {
          comm->allreduce(a.data(), a.size(), DType::f32, ReduceOp::kSum);
          ADD_FAILURE() << "rank " << r << ": allreduce succeeded without rank 1";
        } catch (const CommError& e) {
          while (!go.load()) std::this_thread::yield();
          double ms = elapsed_ms(event);
          std::string msg = e.what();
          EXPECT_NE(msg.find("rank 1"), std::string::npos) << msg;
          EXPECT_LT(ms, 1000.0) << msg;
          EXPECT_LT(ms, static_cast<double>(timeout.count())) << msg;
        }
      } catch (const std::exception& e) {
        ADD_FAILURE() << "rank " << r << ": " << e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
}

TEST_P(TcpPath, AbortedPeerFailsTheOthersQuickly) {
  expect_peer_failure_names_rank1(false, options(),
                                  [&](const Communicator& c, size_t b) { expect_path(c, b); });
}
TEST_P(TcpPath, DestroyedPeerFailsTheOthersQuickly) {
  expect_peer_failure_names_rank1(true, options(),
                                  [&](const Communicator& c, size_t b) { expect_path(c, b); });
}

TEST_P(TcpPath, DestroyingWithPendingWorkTellsThePeers) {
  MemoryStore store;
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto comm = make_tcp_communicator(store, r, 3, CommOptions{milliseconds(2000)}, options());
        std::vector<float> a(1000, 1.0f);
        if (r == 1) {
          auto work = comm->allreduce_async(a.data(), a.size(), DType::f32, ReduceOp::kSum);
          std::this_thread::sleep_for(milliseconds(100));  // the others have not joined yet
          comm.reset();
          EXPECT_THROW(work->wait(), CommError);
          return;
        }
        std::this_thread::sleep_for(milliseconds(300));
        auto start = Clock::now();
        try {
          comm->allreduce(a.data(), a.size(), DType::f32, ReduceOp::kSum);
          ADD_FAILURE() << "rank " << r << ": allreduce succeeded without rank 1";
        } catch (const CommError& e) {
          EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
          EXPECT_LT(elapsed_ms(start), 1000.0);
        }
      } catch (const std::exception& e) {
        ADD_FAILURE() << "rank " << r << ": " << e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
}

TEST(TcpComm, StrayConnectionsAreRejected) {
  MemoryStore store;
  std::vector<std::thread> threads;
  auto rank_main = [&](int r) {
    try {
      auto comm = make_tcp_communicator(store, r, 3, CommOptions{milliseconds(5000)}, TcpOptions{});
      int x = r + 1;
      comm->allreduce(&x, 1, DType::i32, ReduceOp::kSum);
      EXPECT_EQ(x, 6);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "rank " << r << ": " << e.what();
    }
  };
  threads.emplace_back(rank_main, 0);
  // Rank 0 is listening and waits for ranks 1 and 2; throw junk at its port first.
  std::string entry = store.get("tcp/default/addr/0", milliseconds(5000));
  int port = std::stoi(entry.substr(entry.rfind(':') + 1));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::vector<int> strays;
  for (int kind = 0; kind < 3; ++kind) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    if (kind == 1) {
      std::string junk(64, 'x');
      ASSERT_EQ(::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL), 64);
    }
    if (kind == 2) ::shutdown(fd, SHUT_WR);  // connects and hangs up
    strays.push_back(fd);                    // kind 0 stays silent
  }
  threads.emplace_back(rank_main, 1);
  threads.emplace_back(rank_main, 2);
  for (auto& t : threads) t.join();
  for (int fd : strays) ::close(fd);
}

TEST(TcpComm, MismatchedTagIsRefused) {
  MemoryStore store;
  TcpOptions a, b;
  a.tag = "job-a";
  b.tag = "job-b";
  // Rank 1 of job b finds rank 0 of job a's address under its own key: a stale entry.
  std::thread t0([&] {
    try {
      auto comm = make_tcp_communicator(store, 0, 2, CommOptions{milliseconds(1500)}, a);
      ADD_FAILURE() << "rank 0 of job a formed a group without its rank 1";
    } catch (const TimeoutError&) {
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
    }
  });
  std::string entry = store.get("tcp/job-a/addr/0", milliseconds(5000));
  store.set("tcp/job-b/addr/0", entry);
  EXPECT_THROW(make_tcp_communicator(store, 1, 2, CommOptions{milliseconds(1500)}, b), CommError);
  t0.join();
}

// A real process is SIGKILLed in the middle of large allreduces (16 MiB, so that the
// kill lands while data is in flight): the two ranks in this process must fail with
// CommError naming it, quickly, and never hang; it leaves nothing in /dev/shm.
TEST_P(TcpPath, KilledProcessFailsTheOthersQuickly) {
  namespace fs = std::filesystem;
  std::string tmpl = (fs::path(::testing::TempDir()) / "dtrain_tcp_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  const std::string dir = tmpl;
  const milliseconds timeout(2000);
  const size_t count = 1 << 22;
  const TcpOptions topts = options();

  pid_t child = ::fork();  // no other threads exist here: every earlier test joined its own
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::alarm(30);  // never outlive a broken parent
    try {
      FileStore store(dir);
      auto comm = make_tcp_communicator(store, 2, 3, CommOptions{timeout}, topts);
      std::vector<float> a(count, 1.0f);
      for (;;) comm->allreduce(a.data(), count, DType::f32, ReduceOp::kSum);
    } catch (...) {
    }
    ::_exit(0);
  }

  FileStore store(dir);
  std::atomic<int> rounds{0};
  std::vector<std::string> errors(2);
  std::vector<double> detect_ms(2, -1);
  std::atomic<int64_t> killed_at{0};
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto comm = make_tcp_communicator(store, r, 3, CommOptions{timeout}, topts);
        expect_path(*comm, count * 4);
        std::vector<float> a(count, 1.0f);
        for (;;) {
          comm->allreduce(a.data(), count, DType::f32, ReduceOp::kSum);
          rounds.fetch_add(1);
        }
      } catch (const CommError& e) {
        errors[r] = e.what();
        int64_t k = killed_at.load();
        if (k != 0) {
          detect_ms[r] = std::chrono::duration<double, std::milli>(Clock::now().time_since_epoch() -
                                                                   Clock::duration(k))
                             .count();
        }
      } catch (const std::exception& e) {
        errors[r] = std::string("unexpected: ") + e.what();
      }
    });
  }
  auto start = Clock::now();
  while (rounds.load() < 10 && elapsed_ms(start) < 10000)
    std::this_thread::sleep_for(milliseconds(1));
  EXPECT_GE(rounds.load(), 10) << "the three ranks never ran allreduces together";
  killed_at.store(Clock::now().time_since_epoch().count());
  ::kill(child, SIGKILL);
  for (auto& t : threads) t.join();
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(errors[r].find("rank 2"), std::string::npos) << "rank " << r << ": " << errors[r];
    EXPECT_GE(detect_ms[r], 0.0) << "rank " << r << " failed before the kill: " << errors[r];
    EXPECT_LT(detect_ms[r], static_cast<double>(timeout.count())) << errors[r];
  }
  EXPECT_EQ(shm_leftovers(child), std::vector<std::string>{}) << "the killed rank's";
  EXPECT_EQ(shm_leftovers(), std::vector<std::string>{});
  std::error_code ec;
  fs::remove_all(dir, ec);
}

INSTANTIATE_TEST_SUITE_P(DataPath, TcpPath,
                         ::testing::Values(Link::kTcp, Link::kShmRing, Link::kShmDirect),
                         [](const auto& info) {
                           return info.param == Link::kTcp       ? "tcp"
                                  : info.param == Link::kShmRing ? "shm"
                                                                 : "shm_direct";
                         });

// The arithmetic on its own, against dtrain::Half / BFloat16 on values that round.
TEST(Reduce, SixteenBitFloatsRoundLikeTheScalarConversions) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1000.0f, 1000.0f);
  const size_t n = 1003;  // odd: exercises the vector body and the scalar tail
  for (ReduceOp op : kOps) {
    std::vector<Half> a(n), b(n), want(n);
    std::vector<BFloat16> c(n), d(n), want_bf(n);
    for (size_t i = 0; i < n; ++i) {
      a[i] = Half(dist(rng));
      b[i] = Half(dist(rng));
      c[i] = BFloat16(dist(rng));
      d[i] = BFloat16(dist(rng));
      float x = static_cast<float>(a[i]), y = static_cast<float>(b[i]);
      float u = static_cast<float>(c[i]), v = static_cast<float>(d[i]);
      float h = op == ReduceOp::kMax   ? std::max(x, y)
                : op == ReduceOp::kMin ? std::min(x, y)
                                       : x + y;
      float g = op == ReduceOp::kMax   ? std::max(u, v)
                : op == ReduceOp::kMin ? std::min(u, v)
                                       : u + v;
      want[i] = Half(h);
      want_bf[i] = BFloat16(g);
    }
    reduce_into(a.data(), b.data(), n, DType::f16, op);
    reduce_into(c.data(), d.data(), n, DType::bf16, op);
    size_t bad = 0;
    for (size_t i = 0; i < n; ++i) bad += a[i].bits != want[i].bits || c[i].bits != want_bf[i].bits;
    EXPECT_EQ(bad, 0u) << reduce_op_name(op);
  }
  std::vector<Half> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = Half(dist(rng));
  std::vector<Half> scaled = h;
  scale_in_place(scaled.data(), n, DType::f16, 1.0 / 3);
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    bad += scaled[i].bits != Half(static_cast<float>(h[i]) * static_cast<float>(1.0 / 3)).bits;
  }
  EXPECT_EQ(bad, 0u) << "scale f16";
}

TEST(Reduce, IntegersWrapAndAverageToNearest) {
  std::vector<int32_t> a = {INT32_MAX, -7, 5}, b = {1, 2, -9};
  reduce_into(a.data(), b.data(), 3, DType::i32, ReduceOp::kSum);
  EXPECT_EQ(a, (std::vector<int32_t>{INT32_MIN, -5, -4}));
  std::vector<int64_t> c = {7, -7, 9};
  scale_in_place(c.data(), 3, DType::i64, 0.5);
  EXPECT_EQ(c, (std::vector<int64_t>{4, -4, 5}));  // llround: halves away from zero
  EXPECT_STREQ(reduce_op_name(ReduceOp::kAvg), "avg");
}

TEST(FileStore, SetGetAndTimeout) {
  namespace fs = std::filesystem;
  std::string tmpl = (fs::path(::testing::TempDir()) / "dtrain_fs_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  FileStore a(tmpl), b(tmpl);
  a.set("tcp/job 1/addr/0", "host:1234");
  EXPECT_EQ(b.get("tcp/job 1/addr/0", milliseconds(100)), "host:1234");
  a.set("tcp/job 1/addr/0", "host:5678");  // overwrite
  EXPECT_EQ(b.get("tcp/job 1/addr/0", milliseconds(100)), "host:5678");
  std::thread later([&] {
    std::this_thread::sleep_for(milliseconds(50));
    a.set("late", "");
  });
  EXPECT_EQ(b.get("late", milliseconds(5000)), "");
  later.join();
  auto start = Clock::now();
  EXPECT_THROW(b.get("never", milliseconds(100)), TimeoutError);
  EXPECT_GE(elapsed_ms(start), 100.0);
  std::error_code ec;
  fs::remove_all(tmpl, ec);
}

}  // namespace
}  // namespace dtrain::comm
