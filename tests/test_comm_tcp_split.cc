// tcp backend split(): sub-communicators of 2x2 and 2x2x2 meshes, reversed keys,
// kNoColor, splits of splits, a world of one, and a peer lost inside a child, each
// group checked against a sequential reference. Ranks are threads over one MemoryStore.
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

#include "comm_tcp_test_util.h"

namespace dtrain::comm {
namespace {

using namespace tcptest;

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

}  // namespace
}  // namespace dtrain::comm
