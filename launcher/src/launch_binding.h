// Where `dtrain launch --bind-to` places its workers on this node's CPUs, decided once
// before the first worker starts and applied in each child (sched_setaffinity between
// fork and exec, launch_process.h), so a restarted worker gets its old CPUs back.
//
//   none  the workers inherit launch's own CPU set (taskset, cgroup cpuset).
//   core  worker k (local rank) gets its own whole cores: launch's allowed CPUs grouped
//         by physical core (hyperthread siblings together), C / N cores each for N
//         workers on C cores, worker k the k-th block. With N = C that is one core per
//         worker, as `mpirun --bind-to core`; with fewer workers each gets a block, not
//         one core (mpirun's choice would squeeze a worker's --threads, OpenBLAS's and
//         OpenMP's pools, which size themselves to the CPUs they may use, onto one core
//         and leave the rest idle). More workers than cores is an error: two workers
//         on one core spin through each other's waits.
//   auto  (the default) what mpirun does by default: core for up to 2 workers, none for
//         more (mpirun binds those to a socket, which on one socket is every core) and
//         none when there are fewer cores than workers (mpirun's oversubscribed runs).
//
// Deliberately not here: NUMA memory policy, sockets, or mapping by anything but
// consecutive cores.
#pragma once

#include <string>
#include <vector>

namespace dtrain::cli {

enum class BindTo { kAuto, kNone, kCore };

// "auto", "none", "core"; InvalidArgument naming the value otherwise.
BindTo parse_bind_to(const std::string& text);
const char* bind_to_name(BindTo b);

// CPU numbers, ascending.
using CpuList = std::vector<int>;

// "0-3,8" (the kernel's list format, as in /proc/self/status Cpus_allowed_list).
std::string format_cpu_list(const CpuList& cpus);
// The inverse; InvalidArgument naming `text` when it is not such a list.
CpuList parse_cpu_list(const std::string& text);

// The CPUs launch may use, grouped by physical core, cores in order of their first CPU.
struct CpuTopology {
  std::vector<CpuList> cores;
};

// This process's affinity (sched_getaffinity) grouped by
// /sys/devices/system/cpu/cpuN/topology/thread_siblings_list (a CPU whose file cannot be
// read is a core of its own).
CpuTopology read_cpu_topology();

struct BindingPlan {
  BindTo resolved = BindTo::kNone;  // kNone or kCore
  std::vector<CpuList> cpus;        // per local rank; empty lists when unbound
  std::string reason;               // why auto resolved as it did ("" otherwise)
};

// InvalidArgument when `mode` is core and there are fewer cores than workers.
BindingPlan plan_binding(BindTo mode, int nproc, const CpuTopology& topology);

// One line for launch's log: "--bind-to core: rank 0 on CPUs 0; rank 1 on CPUs 1".
std::string describe_binding(const BindingPlan& plan, int first_rank, BindTo requested);

}  // namespace dtrain::cli
