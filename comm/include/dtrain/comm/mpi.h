// The mpi backend: the Communicator interface over Open MPI, for jobs started by mpirun.
//
// Two algorithms, chosen per communicator (MpiOptions::algorithm):
//   kRing    dtrain's own ring collectives (comm/ring.h, the code the tcp backend runs)
//            over MPI point-to-point (MPI_Isend/MPI_Irecv). Every dtype and op the tcp
//            backend handles, with the same arithmetic.
//   kNative  MPI's own collectives: under MPI_THREAD_MULTIPLE the blocking ones
//            (MPI_Allreduce, MPI_Bcast, MPI_Allgather, MPI_Reduce_scatter_block: Open
//            MPI's tuned algorithms) behind a polled barrier guard, else the
//            non-blocking ones (MPI_Iallreduce, ...; src/mpi/native.h). f32/f64/i32/i64/u8
//            map to MPI's basic types; f16 and bf16 travel as MPI_UINT16_T and reduce
//            through user-defined MPI_Ops that call comm::reduce_into (combine in float),
//            so both algorithms support every dtype. kAvg = MPI_SUM, then one
//            scale_in_place by 1/size.
//
// Timeouts: MPI calls never time out by themselves, so every operation is started with
// non-blocking MPI calls (the blocking native collectives only once every rank has
// passed the polled guard) and its requests are polled (MPI_Test) against the deadline
// (CommOptions::timeout from the moment the operation starts running). When the deadline
// passes the operation fails with TimeoutError; abort() fails the running operation
// within one poll and every queued one with CommError; later calls throw CommError at
// once. Either failure leaves the communicator aborted (a half-finished ring cannot be
// resumed). Pending receives are cancelled; MPI cannot cancel sends or collectives, so
// those stay in flight inside MPI: keep the buffers of a failed operation alive until
// the process ends (which is what a job started by mpirun does after a comm failure: a
// lost process takes the whole job down, so recovery happens by restarting the job).
// abort() never kills the process unless MpiOptions::mpi_abort_on_abort asks for
// MPI_Abort.
//
// Threading: each communicator runs its operations in issue order on one worker thread
// (the async Work; a blocking collective on an idle communicator runs on the calling
// thread instead), so MPI is called from a thread that is not the one that initialised
// it. MpiRuntime therefore asks for MPI_THREAD_MULTIPLE (several communicators, and the
// application, may call MPI at the same time). If MPI was already initialised by the
// application with MPI_THREAD_SERIALIZED, dtrain serialises its own MPI calls with one
// mutex per process (the application must then not call MPI concurrently with dtrain);
// FUNNELED or SINGLE is refused with UnsupportedError.
//
// Lifetime: MpiRuntime is the RAII guard of MPI itself. It calls MPI_Init_thread when MPI
// is not initialised yet and then MPI_Finalize when the last owner lets go of it; when
// the application initialised MPI itself, dtrain never finalises it. Every communicator
// holds a shared_ptr to its runtime, so MPI outlives the communicators made from it.
//
// split(): MPI_Comm_split on the communicator's MPI_Comm, after an all-gather of the
// (color, key) pairs that is bounded by the timeout; the child owns its MPI_Comm and
// shares the MpiRuntime, the options and the timeout.
//
// Not here: fault recovery (mpirun aborts the job when a process dies).
#pragma once

#include <memory>
#include <mutex>

#include "dtrain/comm/algorithm.h"
#include "dtrain/comm/communicator.h"
#include "dtrain/comm/ring.h"

namespace dtrain::comm {

enum class MpiAlgorithm {
  kRing,    // dtrain's ring algorithms over MPI point-to-point
  kNative,  // MPI's own collectives
  kAuto,    // per call by size (algorithm.h): slots / rd / native / ring
};
const char* mpi_algorithm_name(MpiAlgorithm algo);

struct MpiOptions {
  MpiAlgorithm algorithm = MpiAlgorithm::kRing;
  // kAuto's table and per-collective overrides (native or ring; others run the ring).
  AlgoOptions algos;
  // When true, abort() also calls MPI_Abort on the communicator, which terminates every
  // process of the job. Off by default: library code does not kill the process.
  bool mpi_abort_on_abort = false;
  // The exit code MPI_Abort hands to mpirun when mpi_abort_on_abort is set.
  int mpi_abort_exit_code = 1;
  // Chunking of the pipelined ring (kRing); must be the same on every rank.
  RingOptions ring;
  // Native collectives as MPI's blocking ones behind an MPI_Ibarrier guard (faster in
  // Open MPI than its non-blocking ones; src/mpi/native.h) under MPI_THREAD_MULTIPLE;
  // false (DTRAIN_MPI_NATIVE_BLOCKING=0) keeps MPI_Iallreduce and friends. Must be the
  // same on every rank.
  bool native_blocking = true;
};

// The process's MPI environment (init/finalize guard).
// Thread-safety: all methods are safe to call from any thread.
class MpiRuntime {
 public:
  // Returns the process's runtime. The first call initialises MPI (MPI_Init_thread,
  // MPI_THREAD_MULTIPLE) unless the application already did; later calls return the
  // same object while it is alive. Throws CommError when MPI was already finalised (MPI
  // cannot be initialised twice) and UnsupportedError when the thread level is too low.
  static std::shared_ptr<MpiRuntime> init();

  ~MpiRuntime();  // MPI_Finalize, when this object initialised MPI
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  // MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE.
  int thread_level() const { return thread_level_; }
  // True when this object called MPI_Init_thread and will call MPI_Finalize.
  bool owns_mpi() const { return owns_mpi_; }

  // Terminates every process of the job (MPI_Abort on MPI_COMM_WORLD). Only for callers
  // that explicitly want that; dtrain itself never calls it.
  [[noreturn]] void abort_job(int exit_code) const;

  // Held around every MPI call dtrain makes. Empty (no locking) under
  // MPI_THREAD_MULTIPLE; a process-wide mutex under MPI_THREAD_SERIALIZED.
  std::unique_lock<std::mutex> lock_mpi() const;

 private:
  MpiRuntime();  // use init()

  bool owns_mpi_ = false;
  int thread_level_ = 0;
  int world_rank_ = 0;
  int world_size_ = 1;
  mutable std::mutex serialize_mu_;
};

// A communicator over all processes of MPI_COMM_WORLD (duplicated, so its traffic never
// mixes with the application's), rank and size from it. Creating it is collective: every
// process must call it, in the same order relative to other communicator creations.
// Throws TimeoutError when the other processes do not join within opts.timeout.
std::unique_ptr<Communicator> make_mpi_communicator(std::shared_ptr<MpiRuntime> runtime,
                                                    CommOptions opts, MpiOptions mpi = {});

// Convenience form: takes MpiRuntime::init() itself. When this initialised MPI, the
// communicator is the runtime's only owner and MPI is finalised when it is destroyed;
// hold an MpiRuntime yourself (from main) to create several communicators over time.
std::unique_ptr<Communicator> make_mpi_communicator(CommOptions opts,
                                                    MpiAlgorithm algo = MpiAlgorithm::kRing);

}  // namespace dtrain::comm
