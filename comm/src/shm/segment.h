// shm: the shared-memory pieces of the tcp backend's fast path for ranks on one host.
//
// Each rank that has same-host peers owns one Segment (POSIX shm_open + mmap): a
// header, a doorbell, and one single-producer single-consumer ByteRing per same-host
// peer, in which that peer writes the bytes it sends to the owner. A rank therefore
// reads from its own segment and writes into its peers' segments; every rank maps
// the segments of all its same-host peers. The owner unlinks the name as soon as
// every peer has mapped it (Segment::unlink), so nothing is left in /dev/shm even
// when a process is killed later; the creator's destructor unlinks it on failure.
//
// ByteRing: head (bytes ever written, advanced by the producer with release) and tail
// (bytes ever consumed, advanced by the consumer with release) on separate cache
// lines, and `capacity` bytes of data. Messages start 8-byte aligned (each message is
// padded to a multiple of 8), and head/tail only move in multiples of 8, so an
// element of any dtype never straddles the wrap and a consumer can reduce the
// incoming bytes straight from the ring into its destination (no scratch copy).
// Callers must post receives of exactly the sizes the peer sends (PointToPoint's
// contract), because the padding belongs to the message.
//
// Doorbell: a futex word and a "sleeping" flag in the owner's segment. Whoever
// changes a ring the owner waits on (new data for it, or space freed in a ring it
// writes to) rings the owner's bell; the owner arms the bell, re-checks its rings,
// and only then sleeps in FUTEX_WAIT (shared, not private: the waker is another
// process), bounded by a short timeout so it also notices its control sockets.
//
// Deliberately not here: which peers share a host, failure handling, the request
// queues (tcp/transport.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/comm/communicator.h"

namespace dtrain::comm::shm {

// Every message occupies a multiple of this many bytes in a ring.
constexpr size_t kAlign = 8;
inline size_t padded(size_t bytes) { return (bytes + kAlign - 1) & ~(kAlign - 1); }

// Identifies "processes that can share /dev/shm": the boot id, the mount and IPC
// namespaces and the host name. Two ranks with equal identities use shared memory.
std::string host_identity();

// One direction of a link: a view into a mapping. Producer calls from one thread,
// consumer calls from one thread (possibly in another process).
class ByteRing {
 public:
  ByteRing() = default;
  ByteRing(uint64_t* head, uint64_t* tail, std::byte* data, size_t capacity)
      : head_(head), tail_(tail), data_(data), cap_(capacity) {}
  bool valid() const { return data_ != nullptr; }

  // Producer, before its first write: writes every page of the data once through
  // this mapping, so that the writes of the transfers take no page faults.
  void prefault();

  // Producer: copies up to `left` bytes of one message (whose remaining bytes start at
  // `src`) into the ring and publishes them; the last piece of a message is published
  // with its padding. Returns the bytes of `src` taken (0 when the ring is full).
  size_t write(const std::byte* src, size_t left);

  // Consumer: hands the next readable bytes of the current message (at most `left`)
  // to sink(ptr, n) in at most two pieces (around the wrap), then frees them; every
  // piece is a multiple of kAlign bytes unless it ends the message, so a message of
  // whole elements arrives in whole elements. Returns the bytes consumed (0 when
  // nothing has arrived).
  template <typename Sink>
  size_t read(size_t left, Sink&& sink) {
    std::atomic_ref<uint64_t> head(*head_), tail(*tail_);
    const uint64_t t = tail.load(std::memory_order_relaxed);
    const uint64_t h = head.load(std::memory_order_acquire);
    size_t taken = 0;
    uint64_t pos = t;
    while (taken < left && pos < h) {
      const size_t at = static_cast<size_t>(pos % cap_);
      const size_t n = std::min<size_t>({left - taken, static_cast<size_t>(h - pos), cap_ - at});
      sink(data_ + at, n);
      taken += n;
      pos += n;
    }
    if (taken == 0) return 0;
    // Skip the padding with the message's last bytes; it was published with them.
    tail.store(taken == left ? t + padded(static_cast<size_t>(pos - t)) : pos,
               std::memory_order_release);
    return taken;
  }

 private:
  uint64_t* head_ = nullptr;
  uint64_t* tail_ = nullptr;
  std::byte* data_ = nullptr;
  size_t cap_ = 0;
};

// The owner's wake-up word (see the file comment).
class Doorbell {
 public:
  Doorbell() = default;
  Doorbell(uint32_t* word, uint32_t* sleeping) : word_(word), sleeping_(sleeping) {}
  bool valid() const { return word_ != nullptr; }
  // Waker side: after publishing a change the owner may be waiting for.
  void ring();
  // Owner side: arm() before re-checking the rings, then sleep(armed value) or
  // disarm() when the re-check found progress.
  uint32_t arm();
  void disarm();
  // Sleeps until rung (since arm()), a signal or `timeout`; returns whether it was
  // rung. Disarms.
  bool sleep(uint32_t armed, std::chrono::nanoseconds timeout);

 private:
  uint32_t* word_ = nullptr;
  uint32_t* sleeping_ = nullptr;
};

// A rank's two collective buffers (see local_collective.h): `posted` is the number of
// the last collective whose input this rank has placed in buffer[seq % 2] (written by
// the owner with release, read by the peers with acquire); each buffer holds `bytes`.
struct Slots {
  uint64_t* posted = nullptr;
  std::byte* buffer[2] = {nullptr, nullptr};
  size_t bytes = 0;
  bool valid() const { return posted != nullptr; }
};

// One rank's segment, created by its owner or opened by a peer.
// Thread-safety: the object is immutable after setup; the rings and the doorbell
// follow their own rules above.
class Segment {
 public:
  Segment() = default;
  Segment(Segment&& o) noexcept { *this = std::move(o); }
  Segment& operator=(Segment&& o) noexcept;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  ~Segment();

  // Creates and maps `name` with one ring of `ring_bytes` (a multiple of kAlign) for
  // each rank in `producers`, and two collective slots of `slot_bytes` (a multiple of
  // 4096; 0: none). The pages are allocated up front, so a full /dev/shm fails here
  // (CommError) and never later with SIGBUS.
  static Segment create(const std::string& name, int owner, int world, uint64_t nonce,
                        const std::vector<int>& producers, size_t ring_bytes,
                        size_t slot_bytes = 0);
  // Maps a peer's segment and checks that it belongs to rank `owner` of this group.
  static Segment open(const std::string& name, int owner, int world, uint64_t nonce);

  // Removes the name (the mapping stays). Idempotent.
  void unlink();

  // The ring in which `producer` writes to the owner (invalid if it has none).
  ByteRing ring(int producer) const;
  Doorbell bell() const;
  Slots slots() const;  // invalid when created without slots

 private:
  std::byte* base_ = nullptr;
  size_t bytes_ = 0;
  std::string name_;
  bool linked_ = false;  // created here and not yet unlinked
};

// memcpy with non-temporal stores for the 64-byte-aligned body (x86-64; plain memcpy
// elsewhere): the destination's lines are neither read first nor kept in the caches.
void stream_copy(std::byte* dst, const std::byte* src, size_t n);

}  // namespace dtrain::comm::shm
