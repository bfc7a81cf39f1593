// HierarchicalCommunicator: the host layout from keys (uneven hosts refused), and
// hierarchical all-reduce against a sequential reference for every dtype and op at
// odd counts, with the flat ring checked beside it, on simulated hosts (threads with
// host keys: 2x2, 3x2, 2x3, contiguous and interleaved) and on real ones: two
// network namespaces joined by veth links (scripts/netns-hosts), two rank threads in
// each, keys from host_key_from_env(). The reference reduces every rank's input in
// rank order with reduce_into (the element arithmetic, tested in test_comm_tcp), so it
// shares nothing with the algorithms under test.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/hierarchical.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "subprocess.h"

#ifndef DTRAIN_SOURCE_DIR
#define DTRAIN_SOURCE_DIR "."
#endif

namespace dtrain::comm {
namespace {

using std::chrono::milliseconds;

const DType kDTypes[] = {DType::f32, DType::f64,  DType::i32, DType::i64,
                         DType::f16, DType::bf16, DType::u8};
const ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};

using Bytes = std::vector<std::byte>;

// Small integers (exact in every dtype, sums of six too, even in bf16), different per
// rank and element; u8 stays non-negative.
int input_value(int rank, size_t i, DType t) {
  int v = static_cast<int>((i * 7 + static_cast<size_t>(rank) * 13) % 17) - 8;
  return t == DType::u8 ? v + 8 : v;
}

void put(std::byte* dst, int v, DType t) {
  auto store = [&](auto x) { std::memcpy(dst, &x, sizeof x); };
  switch (t) {
    case DType::f32:
      return store(static_cast<float>(v));
    case DType::f64:
      return store(static_cast<double>(v));
    case DType::i32:
      return store(static_cast<int32_t>(v));
    case DType::i64:
      return store(static_cast<int64_t>(v));
    case DType::u8:
      return store(static_cast<uint8_t>(v));
    case DType::f16:
      return store(Half(static_cast<float>(v)).bits);
    case DType::bf16:
      return store(BFloat16(static_cast<float>(v)).bits);
  }
}

Bytes input(int rank, size_t count, DType t) {
  Bytes b(count * dtype_size(t));
  for (size_t i = 0; i < count; ++i) put(b.data() + i * dtype_size(t), input_value(rank, i, t), t);
  return b;
}

// Every rank's input reduced in rank order; kAvg as sum then one scale by 1/n.
Bytes reference(int world, size_t count, DType t, ReduceOp op) {
  Bytes acc = input(0, count, t);
  for (int r = 1; r < world; ++r) {
    Bytes x = input(r, count, t);
    reduce_into(acc.data(), x.data(), count, t, op == ReduceOp::kAvg ? ReduceOp::kSum : op);
  }
  if (op == ReduceOp::kAvg) scale_in_place(acc.data(), count, t, 1.0 / world);
  return acc;
}

// "" when equal, else the number of differing elements and the first one's index.
std::string compare(const Bytes& got, const Bytes& want, DType t) {
  const size_t es = dtype_size(t), n = want.size() / es;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(got.data() + i * es, want.data() + i * es, es) != 0 && bad++ == 0) first = i;
  }
  return bad == 0 ? "" : fmt::format("{} of {} elements differ, first at {}", bad, n, first);
}

// Every dtype x op x count through comm.allreduce against the reference.
void expect_allreduce_matches(Communicator& comm, const std::vector<size_t>& counts,
                              const std::string& label) {
  for (DType t : kDTypes) {
    for (ReduceOp op : kOps) {
      for (size_t count : counts) {
        Bytes buf = input(comm.rank(), count, t);
        comm.allreduce(buf.data(), count, t, op);
        EXPECT_EQ(compare(buf, reference(comm.size(), count, t, op), t), "")
            << label << " rank " << comm.rank() << " " << dtype_name(t) << " " << reduce_op_name(op)
            << " count " << count;
      }
    }
  }
}

