// Worker identity detection (see worker_env.h): one small reader per launcher, tried
// in order, then the overlays every source shares (coordinator, job id, token) and
// the consistency checks.
#include "worker_env.h"

#include <fmt/format.h>

#include <charconv>
#include <cstdlib>
#include <limits>
#include <utility>

#include "dtrain/common/error.h"

namespace dtrain::cli {

namespace {

std::optional<std::string> get(const EnvReader& env, const std::string& name) {
  std::optional<std::string> v = env(name);
  if (v && v->empty()) return std::nullopt;
  return v;
}

// A non-negative int from variable `name`; InvalidArgument naming it otherwise.
int parse_count(const std::string& name, const std::string& value) {
  int64_t out = 0;
  const char* end = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(value.data(), end, out);
  DTRAIN_CHECK(
      ec == std::errc() && ptr == end && out >= 0 && out <= std::numeric_limits<int>::max(),
      InvalidArgument, "{}={} is not a non-negative integer", name, value);
  return static_cast<int>(out);
}

int required(const EnvReader& env, const std::string& name, const std::string& because) {
  std::optional<std::string> v = get(env, name);
  DTRAIN_CHECK(v.has_value(), InvalidArgument, "{} is set but {} is not", because, name);
  return parse_count(name, *v);
}

int optional_count(const EnvReader& env, const std::string& name, int fallback) {
  std::optional<std::string> v = get(env, name);
  return v ? parse_count(name, *v) : fallback;
}

// What one source found, with the variable names for error messages.
struct Found {
  WorkerIdentity id;
  std::string rank_var;
  std::string size_var;
  std::string local_var;
};

std::optional<Found> from_dtrain(const EnvReader& env) {
  std::optional<std::string> rank = get(env, "DTRAIN_RANK");
  if (!rank) return std::nullopt;
  Found f{{}, "DTRAIN_RANK", "DTRAIN_WORLD_SIZE", "DTRAIN_LOCAL_RANK"};
  f.id.launcher = "dtrain";
  f.id.rank = parse_count("DTRAIN_RANK", *rank);
  f.id.world_size = required(env, "DTRAIN_WORLD_SIZE", "DTRAIN_RANK");
  f.id.local_rank = optional_count(env, "DTRAIN_LOCAL_RANK", f.id.rank);
  return f;
}

std::optional<Found> from_mpirun(const EnvReader& env) {
  std::optional<std::string> ompi = get(env, "OMPI_COMM_WORLD_RANK");
  std::optional<std::string> pmix = get(env, "PMIX_RANK");
  if (!ompi && !(pmix && !get(env, "SLURM_PROCID"))) return std::nullopt;
  Found f{{},
          ompi ? "OMPI_COMM_WORLD_RANK" : "PMIX_RANK",
          "OMPI_COMM_WORLD_SIZE",
          "OMPI_COMM_WORLD_LOCAL_RANK"};
  f.id.launcher = "mpirun";
  f.id.rank = parse_count(f.rank_var, ompi ? *ompi : *pmix);
  f.id.world_size = required(env, "OMPI_COMM_WORLD_SIZE", f.rank_var);
  f.id.local_rank = optional_count(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0);
  return f;
}

std::optional<Found> from_srun(const EnvReader& env) {
  std::optional<std::string> procid = get(env, "SLURM_PROCID");
  if (!procid) return std::nullopt;
  std::string size_var = get(env, "SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
  Found f{{}, "SLURM_PROCID", size_var, "SLURM_LOCALID"};
  f.id.launcher = "srun";
  f.id.rank = parse_count("SLURM_PROCID", *procid);
  f.id.world_size = required(env, size_var, "SLURM_PROCID");
  f.id.local_rank = optional_count(env, "SLURM_LOCALID", 0);
  f.id.job_id = get(env, "SLURM_JOB_ID").value_or("");
  return f;
}

std::optional<Found> from_torchrun(const EnvReader& env) {
  std::optional<std::string> rank = get(env, "RANK");
  if (!rank) return std::nullopt;
  Found f{{}, "RANK", "WORLD_SIZE", "LOCAL_RANK"};
  f.id.launcher = "torchrun";
  f.id.rank = parse_count("RANK", *rank);
  f.id.world_size = required(env, "WORLD_SIZE", "RANK");
  f.id.local_rank = optional_count(env, "LOCAL_RANK", 0);
  return f;
}

// MASTER_ADDR:MASTER_PORT, bracketing an IPv6 address; "" when neither is set.
std::string master_address(const EnvReader& env) {
  std::optional<std::string> addr = get(env, "MASTER_ADDR");
  std::optional<std::string> port = get(env, "MASTER_PORT");
  if (!addr && !port) return "";
  DTRAIN_CHECK(addr.has_value(), InvalidArgument, "MASTER_PORT is set but MASTER_ADDR is not");
  DTRAIN_CHECK(port.has_value(), InvalidArgument, "MASTER_ADDR is set but MASTER_PORT is not");
  int p = parse_count("MASTER_PORT", *port);
  DTRAIN_CHECK(p >= 1 && p <= 65535, InvalidArgument, "MASTER_PORT={} is not a TCP port (1-65535)",
               *port);
  bool v6 = addr->find(':') != std::string::npos && addr->front() != '[';
  return v6 ? fmt::format("[{}]:{}", *addr, p) : fmt::format("{}:{}", *addr, p);
}

}  // namespace

EnvReader process_env_reader() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

EnvReader map_env_reader(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

WorkerIdentity detect_worker_identity(const EnvReader& env) {
  std::optional<Found> found = from_dtrain(env);
  if (!found) found = from_mpirun(env);
  if (!found) found = from_srun(env);
  if (!found) found = from_torchrun(env);
  WorkerIdentity id = found ? found->id : WorkerIdentity{};

  if (found) {
    DTRAIN_CHECK(id.world_size >= 1, InvalidArgument, "{}=0: the world size must be at least 1",
                 found->size_var);
    DTRAIN_CHECK(id.rank < id.world_size, InvalidArgument,
                 "{}={} is out of range: {}={} allows ranks 0..{}", found->rank_var, id.rank,
                 found->size_var, id.world_size, id.world_size - 1);
    DTRAIN_CHECK(id.local_rank < id.world_size, InvalidArgument,
                 "{}={} is out of range: {}={} allows local ranks 0..{}", found->local_var,
                 id.local_rank, found->size_var, id.world_size, id.world_size - 1);
  }

  std::string master = master_address(env);
  std::optional<std::string> coordinator = get(env, "DTRAIN_COORDINATOR");
  id.coordinator = coordinator ? *coordinator : master;
  if (std::optional<std::string> job = get(env, "DTRAIN_JOB_ID")) id.job_id = *job;
  id.token = get(env, "DTRAIN_JOB_TOKEN").value_or("");
  return id;
}

std::string describe(const WorkerIdentity& id) {
  std::string s = fmt::format("rank {} of {} (local {}, via {}", id.rank, id.world_size,
                              id.local_rank, id.launcher);
  if (!id.coordinator.empty()) s += ", coordinator " + id.coordinator;
  if (!id.job_id.empty()) s += ", job " + id.job_id;
  return s + ")";
}

}  // namespace dtrain::cli
