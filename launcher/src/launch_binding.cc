// `dtrain launch --bind-to` (see launch_binding.h).
#include "launch_binding.h"

#include <fmt/format.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "dtrain/common/error.h"

namespace dtrain::cli {

BindTo parse_bind_to(const std::string& text) {
  if (text == "auto") return BindTo::kAuto;
  if (text == "none") return BindTo::kNone;
  if (text == "core") return BindTo::kCore;
  DTRAIN_THROW(InvalidArgument, "--bind-to must be none, core or auto, got '{}'", text);
}

const char* bind_to_name(BindTo b) {
  switch (b) {
    case BindTo::kAuto:
      return "auto";
    case BindTo::kNone:
      return "none";
    case BindTo::kCore:
      return "core";
  }
  return "?";
}

std::string format_cpu_list(const CpuList& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    out += fmt::format("{}{}", out.empty() ? "" : ",", cpus[i]);
    if (j > i) out += fmt::format("-{}", cpus[j]);
    i = j + 1;
  }
  return out;
}

namespace {

int parse_cpu(const std::string& number, const std::string& text) {
  size_t used = 0;
  int v = -1;
  try {
    v = std::stoi(number, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  DTRAIN_CHECK(used == number.size() && v >= 0, InvalidArgument,
               "'{}' is not a CPU list (like 0-3,8): bad CPU number '{}'", text, number);
  return v;
}

}  // namespace

CpuList parse_cpu_list(const std::string& text) {
  CpuList out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    item.erase(std::remove_if(item.begin(), item.end(), ::isspace), item.end());
    if (item.empty()) continue;
    const size_t dash = item.find('-');
    const int lo = parse_cpu(item.substr(0, dash), text);
    const int hi = dash == std::string::npos ? lo : parse_cpu(item.substr(dash + 1), text);
    DTRAIN_CHECK(lo <= hi, InvalidArgument,
                 "'{}' is not a CPU list: range {} ends before it starts", text, item);
    for (int c = lo; c <= hi; ++c) out.push_back(c);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

CpuTopology read_cpu_topology() {
  cpu_set_t set;
  CPU_ZERO(&set);
  DTRAIN_CHECK(::sched_getaffinity(0, sizeof set, &set) == 0, IoError,
               "launch: sched_getaffinity failed: {}", std::strerror(errno));
  std::map<int, CpuList> by_first;  // a core's allowed CPUs, by its first sibling
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    std::ifstream f(
        fmt::format("/sys/devices/system/cpu/cpu{}/topology/thread_siblings_list", cpu));
    std::string line;
    CpuList siblings;
    if (std::getline(f, line)) {
      try {
        siblings = parse_cpu_list(line);
      } catch (const InvalidArgument&) {
        siblings.clear();  // unreadable topology: the CPU counts as a core of its own
      }
    }
    const bool listed = std::find(siblings.begin(), siblings.end(), cpu) != siblings.end();
    by_first[listed ? siblings.front() : cpu].push_back(cpu);
  }
  CpuTopology t;
  for (auto& [first, cpus] : by_first) t.cores.push_back(std::move(cpus));
  return t;
}

namespace {

// Consecutive blocks of cores/nproc whole cores, one per worker.
std::vector<CpuList> core_blocks(int nproc, const CpuTopology& t) {
  const size_t per = t.cores.size() / static_cast<size_t>(nproc);
  std::vector<CpuList> out(static_cast<size_t>(nproc));
  for (size_t k = 0; k < out.size(); ++k) {
    for (size_t c = k * per; c < (k + 1) * per; ++c) {
      out[k].insert(out[k].end(), t.cores[c].begin(), t.cores[c].end());
    }
    std::sort(out[k].begin(), out[k].end());
  }
  return out;
}

std::string allowed_cpus(const CpuTopology& t) {
  CpuList all;
  for (const CpuList& c : t.cores) all.insert(all.end(), c.begin(), c.end());
  std::sort(all.begin(), all.end());
  return format_cpu_list(all);
}

}  // namespace

BindingPlan plan_binding(BindTo mode, int nproc, const CpuTopology& t) {
  DTRAIN_CHECK(nproc >= 1, InvalidArgument, "launch: binding needs at least one worker, got {}",
               nproc);
  const int cores = static_cast<int>(t.cores.size());
  BindingPlan plan;
  if (mode == BindTo::kAuto) {
    if (nproc > cores) {
      plan.reason = fmt::format("{} workers on {} cores", nproc, cores);
    } else if (nproc > 2) {
      plan.reason = fmt::format("{} workers > 2, as mpirun (which binds those to a socket)", nproc);
    } else {
      plan.reason = fmt::format("{} worker(s) <= 2, as mpirun", nproc);
    }
    mode = nproc <= std::min(cores, 2) ? BindTo::kCore : BindTo::kNone;
  }
  plan.resolved = mode;
  if (mode == BindTo::kNone) {
    plan.cpus.assign(static_cast<size_t>(nproc), CpuList{});
    return plan;
  }
  DTRAIN_CHECK(nproc <= cores, InvalidArgument,
               "launch: --bind-to core needs a core per worker: {} workers, {} core(s) allowed "
               "(CPUs {}); give fewer workers, more CPUs, or --bind-to none",
               nproc, cores, allowed_cpus(t));
  plan.cpus = core_blocks(nproc, t);
  return plan;
}

std::string describe_binding(const BindingPlan& plan, int first_rank, BindTo requested) {
  std::string out = fmt::format("--bind-to {}", bind_to_name(requested));
  if (requested == BindTo::kAuto) {
    out += fmt::format(" (= {}: {})", bind_to_name(plan.resolved), plan.reason);
  }
  if (plan.resolved == BindTo::kNone) return out + ": workers not bound";
  for (size_t k = 0; k < plan.cpus.size(); ++k) {
    out += fmt::format("{} rank {} on CPUs {}", k == 0 ? ":" : ";",
                       first_rank + static_cast<int>(k), format_cpu_list(plan.cpus[k]));
  }
  return out;
}

}  // namespace dtrain::cli
