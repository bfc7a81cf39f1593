// shm: segments, byte rings and doorbells (see segment.h for the design).
#include "shm/segment.h"

#include <fcntl.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <utility>

#include "dtrain/common/error.h"

namespace dtrain::comm::shm {
namespace {

// First touches happen at setup, not during transfers: mappings are made with
// MAP_POPULATE, the owner writes its whole segment once after creating it, and
// each producer writes its ring once through its own mapping (ByteRing::prefault).
// Measured on the development VM (2 ranks): without them the first pass through a
// ring (all small and medium messages of a benchmark sweep) ran up to ten times
// slower (128 KiB allreduce: 436 us; with MAP_POPULATE and the producer's prefault:
// 233 us; with the owner's write as well: 45-56 us).
//
// Layout (offsets in bytes):
//   0     Header
//   64    doorbell: word u32 | sleeping u32
//   128   RingCtl[world]: head u64 (own cache line), tail u64 (own cache line), with
//         the ring's data offset (0: none) and capacity beside head
//   ...   data, page aligned, one `capacity` block per producer
//   ...   slots (when slot_bytes > 0), page aligned: a page whose first cache line
//         holds `posted` (u64), then two buffers of slot_bytes each
constexpr uint64_t kMagic = 0x324d485344525444ull;  // "DTRDSHM2" read little endian
constexpr uint32_t kVersion = 2;
constexpr size_t kBellOffset = 64;
constexpr size_t kCtlOffset = 128;
constexpr size_t kPage = 4096;

struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t owner;
  uint32_t world;
  uint32_t reserved;
  uint64_t nonce;
  uint64_t bytes;
  uint64_t slot_offset;  // 0: no slots
  uint64_t slot_bytes;
};
static_assert(sizeof(Header) <= kBellOffset);

struct alignas(64) RingCtl {
  uint64_t head;  // written by the producer
  uint64_t data_offset;
  uint64_t capacity;
  char pad0[40];
  uint64_t tail;  // written by the consumer
  char pad1[56];
};
static_assert(sizeof(RingCtl) == 128);
static_assert(std::atomic_ref<uint64_t>::is_always_lock_free);
static_assert(std::atomic_ref<uint32_t>::is_always_lock_free);

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

std::string errno_text(int err) {
  std::array<char, 256> buf{};
  return strerror_r(err, buf.data(), buf.size());
}

std::string first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

std::string link_of(const char* path) {
  std::array<char, 256> buf{};
  ssize_t n = ::readlink(path, buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), static_cast<size_t>(n)) : std::string();
}

Header* header(std::byte* base) { return reinterpret_cast<Header*>(base); }
RingCtl* ctl(std::byte* base, int rank) {
  return reinterpret_cast<RingCtl*>(base + kCtlOffset) + rank;
}

long futex(uint32_t* word, int op, uint32_t val, const timespec* ts) {
  return ::syscall(SYS_futex, word, op, val, ts, nullptr, 0);
}

}  // namespace

std::string host_identity() {
  std::array<char, 256> host{};
  ::gethostname(host.data(), host.size() - 1);
  std::string boot = first_line("/proc/sys/kernel/random/boot_id");
  DTRAIN_CHECK(!boot.empty(), CommError,
               "shm: cannot read /proc/sys/kernel/random/boot_id to tell which ranks share a host "
               "(set DTRAIN_SHM=0 to use TCP only)");
  return std::string(host.data()) + "/" + boot + "/" + link_of("/proc/self/ns/mnt") + "/" +
         link_of("/proc/self/ns/ipc");
}

void ByteRing::prefault() { std::memset(data_, 0, cap_); }

