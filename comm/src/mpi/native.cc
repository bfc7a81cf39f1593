// NativeCollectives (see native.h).
#include "mpi/native.h"

#include <algorithm>
#include <utility>

namespace dtrain::comm::mpi_detail {
namespace {

// Reductions for f16/bf16: MPI has no 16-bit float types, so the buffers travel as
// MPI_UINT16_T and these user-defined ops combine them in float with the same
// arithmetic as the ring (comm::reduce_into). MPI calls them as inout = in op inout;
// every op here is commutative.
template <DType D, ReduceOp Op>
void reduce_16bit(void* in, void* inout, int* len, MPI_Datatype*) {
  reduce_into(inout, in, static_cast<size_t>(*len), D, Op);
}

}  // namespace

NativeCollectives::NativeCollectives(const MpiRuntime& runtime, MPI_Comm comm, int rank, int size,
                                     const AbortFlag& abort, Guard guard)
    : runtime_(runtime),
      comm_(comm),
      rank_(rank),
      size_(size),
      abort_(abort),
      guard_(std::move(guard)) {
  auto lock = runtime_.lock_mpi();
  try {
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::f16, ReduceOp::kSum>, 1, &ops16_[0][0]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::f16, ReduceOp::kMax>, 1, &ops16_[0][1]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::f16, ReduceOp::kMin>, 1, &ops16_[0][2]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::bf16, ReduceOp::kSum>, 1, &ops16_[1][0]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::bf16, ReduceOp::kMax>, 1, &ops16_[1][1]),
              "MPI_Op_create");
    MPI_CHECK(MPI_Op_create(&reduce_16bit<DType::bf16, ReduceOp::kMin>, 1, &ops16_[1][2]),
              "MPI_Op_create");
  } catch (...) {
    for (auto& row : ops16_) {
      for (MPI_Op& op : row) {
        if (op != MPI_OP_NULL) MPI_Op_free(&op);
      }
    }
    throw;
  }
}

NativeCollectives::~NativeCollectives() {
  auto lock = runtime_.lock_mpi();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  for (auto& row : ops16_) {
    for (MPI_Op& op : row) {
      if (op != MPI_OP_NULL) MPI_Op_free(&op);
    }
  }
}

MPI_Op NativeCollectives::op_of(DType dtype, ReduceOp op) const {
  const int col = op == ReduceOp::kMax ? 1 : op == ReduceOp::kMin ? 2 : 0;
  if (dtype == DType::f16) return ops16_[0][col];
  if (dtype == DType::bf16) return ops16_[1][col];
  return col == 1 ? MPI_MAX : col == 2 ? MPI_MIN : MPI_SUM;
}

void NativeCollectives::wait(MPI_Request req, Deadline d, const char* what) const {
  wait_requests(runtime_, abort_, rank_, {req}, d, what);
}

void NativeCollectives::guard(Deadline d, const char* what) const {
  if (guard_) return guard_(d);
  MPI_Request req = MPI_REQUEST_NULL;
  {
    auto lock = runtime_.lock_mpi();
    MPI_CHECK(MPI_Ibarrier(comm_, &req), "MPI_Ibarrier");
  }
  wait(req, d, what);
}

void NativeCollectives::check_count(size_t count, const char* op) const {
  DTRAIN_CHECK(count <= kMaxMpiCount, UnsupportedError,
               "mpi: {} of {} elements per rank exceeds MPI's int count limit ({}) in the "
               "native algorithm; use MpiAlgorithm::kRing",
               op, count, kMaxMpiCount);
}

// Elementwise collectives split counts above INT_MAX into several MPI calls.
void NativeCollectives::allreduce(void* data, size_t count, DType dtype, ReduceOp op, Deadline d,
                                  NativeMode mode) {
  if (count == 0) return;
  auto* p = static_cast<std::byte*>(data);
  const size_t es = dtype_size(dtype);
  std::vector<MPI_Request> reqs;
  if (mode == NativeMode::kGuarded) guard(d, "the guard (MPI_Ibarrier) of MPI_Allreduce");
  for (size_t off = 0; off < count; off += kMaxMpiCount) {
    const int n = static_cast<int>(std::min(kMaxMpiCount, count - off));
    auto lock = runtime_.lock_mpi();
    if (mode == NativeMode::kGuarded) {
      MPI_CHECK(
          MPI_Allreduce(MPI_IN_PLACE, p + off * es, n, datatype(dtype), op_of(dtype, op), comm_),
          "MPI_Allreduce");
      continue;
    }
    MPI_Request req = MPI_REQUEST_NULL;
    MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, p + off * es, n, datatype(dtype), op_of(dtype, op),
                             comm_, &req),
              "MPI_Iallreduce");
    reqs.push_back(req);
  }
  if (!reqs.empty()) wait_requests(runtime_, abort_, rank_, std::move(reqs), d, "MPI_Iallreduce");
  if (op == ReduceOp::kAvg) scale_in_place(data, count, dtype, 1.0 / size_);
}

