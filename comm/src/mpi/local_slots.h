// The one-host collectives (shm/local_collective.h) for an MPI communicator whose
// ranks all share this host: each rank creates a shared-memory segment holding only
// its two slots, the ranks exchange the segment names with MPI_Iallgather, map each
// other's, and the owners unlink the names once everyone has mapped them. The same
// slots as the tcp backend's, so the mpi backend's small collectives on one node
// cost one copy in and a read of the peers' inputs instead of MPI messages.
//
// Every step is a collective of the communicator, waited for by `wait` (bounded by
// the caller's deadline); when any rank cannot create its segment, or not every
// rank is on this host, every rank gets nullptr and the backend keeps its other
// algorithms. Private to dtrain_comm_mpi.
#pragma once

#include <mpi.h>

#include <functional>
#include <memory>
#include <vector>

#include "dtrain/comm/mpi.h"
#include "shm/local_collective.h"
#include "shm/segment.h"

namespace dtrain::comm::mpi_detail {

struct LocalSlots {
  shm::Segment own;
  std::vector<shm::Segment> peers;  // kept mapped for the collectives' lifetime
  std::unique_ptr<shm::LocalCollectives> collectives;
};

// Waits for MPI requests (the communicator's bounded wait_collective).
using WaitRequests = std::function<void(std::vector<MPI_Request>, const char* what)>;

std::unique_ptr<LocalSlots> make_local_slots(const MpiRuntime& runtime, MPI_Comm comm, int rank,
                                             int size, size_t slot_bytes,
                                             const WaitRequests& wait_requests,
                                             shm::WaitUntil wait_until);

}  // namespace dtrain::comm::mpi_detail
