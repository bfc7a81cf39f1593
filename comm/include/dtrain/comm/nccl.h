// The nccl backend: the Communicator interface over NCCL, one process (rank) per GPU.
//
// Buffers are device pointers on NcclOptions::device. Collectives run on a dedicated
// communication stream that is ordered against the caller's compute stream with
// events: each operation first waits for the work already queued on the compute stream
// (which produced the buffer), and the compute stream waits for the operation before
// anything queued after it (which consumes the result), so the host never has to
// synchronise the GPU to keep the order. Work::wait() additionally blocks the calling
// thread until the operation has finished on the GPU.
//
// Bootstrap: rank 0 creates the ncclUniqueId and publishes it in the Store (the
// coordinator's key-value service, a FileStore, or -- under mpirun -- any store the
// ranks share) under "nccl/unique_id"; the other ranks read it from there.
//
// Timeouts and failures: the communicator is created non-blocking and every wait polls
// ncclCommGetAsyncError against CommOptions::timeout. A timeout, an asynchronous NCCL
// error (a lost peer, a network error) or abort() calls ncclCommAbort, so no rank hangs
// in a collective; the pending operation fails with TimeoutError or CommError and every
// later call with CommError. dtypes: all of dtrain's (f16 and bf16 reduce natively);
// ReduceOp::kAvg is ncclAvg.
//
// Environment: NCCL reads NCCL_DEBUG=INFO (diagnostics), NCCL_SOCKET_IFNAME (the
// network interface for bootstrap and sockets), NCCL_IB_DISABLE and friends itself.
//
// Thread-safety: as Communicator (one issuing thread; abort() from any thread).
#pragma once

#include <memory>

#include "dtrain/comm/communicator.h"
#include "dtrain/comm/store.h"

namespace dtrain::comm {

struct NcclOptions {
  int device = 0;                  // the CUDA device of this rank
  void* compute_stream = nullptr;  // cudaStream_t that produces/consumes the buffers
                                   // (nullptr: the legacy default stream)
  CommOptions comm;
};

// Throws UnsupportedError "nccl: no CUDA device: <driver's error>" without a device (or
// when dtrain was built without CUDA), TimeoutError when the peers do not all join
// within options.comm.timeout, CommError for any other NCCL failure.
std::unique_ptr<Communicator> make_nccl_communicator(Store& store, int rank, int size,
                                                     const NcclOptions& options);

}  // namespace dtrain::comm