void NativeCollectives::broadcast(void* data, size_t count, DType dtype, int root, Deadline d,
                                  NativeMode mode) {
  if (count == 0) return;
  auto* p = static_cast<std::byte*>(data);
  const size_t es = dtype_size(dtype);
  std::vector<MPI_Request> reqs;
  if (mode == NativeMode::kGuarded) guard(d, "the guard (MPI_Ibarrier) of MPI_Bcast");
  for (size_t off = 0; off < count; off += kMaxMpiCount) {
    const int n = static_cast<int>(std::min(kMaxMpiCount, count - off));
    auto lock = runtime_.lock_mpi();
    if (mode == NativeMode::kGuarded) {
      MPI_CHECK(MPI_Bcast(p + off * es, n, datatype(dtype), root, comm_), "MPI_Bcast");
      continue;
    }
    MPI_Request req = MPI_REQUEST_NULL;
    MPI_CHECK(MPI_Ibcast(p + off * es, n, datatype(dtype), root, comm_, &req), "MPI_Ibcast");
    reqs.push_back(req);
  }
  if (!reqs.empty()) wait_requests(runtime_, abort_, rank_, std::move(reqs), d, "MPI_Ibcast");
}

void NativeCollectives::allgather(const void* send, void* recv, size_t count, DType dtype,
                                  Deadline d, NativeMode mode) {
  if (count == 0) return;
  const int n = static_cast<int>(count);
  const MPI_Datatype t = datatype(dtype);
  if (mode == NativeMode::kGuarded) {
    guard(d, "the guard (MPI_Ibarrier) of MPI_Allgather");
    auto lock = runtime_.lock_mpi();
    MPI_CHECK(MPI_Allgather(send, n, t, recv, n, t, comm_), "MPI_Allgather");
    return;
  }
  MPI_Request req = MPI_REQUEST_NULL;
  {
    auto lock = runtime_.lock_mpi();
    MPI_CHECK(MPI_Iallgather(send, n, t, recv, n, t, comm_, &req), "MPI_Iallgather");
  }
  wait(req, d, "MPI_Iallgather");
}

void NativeCollectives::reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                                       ReduceOp op, Deadline d, NativeMode mode) {
  if (count == 0) return;
  const int n = static_cast<int>(count);
  if (mode == NativeMode::kGuarded) {
    guard(d, "the guard (MPI_Ibarrier) of MPI_Reduce_scatter_block");
    auto lock = runtime_.lock_mpi();
    MPI_CHECK(MPI_Reduce_scatter_block(send, recv, n, datatype(dtype), op_of(dtype, op), comm_),
              "MPI_Reduce_scatter_block");
  } else {
    MPI_Request req = MPI_REQUEST_NULL;
    {
      auto lock = runtime_.lock_mpi();
      MPI_CHECK(
          MPI_Ireduce_scatter_block(send, recv, n, datatype(dtype), op_of(dtype, op), comm_, &req),
          "MPI_Ireduce_scatter_block");
    }
    wait(req, d, "MPI_Ireduce_scatter_block");
  }
  if (op == ReduceOp::kAvg) scale_in_place(recv, count, dtype, 1.0 / size_);
}

void NativeCollectives::barrier(Deadline d) {
  MPI_Request req = MPI_REQUEST_NULL;
  {
    auto lock = runtime_.lock_mpi();
    MPI_CHECK(MPI_Ibarrier(comm_, &req), "MPI_Ibarrier");
  }
  wait(req, d, "MPI_Ibarrier");
}

}  // namespace dtrain::comm::mpi_detail
