// tcp backend: every collective at world sizes 1-4, every dtype and awkward counts,
// checked element by element against a sequential oracle computed here, over each
// data path (same-host shared memory, plain TCP with the fast path off, and a mix);
// async ordering; argument checks; timeouts; lost peers (an aborted rank, a
// destroyed rank, a SIGKILLed child process) on both paths; stray connections; no
// shared-memory names left in /dev/shm; the reduction arithmetic; FileStore; split()
// into 2x2 and 2x2x2 meshes, reversed keys, kNoColor, splits of splits and a peer lost
// inside a child, each group checked against a sequential reference. Ranks are threads
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

#include "dtrain/comm/communicator.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"

namespace dtrain::comm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

const DType kDTypes[] = {DType::f32, DType::f64,  DType::i32, DType::i64,
                         DType::f16, DType::bf16, DType::u8};
const ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};

double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

// A typed buffer whose elements are set and compared through double.
struct Buffer {
  Buffer(DType t, size_t n) : dtype(t), count(n), bytes(n * dtype_size(t)) {}
  void* data() { return bytes.data(); }
  std::byte* at(size_t i) { return bytes.data() + i * dtype_size(dtype); }
  const std::byte* at(size_t i) const { return bytes.data() + i * dtype_size(dtype); }

  template <typename T>
  void put(size_t i, T v) {
    std::memcpy(at(i), &v, sizeof(T));
  }
  void set(size_t i, double v) {
    switch (dtype) {
      case DType::f32:
        return put(i, static_cast<float>(v));
      case DType::f64:
        return put(i, v);
      case DType::i32:
        return put(i, static_cast<int32_t>(v));
      case DType::i64:
        return put(i, static_cast<int64_t>(v));
      case DType::u8:
        return put(i, static_cast<uint8_t>(v));
      case DType::f16:
        return put(i, Half(static_cast<float>(v)).bits);
      case DType::bf16:
        return put(i, BFloat16(static_cast<float>(v)).bits);
    }
  }
  double get(size_t i) const {
    auto load = [&](auto x) {
      std::memcpy(&x, at(i), sizeof(x));
      return x;
    };
    switch (dtype) {
      case DType::f32:
        return load(0.0f);
      case DType::f64:
        return load(0.0);
      case DType::i32:
        return load(int32_t{});
      case DType::i64:
        return static_cast<double>(load(int64_t{}));
      case DType::u8:
        return load(uint8_t{});
      case DType::f16: {
        Half h;
        h.bits = load(uint16_t{});
        return static_cast<float>(h);
      }
      case DType::bf16: {
        BFloat16 b;
        b.bits = load(uint16_t{});
        return static_cast<float>(b);
      }
    }
    return 0;
  }
  // The average as the backend computes it: the sum times 1/n, rounded the way the
  // element type rounds (float arithmetic for f32/f16/bf16, nearest for integers).
  void set_avg(size_t i, double sum, int n) {
    float f = static_cast<float>(sum) * static_cast<float>(1.0 / n);
    switch (dtype) {
      case DType::f32:
        return put(i, f);
      case DType::f64:
        return put(i, sum * (1.0 / n));
      case DType::f16:
        return put(i, Half(f).bits);
      case DType::bf16:
        return put(i, BFloat16(f).bits);
      case DType::i32:
        return put(i, static_cast<int32_t>(std::llround(sum * (1.0 / n))));
      case DType::i64:
        return put(i, static_cast<int64_t>(std::llround(sum * (1.0 / n))));
      case DType::u8:
        return put(i, static_cast<uint8_t>(std::llround(sum * (1.0 / n))));
    }
  }

  DType dtype;
  size_t count;
  std::vector<std::byte> bytes;
};

// Element by element; returns "" when equal, else the count and the first mismatch.
std::string compare(const Buffer& got, const Buffer& want) {
  size_t bad = 0, first = 0;
  const size_t es = dtype_size(got.dtype);
  for (size_t i = 0; i < want.count; ++i) {
    if (std::memcmp(got.at(i), want.at(i), es) != 0 && bad++ == 0) first = i;
  }
  if (bad == 0) return "";
  return fmt::format("{} of {} {} elements differ; first at {}: got {}, want {}", bad, want.count,
                     dtype_name(want.dtype), first, got.get(first), want.get(first));
}

