// Worker identity: which rank this process is, learned from whoever started it.
//
// Sources, first match wins:
//   dtrain    `dtrain launch`: DTRAIN_RANK, DTRAIN_WORLD_SIZE, DTRAIN_LOCAL_RANK
//             (default: the rank), DTRAIN_COORDINATOR
//   mpirun    Open MPI: OMPI_COMM_WORLD_RANK (or PMIX_RANK), OMPI_COMM_WORLD_SIZE,
//             OMPI_COMM_WORLD_LOCAL_RANK (default 0). PMIX_RANK alone counts only
//             outside a Slurm step (srun --mpi=pmix also sets it; srun's own
//             variables are used there).
//   srun      Slurm: SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS),
//             SLURM_LOCALID (default 0); the job id defaults to SLURM_JOB_ID.
//   torchrun  torchrun and the Kubernetes operators: RANK, WORLD_SIZE, LOCAL_RANK
//             (default 0: one worker per pod), MASTER_ADDR + MASTER_PORT.
//   none      a single process: rank 0 of 1.
// For every source, DTRAIN_COORDINATOR (else MASTER_ADDR:MASTER_PORT) gives the
// coordinator address, and DTRAIN_JOB_ID / DTRAIN_JOB_TOKEN the job id and token, so a
// user can add them to an mpirun or srun job. Empty variables count as unset.
//
// Inconsistent values (non-numeric, negative, rank >= world size, MASTER_ADDR without
// MASTER_PORT) throw InvalidArgument naming the variable and its value: a worker that
// guessed would hang at rendezvous instead.
//
// The environment is read through an EnvReader, never directly, so tests pass a map
// and there is no global state. Thread-safety: pure functions; process_env_reader()
// reads the process environment, which must not change concurrently.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>

namespace dtrain::cli {

// Looks a variable up; nullopt when unset.
using EnvReader = std::function<std::optional<std::string>(const std::string& name)>;

// Reads the process environment (getenv).
EnvReader process_env_reader();
// Reads a fixed table (tests).
EnvReader map_env_reader(std::map<std::string, std::string> vars);

struct WorkerIdentity {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string launcher = "none";  // "dtrain", "mpirun", "srun", "torchrun", "none"
  std::string coordinator;        // "host:port"; empty when none was given
  std::string job_id;             // empty when none was given
  std::string token;              // empty when none was given
};

// Throws InvalidArgument naming the offending variable (see the file comment).
WorkerIdentity detect_worker_identity(const EnvReader& env);

// "rank 1 of 4 (local 1, via mpirun, coordinator 10.0.0.1:29500)", for logs.
std::string describe(const WorkerIdentity& id);

}  // namespace dtrain::cli