size_t ByteRing::write(const std::byte* src, size_t left) {
  std::atomic_ref<uint64_t> head(*head_), tail(*tail_);
  const uint64_t h = head.load(std::memory_order_relaxed);
  const uint64_t t = tail.load(std::memory_order_acquire);
  const size_t space = cap_ - static_cast<size_t>(h - t);  // a multiple of kAlign
  const size_t take = padded(left) <= space ? left : space;
  if (take == 0) return 0;
  const size_t at = static_cast<size_t>(h % cap_);
  const size_t first = std::min(take, cap_ - at);
  std::memcpy(data_ + at, src, first);
  if (first < take) std::memcpy(data_, src + first, take - first);
  head.store(h + (take == left ? padded(left) : take), std::memory_order_release);
  return take;
}

void Doorbell::ring() {
  std::atomic_ref<uint32_t> word(*word_), sleeping(*sleeping_);
  word.fetch_add(1, std::memory_order_seq_cst);
  if (sleeping.load(std::memory_order_seq_cst) != 0) futex(word_, FUTEX_WAKE, INT_MAX, nullptr);
}

uint32_t Doorbell::arm() {
  std::atomic_ref<uint32_t>(*sleeping_).store(1, std::memory_order_seq_cst);
  return std::atomic_ref<uint32_t>(*word_).load(std::memory_order_seq_cst);
}

void Doorbell::disarm() {
  std::atomic_ref<uint32_t>(*sleeping_).store(0, std::memory_order_relaxed);
}

bool Doorbell::sleep(uint32_t armed, std::chrono::nanoseconds timeout) {
  if (timeout.count() > 0) {
    timespec ts{static_cast<time_t>(timeout.count() / 1000000000),
                static_cast<long>(timeout.count() % 1000000000)};
    // Returns at a ring, at once when rung since arm() (EAGAIN), on a signal or at
    // the timeout.
    futex(word_, FUTEX_WAIT, armed, &ts);
  }
  disarm();
  return std::atomic_ref<uint32_t>(*word_).load(std::memory_order_acquire) != armed;
}

Segment& Segment::operator=(Segment&& o) noexcept {
  if (this != &o) {
    this->~Segment();
    base_ = std::exchange(o.base_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    name_ = std::move(o.name_);
    linked_ = std::exchange(o.linked_, false);
  }
  return *this;
}

Segment::~Segment() {
  unlink();
  if (base_ != nullptr) ::munmap(base_, bytes_);
  base_ = nullptr;
}

void Segment::unlink() {
  if (linked_) ::shm_unlink(name_.c_str());
  linked_ = false;
}

Segment Segment::create(const std::string& name, int owner, int world, uint64_t nonce,
                        const std::vector<int>& producers, size_t ring_bytes, size_t slot_bytes) {
  DTRAIN_CHECK(ring_bytes >= kPage && ring_bytes % kPage == 0, InvalidArgument,
               "shm: ring size must be a positive multiple of {} bytes, got {}", kPage, ring_bytes);
  DTRAIN_CHECK(slot_bytes % kPage == 0, InvalidArgument,
               "shm: slot size must be a multiple of {} bytes, got {}", kPage, slot_bytes);
  const size_t data_start =
      round_up(kCtlOffset + sizeof(RingCtl) * static_cast<size_t>(world), kPage);
  const size_t slot_start = data_start + producers.size() * ring_bytes;
  const size_t bytes = slot_start + (slot_bytes > 0 ? kPage + 2 * slot_bytes : 0);
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  DTRAIN_CHECK(fd >= 0, CommError,
               "shm: rank {} cannot create {}: {} (set DTRAIN_SHM=0 to use TCP only)", owner, name,
               errno_text(errno));
  Segment s;
  s.name_ = name;
  s.linked_ = true;  // unlinked by the destructor if anything below throws
  int err = ::ftruncate(fd, static_cast<off_t>(bytes)) == 0
                ? ::posix_fallocate(fd, 0, static_cast<off_t>(bytes))
                : errno;
  if (err == 0) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
      err = errno;
    } else {
      s.base_ = static_cast<std::byte*>(p);
      s.bytes_ = bytes;
    }
  }
  ::close(fd);
  DTRAIN_CHECK(err == 0, CommError,
               "shm: rank {} cannot allocate {} bytes of shared memory for {}: {} (is /dev/shm "
               "full? set DTRAIN_SHM=0 to use TCP only)",
               owner, bytes, name, errno_text(err));
  std::memset(s.base_, 0, bytes);  // first touch now, not during the transfers
  Header* h = header(s.base_);
  h->magic = kMagic;
  h->version = kVersion;
  h->owner = static_cast<uint32_t>(owner);
  h->world = static_cast<uint32_t>(world);
  h->nonce = nonce;
  h->bytes = bytes;
  h->slot_offset = slot_bytes > 0 ? slot_start : 0;
  h->slot_bytes = slot_bytes;
  for (size_t i = 0; i < producers.size(); ++i) {
    RingCtl* c = ctl(s.base_, producers[i]);
    c->data_offset = data_start + i * ring_bytes;
    c->capacity = ring_bytes;
  }
  return s;
}