// Ranks as threads, each with its own tcp communicator built by make(rank), meeting
// through `store`; an exception on any rank fails the test with its message.
void run_threads(int first_rank, int n, const std::function<void(int)>& body) {
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int k = 0; k < n; ++k) {
    threads.emplace_back([&, k] {
      try {
        body(first_rank + k);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(k)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int k = 0; k < n; ++k)
    EXPECT_EQ(errors[static_cast<size_t>(k)], "") << "rank " << first_rank + k;
}

struct Hosts {
  int hosts, per_host;
  bool interleaved;  // host of rank r: r % hosts (else r / per_host)
  int world() const { return hosts * per_host; }
  std::string key(int rank) const {
    return fmt::format("sim-host-{}", interleaved ? rank % hosts : rank / per_host);
  }
};

void PrintTo(const Hosts& h, std::ostream* os) {
  *os << h.hosts << "x" << h.per_host << (h.interleaved ? "-interleaved" : "");
}

class SimulatedHosts : public ::testing::TestWithParam<Hosts> {
 protected:
  // body(world, hierarchical) on every rank.
  void run(const std::function<void(Communicator&, HierarchicalCommunicator&)>& body) {
    const Hosts h = GetParam();
    MemoryStore store;
    run_threads(0, h.world(), [&](int rank) {
      TcpOptions tcp;
      tcp.tag = "hier";
      auto world =
          make_tcp_communicator(store, rank, h.world(), CommOptions{milliseconds(30000)}, tcp);
      auto hier = HierarchicalCommunicator::create(*world, h.key(rank));
      body(*world, *hier);
    });
  }
};

TEST_P(SimulatedHosts, LayoutFollowsTheKeys) {
  const Hosts h = GetParam();
  run([&](Communicator& world, HierarchicalCommunicator& hier) {
    const int r = world.rank();
    EXPECT_EQ(hier.layout().hosts, h.hosts);
    EXPECT_EQ(hier.layout().local_size, h.per_host);
    EXPECT_EQ(hier.layout().host_index, h.interleaved ? r % h.hosts : r / h.per_host);
    EXPECT_EQ(hier.layout().local_rank, h.interleaved ? r / h.hosts : r % h.per_host);
    EXPECT_EQ(hier.size(), world.size());
    EXPECT_EQ(hier.rank(), r);
  });
}

TEST_P(SimulatedHosts, AllreduceEqualsTheReferenceLikeTheFlatRing) {
  const int n = GetParam().world();
  // Odd counts, one below the world size and ones not divisible by it or the host size.
  const std::vector<size_t> counts = {1, 7, 1023, static_cast<size_t>(n) * 37 + 1};
  run([&](Communicator& world, HierarchicalCommunicator& hier) {
    expect_allreduce_matches(hier, counts, "hierarchical");
    expect_allreduce_matches(world, counts, "flat ring");
    Bytes none;
    hier.allreduce(none.data(), 0, DType::f32, ReduceOp::kSum);  // a no-op, not an error
  });
}

TEST_P(SimulatedHosts, AsyncOperationsCompleteInIssueOrder) {
  run([&](Communicator& world, HierarchicalCommunicator& hier) {
    const int n = world.size(), r = world.rank();
    std::vector<float> a(1001, static_cast<float>(r + 1)), b(5, r == 1 ? 42.0f : 0.0f);
    std::vector<float> c(64, 1.0f), gathered(static_cast<size_t>(n));
    float mine = static_cast<float>(r);
    auto wa = hier.allreduce_async(a.data(), a.size(), DType::f32, ReduceOp::kSum);
    auto wb = hier.broadcast_async(b.data(), b.size(), DType::f32, 1);
    auto wg = hier.allgather_async(&mine, gathered.data(), 1, DType::f32);
    auto wc = hier.allreduce_async(c.data(), c.size(), DType::f32, ReduceOp::kMax);
    wc->wait();  // the last one done means every earlier one is
    EXPECT_TRUE(wa->is_completed() && wb->is_completed() && wg->is_completed());
    EXPECT_EQ(a[1000], static_cast<float>(n * (n + 1) / 2));
    EXPECT_EQ(b[4], 42.0f);
    for (int q = 0; q < n; ++q) EXPECT_EQ(gathered[static_cast<size_t>(q)], static_cast<float>(q));
    EXPECT_EQ(c[0], 1.0f);
    hier.barrier();
  });
}

// Blocking calls run on the calling thread when nothing is queued, and behind the
// queue when something is: a blocking all-reduce issued after async ones sees their
// results (it reduces what the earlier async all-reduce left in the same buffer), and
// the async work issued after it starts only once it is done.
TEST_P(SimulatedHosts, BlockingCallsKeepTheIssueOrderWithAsyncOnes) {
  run([&](Communicator& world, HierarchicalCommunicator& hier) {
    const int n = world.size(), r = world.rank();
    std::vector<float> a(777, static_cast<float>(r + 1));
    for (int round = 0; round < 20; ++round) {
      std::fill(a.begin(), a.end(), static_cast<float>(r + 1));
      auto w1 = hier.allreduce_async(a.data(), a.size(), DType::f32, ReduceOp::kSum);
      hier.allreduce(a.data(), a.size(), DType::f32, ReduceOp::kMax);  // after w1, in order
      EXPECT_TRUE(w1->is_completed());
      auto w2 = hier.allreduce_async(a.data(), a.size(), DType::f32, ReduceOp::kSum);
      w2->wait();
      const float want = static_cast<float>(n) * static_cast<float>(n * (n + 1) / 2);
      ASSERT_EQ(a[0], want) << "round " << round;
      ASSERT_EQ(a[776], want) << "round " << round;
      float x = static_cast<float>(r);
      hier.allreduce(&x, 1, DType::f32, ReduceOp::kMax);  // idle: on this thread
      ASSERT_EQ(x, static_cast<float>(n - 1));
    }
    hier.barrier();
  });
}

INSTANTIATE_TEST_SUITE_P(Layouts, SimulatedHosts,
                         ::testing::Values(Hosts{2, 2, false}, Hosts{3, 2, false},
                                           Hosts{2, 3, false}, Hosts{2, 2, true}, Hosts{3, 2, true},
                                           Hosts{1, 3, false}, Hosts{3, 1, false}));

TEST(HostLayout, HostsAreNumberedByTheirLowestRank) {
  const std::vector<std::string> keys = {"b", "a", "b", "a", "c", "c"};
  HostLayout l = host_layout(keys, 3);
  EXPECT_EQ(l.hosts, 3);
  EXPECT_EQ(l.local_size, 2);
  EXPECT_EQ(l.host_index, 1);  // "a", first seen at rank 1
  EXPECT_EQ(l.local_rank, 1);
}

TEST(HostLayout, UnevenHostsAreRefusedByName) {
  try {
    host_layout({"a", "a", "b"}, 0);
    FAIL() << "uneven hosts were accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'a': 2, 'b': 1"), std::string::npos) << e.what();
  }
}