// Small integers: exact in every dtype, and sums of four stay exact even in bf16.
double input(int rank, size_t i, DType t, int salt = 0) {
  int v = static_cast<int>((i * 7 + static_cast<size_t>(rank) * 13 + salt * 5) % 17) - 8;
  return t == DType::u8 ? v + 8 : v;
}

std::vector<size_t> counts_for(int n) {
  return {0, 1, 7, 1023, static_cast<size_t>(n) * 37 + 1, 100003};
}

std::string what(const char* op, DType t, size_t count, const char* extra = "") {
  return fmt::format("{} {} count {} {}", op, dtype_name(t), count, extra);
}

// Small chunks and a small window so that even modest counts run many pipelined
// chunks and wrap the scratch slots; shared-memory rings of two chunks, so that
// they wrap and fill all the time.
TcpOptions small_chunks() {
  TcpOptions o;
  o.ring.chunk_bytes = 4096;
  o.ring.window = 3;
  o.shm_ring_bytes = 8192;
  return o;
}

// The names this process (or `pid`) left in /dev/shm.
std::vector<std::string> shm_leftovers(pid_t pid = ::getpid()) {
  std::vector<std::string> out;
  const std::string prefix = fmt::format("dtrain-{}-", pid);
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
    std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0) out.push_back(name);
  }
  return out;
}

// Shared-memory segments mapped into this process right now (unlinked ones included),
// read from /proc/self/maps: an oracle independent of the transport's own state.
int shm_mappings() {
  std::ifstream maps("/proc/self/maps");
  int n = 0;
  for (std::string line; std::getline(maps, line);) {
    n += line.find("/dev/shm/dtrain-") != std::string::npos;
  }
  return n;
}

