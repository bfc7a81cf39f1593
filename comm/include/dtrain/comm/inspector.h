// InspectedCommunicator: the stall and desync inspector, a decorator over any Communicator.
//
// Every collective issued through it (allreduce, broadcast, allgather, reduce_scatter,
// barrier, split) gets a sequence number (#1, #2, ... per communicator, the same on every
// rank when the ranks agree) and a name (Communicator::name_next, e.g. DDP's "bucket 3
// (grads of fc1.weight ..)"; unnamed ones show as "allreduce #17"). Point-to-point calls
// pass through unnumbered.
//
// Stall watchdog (stall_timeout > 0): a thread publishes this rank's progress (the last
// collective it entered, when, and whether it still waits) to the Store every
// stall_timeout / 4 (at most every 5 s). When this rank's oldest collective has been
// pending longer than stall_timeout, it reads every rank's progress and logs one line per
// rank, e.g.
//   stall: rank 0 waits in allreduce #17 'bucket 3' for 5.0 s (allreduce(avg) of 1024 f32)
//   stall: rank 1 has not entered #17: its last collective is #16 'bucket 2', entered 4.1 s ago
// then aborts the communicator with a one-line summary, so every pending and later call on
// every rank fails with CommError carrying it. Without a Store only this rank's line is known.
//
// Desync check (check_collectives): before each collective the ranks all-gather an
// 80-byte fingerprint (seq, op, reduce op, count, dtype, root, name) over a separate
// "checker" communicator, so that the check does not wait for the data queue (DDP's overlap
// stays); a difference throws InvalidArgument naming both sides, before any data moves:
//   collective mismatch at #17 in group world: rank 0 calls allreduce(avg) of 1024 f32
//   'bucket 3', rank 1 calls allreduce(avg) of 512 f32 'bucket 2'
// and aborts the communicator with it. It costs one small all-gather per collective, paid
// by the issuing thread (a debugging mode, like TORCH_DISTRIBUTED_DEBUG=DETAIL).
//
// Not done here: the collectives themselves (the inner communicator runs them), timing
// statistics, or a flight-recorder dump of past collectives.
//
// Thread-safety: as Communicator (one issuing thread; abort() from any thread). The
// watchdog thread only reads this rank's bookkeeping (under a mutex) and the Store.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dtrain/comm/communicator.h"
#include "dtrain/comm/store.h"

namespace dtrain::comm {

struct InspectorOptions {
  // A collective pending longer than this is a stall (reported, then the communicator is
  // aborted). 0: no watchdog thread.
  std::chrono::milliseconds stall_timeout{0};
  // All-gather a fingerprint before every collective; a mismatch is an error naming both sides.
  bool check_collectives = false;
  // Names this communicator in reports and in its Store keys ("inspect/<group>/progress/<rank>");
  // ranks of one communicator must agree. split() children get "<group>/split<n>/c<color>".
  std::string group = "world";
  // Where stall report lines go; empty: stderr.
  std::function<void(const std::string&)> log;
  // Fault injection for tests (DTRAIN_TEST_STALL_AT): this rank holds before entering
  // collective #test_hold_at (as a rank stuck in its data loader would) until this
  // communicator is aborted or its timeout passes, then enters it. 0: never.
  uint64_t test_hold_at = 0;
};

// Wraps `inner`. `store` (may be null: no cross-rank stall report) must outlive the result and
// its children, and be shared by the ranks. `checker` carries the fingerprints when
// check_collectives is on; null: inner->split(0, rank), which needs a host-memory backend
// (for nccl pass a tcp communicator of the same ranks). Collective over the ranks of inner
// (it may split). Throws UnsupportedError for check_collectives over nccl without a checker.
std::unique_ptr<Communicator> make_inspected_communicator(
    std::unique_ptr<Communicator> inner, Store* store, InspectorOptions options,
    std::unique_ptr<Communicator> checker = nullptr);

}  // namespace dtrain::comm
