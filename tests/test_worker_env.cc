// Worker identity detection (launcher/src/worker_env.h): a table of environments as
// each launcher sets them, the precedence between launchers, and the errors for
// inconsistent values (which must name the variable).
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "dtrain/common/error.h"
#include "worker_env.h"

namespace {

using dtrain::cli::detect_worker_identity;
using dtrain::cli::map_env_reader;
using dtrain::cli::WorkerIdentity;
using Env = std::map<std::string, std::string>;

struct Case {
  std::string what;
  Env env;
  WorkerIdentity want;
};

WorkerIdentity identity(int rank, int world, int local, std::string launcher,
                        std::string coordinator = "", std::string job = "",
                        std::string token = "") {
  WorkerIdentity id;
  id.rank = rank;
  id.world_size = world;
  id.local_rank = local;
  id.launcher = std::move(launcher);
  id.coordinator = std::move(coordinator);
  id.job_id = std::move(job);
  id.token = std::move(token);
  return id;
}

TEST(WorkerEnv, DetectsEachLauncher) {
  const std::vector<Case> cases = {
      {"empty environment: one process", {}, identity(0, 1, 0, "none")},
      {"unrelated variables only",
       {{"HOME", "/root"}, {"PATH", "/bin"}},
       identity(0, 1, 0, "none")},
      {"dtrain launch",
       {{"DTRAIN_RANK", "2"},
        {"DTRAIN_WORLD_SIZE", "4"},
        {"DTRAIN_LOCAL_RANK", "2"},
        {"DTRAIN_COORDINATOR", "127.0.0.1:4100"},
        {"DTRAIN_JOB_ID", "job-7"},
        {"DTRAIN_JOB_TOKEN", "s3cret"}},
       identity(2, 4, 2, "dtrain", "127.0.0.1:4100", "job-7", "s3cret")},
      {"dtrain launch without a local rank: local = rank",
       {{"DTRAIN_RANK", "1"}, {"DTRAIN_WORLD_SIZE", "2"}},
       identity(1, 2, 1, "dtrain")},
      {"mpirun (Open MPI)",
       {{"OMPI_COMM_WORLD_RANK", "3"},
        {"OMPI_COMM_WORLD_SIZE", "8"},
        {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
        {"PMIX_RANK", "3"}},
       identity(3, 8, 1, "mpirun")},
      {"mpirun with the coordinator exported (-x DTRAIN_COORDINATOR)",
       {{"OMPI_COMM_WORLD_RANK", "0"},
        {"OMPI_COMM_WORLD_SIZE", "2"},
        {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
        {"DTRAIN_COORDINATOR", "node1:4000"}},
       identity(0, 2, 0, "mpirun", "node1:4000")},
      {"PMIx rank with Open MPI's size",
       {{"PMIX_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}},
       identity(1, 2, 0, "mpirun")},
      {"srun",
       {{"SLURM_PROCID", "5"},
        {"SLURM_NTASKS", "8"},
        {"SLURM_LOCALID", "1"},
        {"SLURM_JOB_ID", "12345"},
        {"MASTER_ADDR", "node01"},
        {"MASTER_PORT", "29500"}},
       identity(5, 8, 1, "srun", "node01:29500", "12345")},
      {"srun step size wins over the allocation's task count",
       {{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "16"}, {"SLURM_STEP_NUM_TASKS", "2"}},
       identity(1, 2, 0, "srun")},
      {"srun --mpi=pmix also sets PMIX_RANK: srun's variables are used",
       {{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}, {"PMIX_RANK", "1"}},
       identity(1, 2, 0, "srun")},
      {"torchrun",
       {{"RANK", "3"},
        {"WORLD_SIZE", "4"},
        {"LOCAL_RANK", "1"},
        {"MASTER_ADDR", "10.0.0.1"},
        {"MASTER_PORT", "29500"}},
       identity(3, 4, 1, "torchrun", "10.0.0.1:29500")},
      {"Kubernetes PyTorchJob (no LOCAL_RANK: one worker per pod)",
       {{"RANK", "1"},
        {"WORLD_SIZE", "2"},
        {"MASTER_ADDR", "job-master-0"},
        {"MASTER_PORT", "23456"}},
       identity(1, 2, 0, "torchrun", "job-master-0:23456")},
      {"IPv6 MASTER_ADDR is bracketed",
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "fd00::1"}, {"MASTER_PORT", "29500"}},
       identity(0, 2, 0, "torchrun", "[fd00::1]:29500")},
      {"DTRAIN_COORDINATOR overrides MASTER_ADDR",
       {{"RANK", "0"},
        {"WORLD_SIZE", "2"},
        {"MASTER_ADDR", "a"},
        {"MASTER_PORT", "1"},
        {"DTRAIN_COORDINATOR", "b:2"}},
       identity(0, 2, 0, "torchrun", "b:2")},
      {"dtrain launch wins over an enclosing srun and torchrun",
       {{"DTRAIN_RANK", "0"},
        {"DTRAIN_WORLD_SIZE", "3"},
        {"SLURM_PROCID", "4"},
        {"SLURM_NTASKS", "8"},
        {"RANK", "7"},
        {"WORLD_SIZE", "9"}},
       identity(0, 3, 0, "dtrain")},
      {"mpirun wins over the enclosing Slurm batch step",
       {{"OMPI_COMM_WORLD_RANK", "1"},
        {"OMPI_COMM_WORLD_SIZE", "2"},
        {"SLURM_PROCID", "0"},
        {"SLURM_NTASKS", "1"}},
       identity(1, 2, 0, "mpirun")},
      {"empty variables count as unset",
       {{"DTRAIN_RANK", ""}, {"RANK", ""}},
       identity(0, 1, 0, "none")},
      {"a single process with a coordinator and a token",
       {{"DTRAIN_COORDINATOR", "localhost:9"}, {"DTRAIN_JOB_TOKEN", "t"}},
       identity(0, 1, 0, "none", "localhost:9", "", "t")},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    WorkerIdentity got = detect_worker_identity(map_env_reader(c.env));
    EXPECT_EQ(got.rank, c.want.rank);
    EXPECT_EQ(got.world_size, c.want.world_size);
    EXPECT_EQ(got.local_rank, c.want.local_rank);
    EXPECT_EQ(got.launcher, c.want.launcher);
    EXPECT_EQ(got.coordinator, c.want.coordinator);
    EXPECT_EQ(got.job_id, c.want.job_id);
    EXPECT_EQ(got.token, c.want.token);
  }
}

struct BadCase {
  std::string what;
  Env env;
  std::vector<std::string> must_mention;
};

TEST(WorkerEnv, InconsistentValuesNameTheVariable) {
  const std::vector<BadCase> cases = {
      {"rank equal to the world size",
       {{"DTRAIN_RANK", "4"}, {"DTRAIN_WORLD_SIZE", "4"}},
       {"DTRAIN_RANK=4", "DTRAIN_WORLD_SIZE=4"}},
      {"non-numeric rank", {{"RANK", "one"}, {"WORLD_SIZE", "2"}}, {"RANK=one"}},
      {"trailing junk", {{"SLURM_PROCID", "1x"}, {"SLURM_NTASKS", "2"}}, {"SLURM_PROCID=1x"}},
      {"negative size",
       {{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "-2"}},
       {"OMPI_COMM_WORLD_SIZE=-2"}},
      {"zero world size", {{"RANK", "0"}, {"WORLD_SIZE", "0"}}, {"WORLD_SIZE"}},
      {"huge value", {{"RANK", "99999999999999999999"}, {"WORLD_SIZE", "2"}}, {"RANK="}},
      {"rank without a size", {{"DTRAIN_RANK", "0"}}, {"DTRAIN_WORLD_SIZE"}},
      {"Slurm rank without a task count", {{"SLURM_PROCID", "0"}}, {"SLURM_NTASKS"}},
      {"mpirun local rank out of range",
       {{"OMPI_COMM_WORLD_RANK", "0"},
        {"OMPI_COMM_WORLD_SIZE", "2"},
        {"OMPI_COMM_WORLD_LOCAL_RANK", "2"}},
       {"OMPI_COMM_WORLD_LOCAL_RANK=2"}},
      {"MASTER_ADDR without MASTER_PORT",
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}},
       {"MASTER_PORT"}},
      {"MASTER_PORT out of range",
       {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}},
       {"MASTER_PORT=70000"}},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.what);
    try {
      detect_worker_identity(map_env_reader(c.env));
      ADD_FAILURE() << "expected InvalidArgument";
    } catch (const dtrain::InvalidArgument& e) {
      for (const std::string& m : c.must_mention) {
        EXPECT_NE(e.message().find(m), std::string::npos) << e.message() << " lacks " << m;
      }
    }
  }
}

TEST(WorkerEnv, ProcessEnvReaderReadsTheEnvironment) {
  ::setenv("DTRAIN_TEST_WORKER_ENV_PROBE", "42", 1);
  auto env = dtrain::cli::process_env_reader();
  EXPECT_EQ(env("DTRAIN_TEST_WORKER_ENV_PROBE").value_or(""), "42");
  EXPECT_FALSE(env("DTRAIN_TEST_WORKER_ENV_SURELY_UNSET").has_value());
  ::unsetenv("DTRAIN_TEST_WORKER_ENV_PROBE");
}

TEST(WorkerEnv, DescribeNamesRankAndLauncher) {
  std::string s = dtrain::cli::describe(identity(1, 4, 1, "mpirun", "10.0.0.1:29500"));
  EXPECT_EQ(s, "rank 1 of 4 (local 1, via mpirun, coordinator 10.0.0.1:29500)");
}

}  // namespace
