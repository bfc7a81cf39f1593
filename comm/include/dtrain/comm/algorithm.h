// Which algorithm runs a collective, chosen per call by message size.
//
//   local  one copy into a shared-memory slot, then every rank reads the others'
//          (ranks that all share one host; tcp backend; see shm/local_collective.h)
//   rd     recursive doubling (allreduce): log2(n) exchanges of the whole message,
//          for small messages between hosts; other collectives run the ring
//   native MPI's own collective (mpi backend)
//   direct single-copy collectives for ranks that all share one host (tcp backend):
//          each rank reads its peers' buffers straight from their address spaces
//          (process_vm_readv, Linux cross-memory attach), reduce-scatter then
//          all-gather; no staging copy through shared memory
//   ring   the pipelined ring (comm/ring.h): bandwidth-optimal, for large messages
//   hierarchical  (allreduce, chosen per job: `dtrain train --allreduce-algo
//          hierarchical` wraps the world in a HierarchicalCommunicator, hierarchical.h);
//          inside a backend it reads as auto
//   auto   by size, from the table below: on the mpi backend native from
//          native_min_bytes to native_max_bytes; else local up to local_max_bytes when
//          every rank is on this host; else direct in its window (allreduce 4-32 MiB,
//          allgather and reduce_scatter from 512 KiB, broadcast never) when every
//          rank is on this host and can read its peers' memory; else
//          up to small_max_bytes rd for allreduce and
//          native for the others (mpi backend); else ring.
//
// The thresholds are a table measured on the development VM with `dtrain bench
// allreduce` (2 ranks; docs/collectives.md), not a start-up probe: every rank must
// pick the same algorithm for the same call, and a probe's timings differ per rank.
// Overridden per collective by DTRAIN_ALLREDUCE_ALGO, DTRAIN_REDUCE_SCATTER_ALGO,
// DTRAIN_ALLGATHER_ALGO, DTRAIN_BROADCAST_ALGO (and `dtrain train --allreduce-algo`);
// the thresholds by DTRAIN_LOCAL_MAX_BYTES, DTRAIN_SMALL_MAX_BYTES,
// DTRAIN_NATIVE_MIN_BYTES, DTRAIN_NATIVE_MAX_BYTES, DTRAIN_DIRECT_MIN_BYTES,
// DTRAIN_ALLREDUCE_DIRECT_MIN_BYTES and DTRAIN_ALLREDUCE_DIRECT_MAX_BYTES. A forced
// algorithm that cannot run a call (local across hosts or above the slot size,
// native on tcp) runs the ring and says so in algorithm_for's `why`.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dtrain::comm {

enum class Algo { kAuto, kRing, kLocal, kRecursiveDoubling, kNative, kHierarchical, kDirect };
enum class Collective { kAllreduce, kReduceScatter, kAllgather, kBroadcast };

const char* algo_name(Algo algo);
const char* collective_name(Collective c);
// "auto", "ring", "local", "rd", "native", "hierarchical", "direct"; InvalidArgument naming
// `what` otherwise.
Algo parse_algo(std::string_view text, std::string_view what);

struct AlgoOptions {
  std::array<Algo, 4> algo{Algo::kAuto, Algo::kAuto, Algo::kAuto, Algo::kAuto};
  size_t local_max_bytes = 256 << 10;  // and the slot size of the local algorithm
  size_t small_max_bytes = 64 << 10;
  // mpi backend: MPI's own (guarded blocking) collective from native_min_bytes to
  // native_max_bytes, ahead of local and ring. Measured (comm/README.md): between the
  // slots (up to 256 KiB, ahead of MPI_Allreduce) and the ring (ahead from 2 MiB,
  // where Open MPI's large-message path collapses on this VM); at 512 KiB - 1 MiB our
  // ring and MPI_Allreduce are level within the noise.
  size_t native_min_bytes = 512 << 10;
  size_t native_max_bytes = 1 << 20;
  // allgather's window starts lower (per-rank block; MPI_Allgather measured 1.7x the
  // slots at 64-512 KiB blocks). reduce_scatter and broadcast have none: Open MPI's
  // MPI_Reduce_scatter_block measured 0.4x our ring at 512 KiB - 1 MiB, and broadcast
  // was not measured.
  size_t allgather_native_min_bytes = 16 << 10;
  // tcp backend, every rank on this host and the probe passed: `direct` for allgather
  // and reduce_scatter from this size (allgather's per-rank block, reduce_scatter's
  // input), and for allreduce from allreduce_direct_min_bytes to
  // allreduce_direct_max_bytes; broadcast only when forced (not measured). Measured on
  // the quiet development VM (2 ranks, comm/README.md, alternating runs): direct gave
  // allgather 3.1-12.3 GB/s busbw against the ring's 2.3-6.6 at 1-64 MiB gathered,
  // reduce_scatter 2.6-9.5 against 2.3-4.9. Allreduce, since it pushes each reduced
  // chunk to the peers (3 runs of `dtrain bench allreduce`): 19-20 GB/s against the
  // slots' and ring's 9-10 at 512 KiB - 1 MiB, 11-15 against 8-9 at 2-16 MiB, 6.1-6.8
  // against 5.4-5.7 at 64 MiB; level with the slots at 256 KiB.
  size_t direct_min_bytes = 512 << 10;
  size_t allreduce_direct_min_bytes = 512 << 10;
  size_t allreduce_direct_max_bytes = SIZE_MAX;

  Algo& operator[](Collective c) { return algo[static_cast<size_t>(c)]; }
  Algo operator[](Collective c) const { return algo[static_cast<size_t>(c)]; }
  // Defaults overridden by the environment variables above.
  static AlgoOptions from_env();
};

// What a backend can run for one call.
struct AlgoCapabilities {
  bool local = false;         // every rank shares this host's memory (slots mapped)
  bool native = false;        // mpi
  size_t local_capacity = 0;  // slot bytes
  bool direct = false;        // every rank on this host, each can read its peers' memory
};

// The algorithm for `bytes` (the largest buffer one rank places: allreduce's,
// allgather's per-rank block, reduce_scatter's whole input, broadcast's).
Algo algorithm_for(const AlgoOptions& o, Collective c, size_t bytes, const AlgoCapabilities& can);

}  // namespace dtrain::comm
