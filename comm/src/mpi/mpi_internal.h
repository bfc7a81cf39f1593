// Helpers shared by the mpi backend's sources (comm/src/mpi/): the MPI_CHECK macro that
// turns an MPI error code into a CommError carrying file and line, and the mapping
// from dtrain::DType to MPI datatypes. Private to dtrain_comm_mpi.
#pragma once

#include <mpi.h>

#include "dtrain/common/dtype.h"

namespace dtrain::comm::mpi_detail {

// Throws CommError("<what> failed: <MPI error string>") when rc != MPI_SUCCESS.
void check(int rc, const char* what, const char* file, int line);

// The MPI datatype that carries `dtype`: basic types for f32/f64/i32/i64/u8, and
// MPI_UINT16_T for f16/bf16 (reduced by user-defined ops, see communicator.cc).
MPI_Datatype datatype(DType dtype);

}  // namespace dtrain::comm::mpi_detail

// MPI_CHECK(MPI_Isend(...), "MPI_Isend");
#define MPI_CHECK(call, what) ::dtrain::comm::mpi_detail::check((call), (what), __FILE__, __LINE__)
