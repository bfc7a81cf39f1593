// `dtrain launch --bind-to` planning (launcher/src/launch_binding.cc) on made-up
// topologies: CPU lists in the kernel's format, whole cores (hyperthread siblings
// together) in blocks of cores/N per worker, auto as mpirun's default, refusals naming
// the numbers; and the topology read from this process against /proc/self/status. The
// end-to-end checks (a worker reads its own affinity) are in test_launch.cc.
#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "dtrain/common/error.h"
#include "launch_binding.h"

namespace dtrain::cli {
namespace {

// `n` cores of `smt` hyperthreads each, numbered as Linux does on x86: core c has CPUs
// c, c + n, c + 2n, ...
CpuTopology smt_topology(int n, int smt) {
  CpuTopology t;
  for (int c = 0; c < n; ++c) {
    CpuList core;
    for (int s = 0; s < smt; ++s) core.push_back(c + s * n);
    t.cores.push_back(core);
  }
  return t;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "(no InvalidArgument)";
}

TEST(LaunchBinding, CpuListsInTheKernelsFormat) {
  EXPECT_EQ(parse_cpu_list("0-3,8"), (CpuList{0, 1, 2, 3, 8}));
  EXPECT_EQ(parse_cpu_list("5,1-2,2\n"), (CpuList{1, 2, 5}));
  EXPECT_EQ(parse_cpu_list(""), CpuList{});
  EXPECT_EQ(format_cpu_list({0, 1, 2, 3, 8}), "0-3,8");
  EXPECT_EQ(format_cpu_list({1, 3, 4}), "1,3-4");
  EXPECT_EQ(format_cpu_list({}), "");
  for (const std::string bad : {"a", "1-", "3-1", "-2", "1,,x"}) {
    EXPECT_NE(message_of([&] { parse_cpu_list(bad); }).find("'" + bad + "'"), std::string::npos)
        << bad;
  }
}

TEST(LaunchBinding, BindToValues) {
  EXPECT_EQ(parse_bind_to("auto"), BindTo::kAuto);
  EXPECT_EQ(parse_bind_to("none"), BindTo::kNone);
  EXPECT_EQ(parse_bind_to("core"), BindTo::kCore);
  EXPECT_NE(message_of([] { parse_bind_to("socket"); }).find("'socket'"), std::string::npos);
}

TEST(LaunchBinding, CoreGivesEachWorkerItsOwnBlockOfWholeCores) {
  const CpuTopology t = smt_topology(4, 2);  // cores {0,4} {1,5} {2,6} {3,7}
  EXPECT_EQ(plan_binding(BindTo::kCore, 4, t).cpus,
            (std::vector<CpuList>{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(plan_binding(BindTo::kCore, 2, t).cpus,
            (std::vector<CpuList>{{0, 1, 4, 5}, {2, 3, 6, 7}}));
  // 4 cores / 3 workers: one core each, the fourth stays free.
  EXPECT_EQ(plan_binding(BindTo::kCore, 3, t).cpus, (std::vector<CpuList>{{0, 4}, {1, 5}, {2, 6}}));
  EXPECT_EQ(plan_binding(BindTo::kCore, 1, t).cpus,
            (std::vector<CpuList>{{0, 1, 2, 3, 4, 5, 6, 7}}));
  EXPECT_EQ(plan_binding(BindTo::kCore, 2, t).resolved, BindTo::kCore);
}

TEST(LaunchBinding, CoreRefusesMoreWorkersThanCores) {
  const std::string m = message_of([] { plan_binding(BindTo::kCore, 5, smt_topology(4, 2)); });
  EXPECT_NE(m.find("5 workers, 4 core(s) allowed (CPUs 0-7)"), std::string::npos) << m;
  EXPECT_NE(m.find("--bind-to none"), std::string::npos) << m;
}

TEST(LaunchBinding, AutoIsCoreForUpToTwoWorkersElseNone) {
  const CpuTopology t = smt_topology(8, 1);
  EXPECT_EQ(plan_binding(BindTo::kAuto, 1, t).resolved, BindTo::kCore);
  const BindingPlan two = plan_binding(BindTo::kAuto, 2, t);
  EXPECT_EQ(two.resolved, BindTo::kCore);
  EXPECT_EQ(two.cpus, (std::vector<CpuList>{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  const BindingPlan three = plan_binding(BindTo::kAuto, 3, t);
  EXPECT_EQ(three.resolved, BindTo::kNone);
  EXPECT_EQ(three.cpus, std::vector<CpuList>(3));
  EXPECT_EQ(plan_binding(BindTo::kAuto, 2, smt_topology(1, 2)).resolved, BindTo::kNone)
      << "two workers on one core stay unbound, as mpirun's oversubscribed runs";
  EXPECT_EQ(describe_binding(two, 4, BindTo::kAuto),
            "--bind-to auto (= core: 2 worker(s) <= 2, as mpirun): rank 4 on CPUs 0-3; rank 5 "
            "on CPUs 4-7");
}

TEST(LaunchBinding, NoneLeavesEveryWorkerUnbound) {
  const BindingPlan p = plan_binding(BindTo::kNone, 6, smt_topology(2, 1));
  EXPECT_EQ(p.resolved, BindTo::kNone);
  EXPECT_EQ(p.cpus, std::vector<CpuList>(6));
  EXPECT_EQ(describe_binding(p, 0, BindTo::kNone), "--bind-to none: workers not bound");
}

// The cores read here hold exactly this process's allowed CPUs, each CPU once.
TEST(LaunchBinding, TopologyCoversThisProcesssAffinity) {
  std::ifstream status("/proc/self/status");
  std::string line, allowed;
  while (std::getline(status, line)) {
    if (line.rfind("Cpus_allowed_list:", 0) == 0) allowed = line.substr(line.find(':') + 1);
  }
  ASSERT_FALSE(allowed.empty());
  CpuList all;
  for (const CpuList& core : read_cpu_topology().cores) {
    EXPECT_FALSE(core.empty());
    all.insert(all.end(), core.begin(), core.end());
  }
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, parse_cpu_list(allowed));
}

}  // namespace
}  // namespace dtrain::cli