// Runs body(comm) on n threads, one communicator each (rank r with options(r)),
// meeting in one MemoryStore. Afterwards nothing may be left in /dev/shm.
void run_ranks(int n, const std::function<TcpOptions(int)>& options, milliseconds timeout,
               const std::function<void(Communicator&)>& body) {
  {
    MemoryStore store;
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        try {
          auto comm = make_tcp_communicator(store, r, n, CommOptions{timeout}, options(r));
          body(*comm);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "rank " << r << ": " << e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  EXPECT_EQ(shm_leftovers(), std::vector<std::string>{}) << "left in /dev/shm";
}

void run_ranks(int n, const TcpOptions& topts, milliseconds timeout,
               const std::function<void(Communicator&)>& body) {
  run_ranks(
      n, [&](int) { return topts; }, timeout, body);
}

// The data path between ranks of one host: shared memory (the default), plain TCP
// (the fast path off), or a mix (odd ranks turn it off: their pairs use TCP).
enum class Path { kShm, kTcp, kMixed };
const char* path_name(Path p) {
  return p == Path::kShm ? "shm" : p == Path::kTcp ? "tcp" : "mixed";
}
void PrintTo(Path p, std::ostream* os) { *os << path_name(p); }

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
INSTANTIATE_TEST_SUITE_P(OneHost, TcpWorld,
                         ::testing::Combine(::testing::Values(2, 3, 5),
                                            ::testing::Values(Path::kShm),
                                            ::testing::Values(Algo::kLocal, Algo::kRing)),
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
  try {
    parse_algo("tree", "DTRAIN_ALLREDUCE_ALGO");
    ADD_FAILURE() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("DTRAIN_ALLREDUCE_ALGO 'tree'"), std::string::npos)
        << e.what();
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

class TcpPath : public ::testing::TestWithParam<bool> {
 protected:
  TcpOptions options() const {
    TcpOptions o;
    o.shm = GetParam();
    return o;
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
void expect_peer_failure_names_rank1(bool destroy, const TcpOptions& topts) {
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
  expect_peer_failure_names_rank1(false, options());
}
TEST_P(TcpPath, DestroyedPeerFailsTheOthersQuickly) {
  expect_peer_failure_names_rank1(true, options());
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

INSTANTIATE_TEST_SUITE_P(DataPath, TcpPath, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "shm" : "tcp"; });

// ---- split: sub-communicators ----

// The group of `rank` under color(r)/key(r) for every parent rank r, by the definition
// (MPI_Comm_split): the ranks of its color, ordered by (key, parent rank). A sequential
// reference independent of the library: a stable sort by key of the ranks in order.
std::vector<int> reference_group(int n, int rank, const std::function<int(int)>& color,
                                 const std::function<int(int)>& key) {
  std::vector<int> members;
  for (int r = 0; r < n; ++r) {
    if (color(r) == color(rank)) members.push_back(r);
  }
  std::stable_sort(members.begin(), members.end(), [&](int a, int b) { return key(a) < key(b); });
  return members;
}

// Runs allreduce, allgather, reduce_scatter, broadcast and send/recv on `child`, the
// group `members` (parent ranks in child-rank order) that parent rank `me` belongs to,
// and compares each result with a sequential reference over the members' inputs.
void check_group(Communicator& child, const std::vector<int>& members, int me, int salt,
                 const std::string& where) {
  const int n = static_cast<int>(members.size());
  ASSERT_EQ(child.size(), n) << where;
  ASSERT_EQ(members[static_cast<size_t>(child.rank())], me) << where;
  const int cr = child.rank();
  for (DType t : {DType::f32, DType::i64, DType::bf16}) {
    for (size_t count : {size_t{1}, size_t{37}, size_t{5000}}) {
      const std::string at = where + " " + what("", t, count);
      Buffer data(t, count), want(t, count);
      for (size_t i = 0; i < count; ++i) {
        data.set(i, input(me, i, t, salt));
        double sum = 0;
        for (int p : members) sum += input(p, i, t, salt);
        want.set(i, sum);
      }
      child.allreduce(data.data(), count, t, ReduceOp::kSum);
      EXPECT_EQ(compare(data, want), "") << "allreduce " << at;

      Buffer mine(t, count), all(t, count * n), all_want(t, count * n);
      for (size_t i = 0; i < count; ++i) mine.set(i, input(me, i, t, salt + 1));
      for (int r = 0; r < n; ++r) {
        for (size_t i = 0; i < count; ++i)
          all_want.set(r * count + i, input(members[r], i, t, salt + 1));
      }
      child.allgather(mine.data(), all.data(), count, t);
      EXPECT_EQ(compare(all, all_want), "") << "allgather " << at;

      Buffer rs_in(t, count * n), rs_out(t, count), rs_want(t, count);
      for (size_t i = 0; i < count * n; ++i) rs_in.set(i, input(me, i, t, salt + 2));
      for (size_t i = 0; i < count; ++i) {
        double sum = 0;
        for (int p : members) sum += input(p, cr * count + i, t, salt + 2);
        rs_want.set(i, sum);
      }
      child.reduce_scatter(rs_in.data(), rs_out.data(), count, t, ReduceOp::kSum);
      EXPECT_EQ(compare(rs_out, rs_want), "") << "reduce_scatter " << at;

      const int root = n - 1;
      Buffer bc(t, count), bc_want(t, count);
      for (size_t i = 0; i < count; ++i) {
        bc.set(i, input(me, i, t, salt + 3));
        bc_want.set(i, input(members[root], i, t, salt + 3));
      }
      child.broadcast(bc.data(), count, t, root);
      EXPECT_EQ(compare(bc, bc_want), "") << "broadcast " << at;

      if (n < 2) continue;
      // Around the child's ring: even child ranks send first, odd ones receive first.
      const int next = (cr + 1) % n, prev = (cr + n - 1) % n;
      Buffer msg(t, count), got(t, count), got_want(t, count);
      for (size_t i = 0; i < count; ++i) {
        msg.set(i, input(me, i, t, salt + 4));
        got_want.set(i, input(members[prev], i, t, salt + 4));
      }
      if (cr % 2 == 0) {
        child.send(msg.data(), count, t, next);
        child.recv(got.data(), count, t, prev);
      } else {
        child.recv(got.data(), count, t, prev);
        child.send(msg.data(), count, t, next);
      }
      EXPECT_EQ(compare(got, got_want), "") << "send/recv " << at;
    }
  }
}

struct Split {
  const char* name;
  std::function<int(int)> color;
  std::function<int(int)> key = [](int) { return 0; };
};

// The mesh groups of a world: 2x2 for 4 ranks (rows and columns); for 8 ranks the
// three axes of 2x2x2 and the two 4-rank planes that rank / 4 and rank % 4 pick.
std::vector<Split> mesh_splits(int n) {
  std::vector<Split> s = {{"rank/2", [](int r) { return r / 2; }},
                          {"rank%2", [](int r) { return r % 2; }}};
  if (n == 8) {
    s.push_back({"axis1", [](int r) { return (r / 4) * 2 + r % 2; }});
    s.push_back({"rank%4", [](int r) { return r % 4; }});
    s.push_back({"rank/4", [](int r) { return r / 4; }});
  }
  return s;
}

class TcpSplit : public ::testing::TestWithParam<std::tuple<int, bool>> {
 protected:
  int world() const { return std::get<0>(GetParam()); }
  TcpOptions options() const {
    TcpOptions o = small_chunks();
    o.shm = std::get<1>(GetParam());
    return o;
  }
};

// Every mesh split of the world at once (all children alive together, as a model-
// parallel grid keeps them), then the collectives in every group, the groups of one
// split running concurrently; the parent still works afterwards.
TEST_P(TcpSplit, MeshGroupsMatchTheReference) {
  const int n = world();
  const std::vector<Split> splits = mesh_splits(n);
  run_ranks(n, options(), milliseconds(20000), [&](Communicator& comm) {
    const int me = comm.rank();
    std::vector<std::unique_ptr<Communicator>> children;
    for (const Split& s : splits) children.push_back(comm.split(s.color(me), s.key(me)));
    for (size_t k = 0; k < splits.size(); ++k) {
      ASSERT_NE(children[k], nullptr) << splits[k].name;
      EXPECT_EQ(children[k]->backend(), "tcp");
      EXPECT_EQ(children[k]->timeout(), comm.timeout());
      check_group(*children[k], reference_group(n, me, splits[k].color, splits[k].key), me,
                  static_cast<int>(k) * 10, fmt::format("split {} rank {}", splits[k].name, me));
    }
    std::vector<float> a(100, static_cast<float>(me));
    comm.allreduce(a.data(), a.size(), DType::f32, ReduceOp::kSum);
    EXPECT_EQ(a[99], static_cast<float>(n * (n - 1) / 2)) << "the parent after splitting";
  });
}

INSTANTIATE_TEST_SUITE_P(Worlds, TcpSplit,
                         ::testing::Combine(::testing::Values(4, 8), ::testing::Bool()),
                         [](const auto& info) {
                           return fmt::format("n{}_{}", std::get<0>(info.param),
                                              std::get<1>(info.param) ? "shm" : "tcp");
                         });

// key = -rank reverses the order inside each group: the allgather blocks come in the
// reversed order of parent ranks.
TEST(TcpSplitOrder, KeyReversesTheOrder) {
  auto color = [](int r) { return r % 2; };
  auto key = [](int r) { return -r; };
  run_ranks(4, small_chunks(), milliseconds(20000), [&](Communicator& comm) {
    const int me = comm.rank();
    auto child = comm.split(color(me), key(me));
    ASSERT_NE(child, nullptr);
    const std::vector<int> members = reference_group(4, me, color, key);
    EXPECT_EQ(members, (me % 2 == 0 ? std::vector<int>{2, 0} : std::vector<int>{3, 1}));
    EXPECT_EQ(child->rank(), me < 2 ? 1 : 0);
    check_group(*child, members, me, 7, fmt::format("reversed rank {}", me));
  });
}

// kNoColor ranks get nullptr and take no part; the others form the group. A bad color is
// refused before any communication, and the parent stays usable.
TEST(TcpSplitOrder, NoColorJoinsNothing) {
  auto color = [](int r) { return r == 0 || r == 3 ? Communicator::kNoColor : 5; };
  run_ranks(4, small_chunks(), milliseconds(20000), [&](Communicator& comm) {
    const int me = comm.rank();
    EXPECT_THROW(comm.split(-2, 0), InvalidArgument);
    auto child = comm.split(color(me), 0);
    if (color(me) == Communicator::kNoColor) {
      EXPECT_EQ(child, nullptr);
    } else {
      ASSERT_NE(child, nullptr);
      check_group(*child, {1, 2}, me, 3, fmt::format("no-color rank {}", me));
    }
    auto none = comm.split(Communicator::kNoColor, 0);  // everyone opts out
    EXPECT_EQ(none, nullptr);
    int64_t x = 1;
    comm.allreduce(&x, 1, DType::i64, ReduceOp::kSum);
    EXPECT_EQ(x, 4);
  });
}

// A child split again (8 -> two of 4 -> four of 2), and each rank alone (size-1 groups
// need no sockets).
TEST(TcpSplitOrder, SplitOfASplitAndSingletons) {
  run_ranks(8, small_chunks(), milliseconds(20000), [&](Communicator& comm) {
    const int me = comm.rank();
    auto half = comm.split(me / 4, 0);
    ASSERT_NE(half, nullptr);
    auto pair = half->split(half->rank() % 2, 0);
    ASSERT_NE(pair, nullptr);
    const int base = (me / 4) * 4;
    check_group(*pair, {base + me % 2, base + 2 + me % 2}, me, 11,
                fmt::format("split of split rank {}", me));
    auto alone = pair->split(pair->rank(), 0);
    ASSERT_NE(alone, nullptr);
    check_group(*alone, {me}, me, 13, fmt::format("singleton rank {}", me));
    check_group(*half, {base, base + 1, base + 2, base + 3}, me, 17,
                fmt::format("half rank {}", me));
  });
}

// A store that fails the test when touched: a world of one must split without it.
class UntouchableStore final : public Store {
 public:
  void set(const std::string& key, const std::string&) override {
    ADD_FAILURE() << "store set " << key;
  }
  std::string get(const std::string& key, milliseconds) override {
    ADD_FAILURE() << "store get " << key;
    throw TimeoutError("untouchable store");
  }
};

TEST(TcpSplitOrder, WorldOfOneSplitsWithoutTheStore) {
  UntouchableStore store;
  auto comm = make_tcp_communicator(store, 0, 1, CommOptions{milliseconds(1000)}, TcpOptions{});
  EXPECT_EQ(comm->split(Communicator::kNoColor, 0), nullptr);
  auto child = comm->split(3, 9);
  ASSERT_NE(child, nullptr);
  check_group(*child, {0}, 0, 1, "world of one");
  auto grandchild = child->split(0, 0);
  ASSERT_NE(grandchild, nullptr);
  EXPECT_EQ(grandchild->size(), 1);
}

// Groups {0, 2} and {1, 3}: parent rank 2 (rank 1 of its child) destroys or aborts its
// child while parent rank 0 waits in an allreduce on it. Rank 0 must fail quickly with a
// CommError naming rank 1; the other group and the parent are unaffected.
void expect_lost_peer_in_child(bool destroy) {
  const milliseconds timeout(2000);
  std::atomic<bool> gone{false};
  Clock::time_point event;
  run_ranks(4, TcpOptions{}, timeout, [&](Communicator& comm) {
    const int me = comm.rank();
    auto child = comm.split(me % 2, 0);
    ASSERT_NE(child, nullptr);
    std::vector<float> a(1 << 18, 1.0f);
    if (me == 2) {
      std::this_thread::sleep_for(milliseconds(200));
      event = Clock::now();
      gone.store(true);
      if (destroy) {
        child.reset();
      } else {
        child->abort("test abort in a child");
      }
    } else if (me == 0) {
      try {
        child->allreduce(a.data(), a.size(), DType::f32, ReduceOp::kSum);
        ADD_FAILURE() << "allreduce in the child succeeded without its rank 1";
      } catch (const CommError& e) {
        while (!gone.load()) std::this_thread::yield();
        const std::string msg = e.what();
        EXPECT_NE(msg.find("rank 1"), std::string::npos) << msg;
        EXPECT_LT(elapsed_ms(event), 1000.0) << msg;
      }
      EXPECT_THROW(child->barrier(), CommError);  // the child stays failed
    } else {
      check_group(*child, {1, 3}, me, 5, fmt::format("healthy group rank {}", me));
    }
    int64_t x = me;
    comm.allreduce(&x, 1, DType::i64, ReduceOp::kSum);  // the parent is independent
    EXPECT_EQ(x, 6);
  });
}

TEST(TcpSplitFailure, DestroyedPeerInAChildFailsItsGroupQuickly) {
  expect_lost_peer_in_child(true);
}
TEST(TcpSplitFailure, AbortedPeerInAChildFailsItsGroupQuickly) { expect_lost_peer_in_child(false); }

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
