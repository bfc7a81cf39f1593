// MPI's own collectives for the mpi backend (MpiAlgorithm::kNative, and the auto
// table's `native` picks), in two forms:
//
//   kNonBlocking  MPI_Iallreduce, MPI_Ibcast, MPI_Iallgather, MPI_Ireduce_scatter_block,
//                 polled (wait_requests) against the deadline and the abort flag. In
//                 Open MPI these run libnbc's schedules, which are slower than the
//                 blocking collectives' tuned algorithms (coll/tuned) at most sizes.
//   kGuarded      an MPI_Ibarrier polled the same way (the guard: it times out or is
//                 aborted like any wait), then the blocking collective (MPI_Allreduce,
//                 MPI_Bcast, MPI_Allgather, MPI_Reduce_scatter_block). A rank passes the
//                 guard only once every rank has entered this collective, so the
//                 blocking call cannot wait for a rank that skipped it: timeouts, abort()
//                 and the stall inspector fire in the guard, as on the other paths. The
//                 blocking call itself cannot be interrupted; a rank that dies after the
//                 guard leaves its peers inside it until mpirun ends the job (which is
//                 what mpirun does when a process dies). One narrow race remains: a rank
//                 whose deadline passes in the same microsecond as the last rank enters
//                 the guard fails while its peers go on into the blocking call; that
//                 rank's error then ends the job. Only under MPI_THREAD_MULTIPLE: under
//                 SERIALIZED the process-wide MPI mutex would be held for the whole
//                 blocking call and two communicators could deadlock each other.
//
// f32/f64/i32/i64/u8 map to MPI's basic types; f16 and bf16 travel as MPI_UINT16_T and
// reduce through user-defined MPI_Ops that call comm::reduce_into (combine in float).
// kAvg = MPI_SUM, then one scale_in_place by 1/size. Counts above INT_MAX run as several
// MPI calls (allreduce, broadcast); allgather and reduce_scatter refuse them
// (check_count). Thread-safety: REQUIRES external synchronization (the communicator's
// worker or inline caller). Private to dtrain_comm_mpi.
#pragma once

#include <mpi.h>

#include <functional>

#include "dtrain/comm/communicator.h"
#include "mpi/transport.h"

namespace dtrain::comm::mpi_detail {

enum class NativeMode { kNonBlocking, kGuarded };

class NativeCollectives {
 public:
  // The guard: every rank of the communicator has entered (bounded by the deadline).
  using Guard = std::function<void(Deadline)>;
  // Creates the 16-bit reduction ops (freed by the destructor, before MPI_Finalize).
  // `guard`: a cheaper barrier than MPI_Ibarrier (the shared-memory slots' when every
  // rank is on this node); empty: MPI_Ibarrier.
  NativeCollectives(const MpiRuntime& runtime, MPI_Comm comm, int rank, int size,
                    const AbortFlag& abort, Guard guard = {});
  ~NativeCollectives();
  NativeCollectives(const NativeCollectives&) = delete;
  NativeCollectives& operator=(const NativeCollectives&) = delete;

  void allreduce(void* data, size_t count, DType dtype, ReduceOp op, Deadline d, NativeMode mode);
  void broadcast(void* data, size_t count, DType dtype, int root, Deadline d, NativeMode mode);
  void allgather(const void* send, void* recv, size_t count, DType dtype, Deadline d,
                 NativeMode mode);
  void reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                      Deadline d, NativeMode mode);
  void barrier(Deadline d);

  // UnsupportedError when `count` elements per rank exceed MPI's int count.
  void check_count(size_t count, const char* op) const;

 private:
  MPI_Op op_of(DType dtype, ReduceOp op) const;
  void wait(MPI_Request req, Deadline d, const char* what) const;
  void guard(Deadline d, const char* what) const;

  const MpiRuntime& runtime_;
  MPI_Comm comm_;
  int rank_, size_;
  const AbortFlag& abort_;
  Guard guard_;
  MPI_Op ops16_[2][3] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                         {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};  // [f16, bf16][sum, max, min]
};

}  // namespace dtrain::comm::mpi_detail