Segment Segment::open(const std::string& name, int owner, int world, uint64_t nonce) {
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  DTRAIN_CHECK(fd >= 0, CommError, "shm: cannot open rank {}'s segment {}: {}", owner, name,
               errno_text(errno));
  struct stat st {};
  int err = ::fstat(fd, &st) == 0 ? 0 : errno;
  Segment s;
  if (err == 0 && static_cast<size_t>(st.st_size) >= kCtlOffset) {
    void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
      err = errno;
    } else {
      s.base_ = static_cast<std::byte*>(p);
      s.bytes_ = static_cast<size_t>(st.st_size);
    }
  }
  ::close(fd);
  DTRAIN_CHECK(err == 0, CommError, "shm: cannot map rank {}'s segment {}: {}", owner, name,
               errno_text(err));
  const Header* h = s.base_ == nullptr ? nullptr : header(s.base_);
  bool ok = h != nullptr && h->magic == kMagic && h->version == kVersion &&
            h->owner == static_cast<uint32_t>(owner) && h->world == static_cast<uint32_t>(world) &&
            h->nonce == nonce && h->bytes == s.bytes_ &&
            (h->slot_offset == 0 || h->slot_offset + kPage + 2 * h->slot_bytes <= s.bytes_) &&
            kCtlOffset + sizeof(RingCtl) * static_cast<size_t>(world) <= s.bytes_;
  DTRAIN_CHECK(ok, CommError,
               "shm: {} is not rank {}'s segment of this group (world size {}); a stale entry?",
               name, owner, world);
  return s;
}

ByteRing Segment::ring(int producer) const {
  RingCtl* c = ctl(base_, producer);
  DTRAIN_CHECK(
      c->data_offset != 0 && c->capacity % kAlign == 0 && c->data_offset + c->capacity <= bytes_,
      CommError, "shm: rank {}'s segment has no valid ring for rank {}", header(base_)->owner,
      producer);
  return ByteRing(&c->head, &c->tail, base_ + c->data_offset, c->capacity);
}

Slots Segment::slots() const {
  const Header* h = header(base_);
  if (h->slot_offset == 0) return Slots{};
  std::byte* at = base_ + h->slot_offset;
  return Slots{reinterpret_cast<uint64_t*>(at),
               {at + kPage, at + kPage + h->slot_bytes},
               static_cast<size_t>(h->slot_bytes)};
}

Doorbell Segment::bell() const {
  auto* w = reinterpret_cast<uint32_t*>(base_ + kBellOffset);
  return Doorbell(w, w + 1);
}

void stream_copy(std::byte* dst, const std::byte* src, size_t n) {
#if defined(__SSE2__)
  const size_t head = std::min(n, (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63);
  std::memcpy(dst, src, head);
  dst += head, src += head, n -= head;
  const size_t body = n & ~size_t{63};
  for (size_t i = 0; i < body; i += 64) {
    for (size_t j = 0; j < 64; j += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + j));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + j), v);
    }
  }
  _mm_sfence();  // the stores are visible before the caller reports the receive done
  std::memcpy(dst + body, src + body, n - body);
#else
  std::memcpy(dst, src, n);
#endif
}

}  // namespace dtrain::comm::shm