TEST(HostLayout, UnevenHostsFailEveryRankOfTheCommunicator) {
  MemoryStore store;
  std::vector<std::string> errors(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      auto world = make_tcp_communicator(store, r, 3, CommOptions{milliseconds(30000)});
      try {
        HierarchicalCommunicator::create(std::move(world), r < 2 ? "a" : "b");
      } catch (const InvalidArgument& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    EXPECT_NE(e.find("same number of ranks on every host"), std::string::npos) << e;
}

TEST(HostKey, EnvironmentOverridesAndDefaultNamesTheNetworkNamespace) {
  std::string key = host_key_from_env();
  if (std::getenv("DTRAIN_HOST_ID") == nullptr) {
    EXPECT_NE(key.find("/net:["), std::string::npos) << key;
  }
}

// ---- real hosts: network namespaces ----

// Set by NetnsHosts for the processes it starts inside the namespaces:
// "<store dir>:<host>:<hosts>:<ranks per host>".
constexpr const char* kHostEnv = "DTRAIN_TEST_NETNS_HOST";

// One host of NetnsHosts: its rank threads bind to the namespace's address, meet the
// other hosts through a FileStore, check the layout seen through the real host key,
// then hierarchical and flat all-reduce against the reference.
TEST(NetnsHostProcess, RunRanks) {
  const char* spec = std::getenv(kHostEnv);
  if (spec == nullptr) GTEST_SKIP() << "started by NetnsHosts inside a namespace only";
  std::string dir;
  int host = 0, hosts = 0, per_host = 0;
  {
    std::string s(spec);
    size_t c = s.rfind(':'), b = s.rfind(':', c - 1), a = s.rfind(':', b - 1);
    dir = s.substr(0, a);
    host = std::stoi(s.substr(a + 1, b - a - 1));
    hosts = std::stoi(s.substr(b + 1, c - b - 1));
    per_host = std::stoi(s.substr(c + 1));
  }
  FileStore store(dir);
  run_threads(host * per_host, per_host, [&](int rank) {
    TcpOptions tcp;
    tcp.tag = "netns";
    tcp.bind_address = fmt::format("10.77.0.{}", host + 1);
    auto world =
        make_tcp_communicator(store, rank, hosts * per_host, CommOptions{milliseconds(20000)}, tcp);
    auto hier = HierarchicalCommunicator::create(*world, host_key_from_env());
    EXPECT_EQ(hier->layout().hosts, hosts);
    EXPECT_EQ(hier->layout().host_index, host);
    const std::vector<size_t> counts = {1, 7, 1023, 100003};
    expect_allreduce_matches(*hier, counts, "hierarchical");
    expect_allreduce_matches(*world, counts, "flat ring");
    hier->barrier();
  });
}

TEST(NetnsHosts, TwoHostsTimesTwoRanksOverVethLinks) {
  const std::string script = std::string(DTRAIN_SOURCE_DIR) + "/scripts/netns-hosts";
  testing::CommandResult can = testing::run_command(script + " check", 30);
  if (can.code == 77) GTEST_SKIP() << can.out;
  ASSERT_EQ(can.code, 0) << can.out;
  const std::string dir = testing::scratch_dir("test_hierarchical", "netns-store").string();
  std::array<char, 4096> self{};
  ASSERT_GT(::readlink("/proc/self/exe", self.data(), self.size() - 1), 0);
  auto host_cmd = [&](int h) {
    return fmt::format("{}={}:{}:2:2 {} exec $NETNS_RUN {} {} --gtest_filter=NetnsHostProcess.*",
                       kHostEnv, dir, h, script, h, self.data());
  };
  // `run` tears the namespaces down on every exit; both hosts' statuses count.
  const std::string inner = fmt::format(
      "echo netns-run=$NETNS_RUN; {} & a=$!; {} & b=$!; wait $a; ra=$?; wait $b; rb=$?; exit $((ra "
      "| rb))",
      host_cmd(0), host_cmd(1));
  testing::CommandResult r =
      testing::run_command(fmt::format("{} run 2 '' sh -c '{}'", script, inner), 90);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.find("SKIPPED"), std::string::npos) << r.out;
  size_t passed = 0;
  for (size_t at = 0; (at = r.out.find("[  PASSED  ] 1 test", at)) != std::string::npos; ++at)
    ++passed;
  EXPECT_EQ(passed, 2u) << "both host processes must run their ranks:\n" << r.out;
  const size_t at = r.out.find("netns-run=");
  ASSERT_NE(at, std::string::npos) << r.out;
  const std::string run_id = r.out.substr(at + 10, r.out.find('\n', at) - at - 10);
  testing::CommandResult left = testing::run_command("ip netns list", 10);
  EXPECT_EQ(left.out.find(run_id), std::string::npos) << "namespaces left behind:\n" << left.out;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dtrain::comm
