// The mpi backend's one-host slots (see local_slots.h).
#include "mpi/local_slots.h"

#include <unistd.h>

#include <array>
#include <cstring>
#include <random>
#include <string>

#include "mpi/mpi_internal.h"

namespace dtrain::comm::mpi_detail {
namespace {

constexpr size_t kIdBytes = 512;  // host identity, or a segment name, NUL padded

std::array<char, kIdBytes> padded(const std::string& text) {
  std::array<char, kIdBytes> out{};
  std::memcpy(out.data(), text.data(), std::min(text.size(), kIdBytes - 1));
  return out;
}

// Every rank's `mine`, gathered.
std::vector<std::array<char, kIdBytes>> gather(const MpiRuntime& runtime, MPI_Comm comm, int size,
                                               const std::array<char, kIdBytes>& mine,
                                               const WaitRequests& wait, const char* what) {
  std::vector<std::array<char, kIdBytes>> all(static_cast<size_t>(size));
  MPI_Request req = MPI_REQUEST_NULL;
  {
    auto lock = runtime.lock_mpi();
    MPI_CHECK(MPI_Iallgather(mine.data(), static_cast<int>(kIdBytes), MPI_CHAR, all.data(),
                             static_cast<int>(kIdBytes), MPI_CHAR, comm, &req),
              "MPI_Iallgather");
  }
  wait({req}, what);
  return all;
}

// Whether every rank said yes.
bool everyone(const MpiRuntime& runtime, MPI_Comm comm, bool mine, const WaitRequests& wait,
              const char* what) {
  int in = mine ? 1 : 0, out = 0;
  MPI_Request req = MPI_REQUEST_NULL;
  {
    auto lock = runtime.lock_mpi();
    MPI_CHECK(MPI_Iallreduce(&in, &out, 1, MPI_INT, MPI_MIN, comm, &req), "MPI_Iallreduce");
  }
  wait({req}, what);
  return out == 1;
}

}  // namespace

std::unique_ptr<LocalSlots> make_local_slots(const MpiRuntime& runtime, MPI_Comm comm, int rank,
                                             int size, size_t slot_bytes,
                                             const WaitRequests& wait_requests,
                                             shm::WaitUntil wait_until) {
  if (size < 2 || slot_bytes == 0) return nullptr;
  const auto hosts = gather(runtime, comm, size, padded(shm::host_identity()), wait_requests,
                            "MPI_Iallgather (host identities)");
  for (const auto& h : hosts) {
    if (h != hosts[0]) return nullptr;  // the same answer on every rank
  }
  auto slots = std::make_unique<LocalSlots>();
  const uint64_t nonce = std::random_device{}() * 0x9e3779b97f4a7c15ull ^ std::random_device{}();
  const std::string name = "/dtrain-mpi-" + std::to_string(::getpid()) + "-r" +
                           std::to_string(rank) + "-" + std::to_string(nonce);
  bool ok = true;
  try {
    slots->own =
        shm::Segment::create(name, rank, size, nonce, {}, 4096, (slot_bytes + 4095) / 4096 * 4096);
  } catch (const CommError&) {
    ok = false;  // every rank learns it below and keeps the other algorithms
  }
  if (!everyone(runtime, comm, ok, wait_requests, "MPI_Iallreduce (shared-memory slots)")) {
    return nullptr;
  }
  const auto names = gather(runtime, comm, size, padded(std::to_string(nonce) + "@" + name),
                            wait_requests, "MPI_Iallgather (slot names)");
  std::vector<shm::Slots> all(static_cast<size_t>(size));
  // No doorbells: these waits poll (Poll) and never sleep on one, so ringing would
  // only cost a locked instruction per peer and collective.
  std::vector<shm::Doorbell> bells(static_cast<size_t>(size));
  for (int p = 0; p < size; ++p) {
    if (p == rank) continue;
    const std::string entry(names[static_cast<size_t>(p)].data());
    const size_t at = entry.find('@');
    const uint64_t peer_nonce = std::stoull(entry.substr(0, at));
    slots->peers.push_back(shm::Segment::open(entry.substr(at + 1), p, size, peer_nonce));
    all[static_cast<size_t>(p)] = slots->peers.back().slots();
  }
  everyone(runtime, comm, true, wait_requests, "MPI_Iallreduce (slots mapped)");
  slots->own.unlink();  // every peer has it mapped: nothing stays in /dev/shm
  all[static_cast<size_t>(rank)] = slots->own.slots();
  slots->collectives = std::make_unique<shm::LocalCollectives>(
      rank, std::move(all), std::move(bells), std::move(wait_until));
  return slots;
}

}  // namespace dtrain::comm::mpi_detail
