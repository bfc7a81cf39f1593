// tcp::Transport: mesh setup, handshake, request progress and failure handling
// (see transport.h for the design).
#include "tcp/transport.h"

#include <sched.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstring>
#include <random>
#include <thread>

#include <spdlog/spdlog.h>

#include "dtrain/common/error.h"

namespace dtrain::comm::tcp {
namespace {

// Handshake (little endian). Hello, connector -> acceptor:
//   0 magic u64 | 8 version u32 | 12 world size u32 | 16 from rank u32 | 20 to rank u32
//   24 channel u32 | 28 tag length u32 | 32 acceptor's nonce u64 | 40 tag bytes
// Ack, acceptor -> connector: 0 magic u64 | 8 status u32 (0) | 12 rank u32 | 16 nonce u64
constexpr uint64_t kMagic = 0x3150435444525444ull;  // "DTRDTCP1" read little endian
constexpr uint32_t kVersion = 1;
constexpr uint32_t kChannelData = 0;
constexpr uint32_t kChannelCtrl = 1;
constexpr size_t kHelloSize = 40;
constexpr size_t kAckSize = 24;
constexpr size_t kMaxTag = 1024;

// Control frames: type u32 | payload length u32 | payload.
constexpr uint32_t kMsgBye = 1;
constexpr uint32_t kMsgAbort = 2;  // payload: kind u8 (0 comm, 1 timeout) | origin u32 | text
constexpr size_t kFrameHeader = 8;
constexpr size_t kMaxFrame = 16 << 10;

constexpr int kMaxIov = 64;

// Longest sleep on the shared-memory doorbell before the control sockets are read.
constexpr auto kShmCheckInterval = std::chrono::milliseconds(2);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

void put32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
void put64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
uint32_t get32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t get64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

std::string store_key(const std::string& tag, int rank) {
  return "tcp/" + tag + "/addr/" + std::to_string(rank);
}
std::string host_key(const std::string& tag, int rank) {
  return "tcp/" + tag + "/host/" + std::to_string(rank);
}
std::string shm_key(const std::string& tag, int rank) {
  return "tcp/" + tag + "/shm/" + std::to_string(rank);
}
std::string shm_mapped_key(const std::string& tag, int owner, int by) {
  return "tcp/" + tag + "/shm-mapped/" + std::to_string(owner) + "/" + std::to_string(by);
}

std::chrono::milliseconds time_left(Deadline deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return std::max(left, std::chrono::milliseconds(0));
}

// "<hex nonce>@<rest>" as published in the store.
bool split_nonce(const std::string& entry, uint64_t* nonce, std::string* rest) {
  size_t at = entry.find('@');
  if (at == std::string::npos || at == 0) return false;
  if (std::from_chars(entry.data(), entry.data() + at, *nonce, 16).ptr != entry.data() + at) {
    return false;
  }
  *rest = entry.substr(at + 1);
  return true;
}

bool is_wildcard(const std::string& host) {
  return host.empty() || host == "0.0.0.0" || host == "::" || host == "[::]";
}

uint64_t random_nonce() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

std::vector<std::byte> encode_hello(int size, int from, int to, uint32_t channel, uint64_t nonce,
                                    const std::string& tag) {
  std::vector<std::byte> b(kHelloSize + tag.size());
  put64(b.data(), kMagic);
  put32(b.data() + 8, kVersion);
  put32(b.data() + 12, static_cast<uint32_t>(size));
  put32(b.data() + 16, static_cast<uint32_t>(from));
  put32(b.data() + 20, static_cast<uint32_t>(to));
  put32(b.data() + 24, channel);
  put32(b.data() + 28, static_cast<uint32_t>(tag.size()));
  put64(b.data() + 32, nonce);
  std::memcpy(b.data() + kHelloSize, tag.data(), tag.size());
  return b;
}

// A connection accepted but not yet identified.
struct Incoming {
  Fd fd;
  std::vector<std::byte> buf;
};

}  // namespace

Transport::Transport(int rank, int size) : rank_(rank), size_(size), peers_(size) {
  wake_ = Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  DTRAIN_CHECK(wake_.valid(), CommError, "tcp: eventfd failed: {}", errno_text(errno));
}

Transport::~Transport() = default;

std::unique_ptr<Transport> Transport::connect(Store& store, int rank, int size,
                                              const TcpOptions& opts, Deadline deadline) {
  DTRAIN_CHECK(size >= 1 && rank >= 0 && rank < size, InvalidArgument,
               "tcp: rank {} is not in a world of size {}", rank, size);
  DTRAIN_CHECK(opts.tag.size() <= kMaxTag, InvalidArgument, "tcp: tag longer than {} bytes",
               kMaxTag);
  DTRAIN_CHECK(opts.spin_us >= 0, InvalidArgument, "tcp: spin_us must be >= 0, got {}",
               opts.spin_us);
  DTRAIN_CHECK(opts.direct_chunk_bytes >= 8, InvalidArgument,
               "tcp: direct_chunk_bytes must be at least 8, got {}", opts.direct_chunk_bytes);
  DTRAIN_CHECK(!opts.shm || (opts.shm_ring_bytes >= 4096 && opts.shm_ring_bytes % 4096 == 0),
               InvalidArgument, "tcp: shm_ring_bytes must be a positive multiple of 4096, got {}",
               opts.shm_ring_bytes);
  std::unique_ptr<Transport> t(new Transport(rank, size));
  t->spin_ = std::chrono::microseconds(opts.spin_us);
  if (size == 1) return t;

  int port = 0;
  Fd listener = listen_on(opts.bind_address, opts.socket_buffer_bytes, &port);
  std::string host = !opts.advertise_host.empty()     ? opts.advertise_host
                     : is_wildcard(opts.bind_address) ? host_name()
                                                      : opts.bind_address;
  uint64_t nonce = random_nonce();
  store.set(host_key(opts.tag, rank), opts.shm ? "1|" + shm::host_identity() : "0|");
  store.set(store_key(opts.tag, rank), fmt::format("{:x}@{}", nonce, format_host_port(host, port)));

  t->connect_lower(store, opts, deadline);
  t->accept_higher(listener.get(), opts.tag, nonce, deadline);
  if (opts.shm) {
    std::vector<int> local = t->find_same_host(store, opts, deadline);
    if (!local.empty()) {
      t->create_segment(store, opts, local, random_nonce());
      t->map_segments(store, opts, local, deadline);
    }
    // A core per rank of this host: spin without yielding for the whole spin (a
    // yield hands the core to whatever else runs and the answer comes tens of us
    // late, as Open MPI's default); more ranks than cores: yield after 3 us.
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    if (local.size() + 1 <= cores) t->pure_spin_ = t->spin_;
    if (opts.pure_spin_us >= 0) {
      t->pure_spin_ = std::min(t->spin_, std::chrono::microseconds(opts.pure_spin_us));
    }
  }
  for (int p = 0; p < size; ++p) {
    if (p == rank) continue;
    t->peers_[p].ctrl_open = true;
  }
  if (t->local_ != nullptr) t->probe_direct(opts, deadline);
  return t;
}

void Transport::probe_direct(const TcpOptions& opts, Deadline deadline) {
  direct_ = std::make_unique<shm::DirectCollectives>(
      *local_, [this] { check_peers(); }, opts.direct_chunk_bytes);
  std::string why;
  if (!direct_->probe(opts.direct, opts.direct_probe_fault, deadline, &why)) {
    spdlog::debug("tcp: rank {} of {}: no direct (single-copy) collectives: {}", rank_, size_, why);
    direct_.reset();
  }
}

std::vector<int> Transport::find_same_host(Store& store, const TcpOptions& opts,
                                           Deadline deadline) {
  // Every peer published its entry before its address, and the mesh is up: no wait.
  const std::string mine = store.get(host_key(opts.tag, rank_), time_left(deadline));
  std::vector<int> local;
  for (int p = 0; p < size_; ++p) {
    if (p != rank_ && store.get(host_key(opts.tag, p), time_left(deadline)) == mine) {
      local.push_back(p);
    }
  }
  return local;
}

void Transport::create_segment(Store& store, const TcpOptions& opts, const std::vector<int>& local,
                               uint64_t nonce) {
  std::string name = fmt::format("/dtrain-{}-r{}-{:x}", ::getpid(), rank_, nonce);
  const bool everyone = static_cast<int>(local.size()) == size_ - 1;
  // Slots when every rank is here: local_max_bytes of them for the local algorithm, at
  // least a page for the direct algorithm's headers.
  const size_t slot_bytes = std::max<size_t>((opts.algos.local_max_bytes + 4095) / 4096, 1) * 4096;
  shm_own_ = shm::Segment::create(name, rank_, size_, nonce, local, opts.shm_ring_bytes,
                                  everyone ? slot_bytes : 0);
  store.set(shm_key(opts.tag, rank_), fmt::format("{:x}@{}", nonce, name));
}

void Transport::map_segments(Store& store, const TcpOptions& opts, const std::vector<int>& local,
                             Deadline deadline) {
  for (int p : local) {
    std::string entry = store.get(shm_key(opts.tag, p), time_left(deadline)), name;
    uint64_t nonce = 0;
    DTRAIN_CHECK(split_nonce(entry, &nonce, &name), CommError,
                 "tcp: bad shared-memory entry '{}' for rank {} in the store", entry, p);
    shm_peer_.push_back(shm::Segment::open(name, p, size_, nonce));
    Peer& peer = peers_[p];
    peer.shm_out = shm_peer_.back().ring(rank_);
    peer.shm_out.prefault();  // nothing is in it yet: we are its only writer
    peer.shm_bell = shm_peer_.back().bell();
    peer.shm_in = shm_own_.ring(p);
    store.set(shm_mapped_key(opts.tag, p, rank_), "1");
  }
  // Every peer has mapped our segment: the name can go (no leftovers in /dev/shm).
  for (int p : local) store.get(shm_mapped_key(opts.tag, rank_, p), time_left(deadline));
  shm_own_.unlink();
  for (int p : local) peers_[p].shm = true;
  bell_ = shm_own_.bell();
  if (shm_own_.slots().valid()) make_local_collectives(local);
}

void Transport::make_local_collectives(const std::vector<int>& local) {
  std::vector<shm::Slots> slots(static_cast<size_t>(size_));
  std::vector<shm::Doorbell> bells(static_cast<size_t>(size_));
  slots[static_cast<size_t>(rank_)] = shm_own_.slots();
  for (size_t i = 0; i < local.size(); ++i) {
    slots[static_cast<size_t>(local[i])] = shm_peer_[i].slots();
    bells[static_cast<size_t>(local[i])] = peers_[local[i]].shm_bell;
  }
  local_ = std::make_unique<shm::LocalCollectives>(
      rank_, std::move(slots), std::move(bells),
      [this](const std::function<bool()>& ready, Deadline d) { wait_for_every_peer(ready, d); });
}

void Transport::wait_for_every_peer(const std::function<bool()>& ready, Deadline deadline) {
  wait_until(
      [&] {
        if (ready()) return true;
        for (int p = 0; p < size_; ++p) {
          // It published what it did before its "bye", which we have read: look again.
          if (p != rank_ && peers_[p].bye && !ready()) lose(p, 0);
        }
        return ready();
      },
      deadline);
}

void Transport::connect_lower(Store& store, const TcpOptions& opts, Deadline deadline) {
  for (int p = 0; p < rank_; ++p) {
    std::string entry = store.get(store_key(opts.tag, p), time_left(deadline)), where;
    uint64_t nonce = 0;
    DTRAIN_CHECK(split_nonce(entry, &nonce, &where), CommError,
                 "tcp: bad address entry '{}' for rank {} in the store", entry, p);
    HostPort addr = parse_host_port(where);
    std::string who = fmt::format("rank {}", p);
    for (uint32_t channel : {kChannelData, kChannelCtrl}) {
      Fd fd =
          connect_to(addr, channel == kChannelData ? opts.socket_buffer_bytes : 0, deadline, who);
      auto hello = encode_hello(size_, rank_, p, channel, nonce, opts.tag);
      write_all(fd.get(), hello.data(), hello.size(), deadline, who);
      std::byte ack[kAckSize];
      bool ok = read_all(fd.get(), ack, kAckSize, deadline, who) && get64(ack) == kMagic &&
                get32(ack + 8) == 0 && get32(ack + 12) == static_cast<uint32_t>(p) &&
                get64(ack + 16) == nonce;
      DTRAIN_CHECK(ok, CommError,
                   "tcp: rank {} at {} refused the handshake of rank {} (a different job tag, "
                   "world size or generation?)",
                   p, where, rank_);
      set_nodelay(fd.get());
      (channel == kChannelData ? peers_[p].data : peers_[p].ctrl) = std::move(fd);
    }
  }
}

void Transport::accept_higher(int listener, const std::string& tag, uint64_t nonce,
                              Deadline deadline) {
  int missing = 2 * (size_ - 1 - rank_);
  std::vector<Incoming> incoming;
  // Returns true when the hello is complete (valid or not); valid ones are adopted.
  auto try_adopt = [&](Incoming& in) -> bool {
    if (in.buf.size() < kHelloSize) return false;
    const std::byte* h = in.buf.data();
    uint32_t tag_len = get32(h + 28);
    bool header_ok = get64(h) == kMagic && get32(h + 8) == kVersion &&
                     get32(h + 12) == static_cast<uint32_t>(size_) &&
                     get32(h + 20) == static_cast<uint32_t>(rank_) && tag_len <= kMaxTag;
    if (!header_ok) return true;
    if (in.buf.size() < kHelloSize + tag_len) return false;
    uint32_t from = get32(h + 16), channel = get32(h + 24);
    bool ok = from > static_cast<uint32_t>(rank_) && from < static_cast<uint32_t>(size_) &&
              (channel == kChannelData || channel == kChannelCtrl) && get64(h + 32) == nonce &&
              tag_len == tag.size() && std::memcmp(h + kHelloSize, tag.data(), tag_len) == 0;
    if (!ok) return true;
    Fd& slot = channel == kChannelData ? peers_[from].data : peers_[from].ctrl;
    if (slot.valid()) return true;  // a duplicate: drop it
    std::byte ack[kAckSize];
    put64(ack, kMagic);
    put32(ack + 8, 0);
    put32(ack + 12, static_cast<uint32_t>(rank_));
    put64(ack + 16, nonce);
    try {
      write_all(in.fd.get(), ack, kAckSize, deadline, fmt::format("rank {}", from));
    } catch (const Error&) {
      return true;  // the connector went away; it will fail or retry on its side
    }
    set_nodelay(in.fd.get());
    slot = std::move(in.fd);
    --missing;
    return true;
  };

  while (missing > 0) {
    std::vector<pollfd> fds;
    fds.push_back({listener, POLLIN, 0});
    for (auto& in : incoming) fds.push_back({in.fd.get(), POLLIN, 0});
    int rc = ::poll(fds.data(), fds.size(), poll_timeout_ms(deadline));
    if (rc < 0 && errno != EINTR)
      DTRAIN_THROW(CommError, "tcp: poll failed: {}", errno_text(errno));
    if (rc == 0 && Clock::now() >= deadline) {
      std::string who;
      for (int p = rank_ + 1; p < size_; ++p) {
        if (peers_[p].data.valid() && peers_[p].ctrl.valid()) continue;
        who += (who.empty() ? "" : ", ") + std::to_string(p);
      }
      DTRAIN_THROW(TimeoutError, "tcp: rank(s) {} did not connect to rank {} before the timeout",
                   who, rank_);
    }
    for (size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      Incoming& in = incoming[i - 1];
      std::byte buf[kHelloSize + kMaxTag];
      size_t want = sizeof(buf) - in.buf.size();
      ssize_t k = ::recv(in.fd.get(), buf, want, MSG_DONTWAIT);
      if (k > 0) {
        in.buf.insert(in.buf.end(), buf, buf + k);
        if (try_adopt(in)) in.fd.reset();  // adopted (moved out) or rejected
      } else if (k == 0 || (errno != EAGAIN && errno != EINTR)) {
        in.fd.reset();
      }
    }
    std::erase_if(incoming, [](const Incoming& in) { return !in.fd.valid(); });
    if (fds[0].revents != 0) {
      for (;;) {
        int fd = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) break;
        incoming.push_back({Fd(fd), {}});
      }
    }
  }
}

PointToPoint::Request Transport::post_send(const void* data, size_t bytes, int peer) {
  DTRAIN_CHECK(peer >= 0 && peer < size_ && peer != rank_, InvalidArgument,
               "tcp: rank {} cannot send to rank {} (world size {})", rank_, peer, size_);
  if (bytes == 0) return {};
  Peer& p = peers_[peer];
  p.sends.push_back({static_cast<std::byte*>(const_cast<void*>(data)), bytes});
  return {peer, true, p.sends_posted++};
}

PointToPoint::Request Transport::post_recv(void* data, size_t bytes, int peer) {
  DTRAIN_CHECK(peer >= 0 && peer < size_ && peer != rank_, InvalidArgument,
               "tcp: rank {} cannot receive from rank {} (world size {})", rank_, peer, size_);
  if (bytes == 0) return {};
  Peer& p = peers_[peer];
  p.recvs.push_back({static_cast<std::byte*>(data), bytes});
  return {peer, false, p.recvs_posted++};
}

PointToPoint::Request Transport::post_recv_cold(void* data, size_t bytes, int peer) {
  Request r = post_recv(data, bytes, peer);
  if (bytes > 0) peers_[peer].recvs.back().cold = true;
  return r;
}

bool Transport::can_recv_reduce(int peer) const {
  return peer >= 0 && peer < size_ && peers_[peer].shm;
}

PointToPoint::Request Transport::post_recv_reduce(void* data, size_t count, DType dtype,
                                                  ReduceOp op, int peer) {
  DTRAIN_CHECK(can_recv_reduce(peer), InvalidArgument,
               "tcp: rank {} cannot reduce on receive from rank {} (not on this host)", rank_,
               peer);
  const size_t bytes = count * dtype_size(dtype);
  if (bytes == 0) return {};
  Peer& p = peers_[peer];
  p.recvs.push_back({static_cast<std::byte*>(data), bytes, true, dtype, op});
  return {peer, false, p.recvs_posted++};
}

bool Transport::is_done(const Request& r) const {
  if (r.peer < 0) return true;
  const Peer& p = peers_[r.peer];
  return r.is_send ? r.seq < p.sends_done : r.seq < p.recvs_done;
}

void Transport::wait(const Request& request, Deadline deadline) {
  wait_until(
      [&] {
        progress();
        return is_done(request);
      },
      deadline);
}

void Transport::wait_until(const std::function<bool()>& ready, Deadline deadline) {
  const Clock::time_point start = Clock::now();
  Deadline spin_until = start + spin_;
  for (;;) {
    if (failed()) throw_failure();
    // Only shared-memory work left: sleep on the doorbell once the spin is over,
    // armed before the last look at the rings so that no ring is missed.
    const bool bell = bell_.valid() && !tcp_data_pending() && Clock::now() >= spin_until;
    const uint32_t armed = bell ? bell_.arm() : 0;
    if (ready()) {
      if (bell) bell_.disarm();
      return;
    }
    if (!bell && Clock::now() < spin_until) {
      // The first microseconds without a syscall (a peer on another core answers
      // within them), then let a compute thread on this core run between looks.
      if (Clock::now() - start < pure_spin_) {
        cpu_relax();
      } else {
        ::sched_yield();
      }
      continue;
    }
    if (bell) {
      const Clock::time_point now = Clock::now();
      if (now >= deadline) {
        bell_.disarm();
        timeout();
      }
      const bool rung =
          bell_.sleep(armed, std::min<Clock::duration>(deadline - now, kShmCheckInterval));
      check_peers();  // throws when a peer failed or is gone
      check_closed_shm_peers();
      spin_until = rung ? Clock::now() + spin_ : Clock::now();
      continue;
    }
    poll_once(deadline,
              bell_.valid() ? std::min(deadline, Clock::now() + kShmCheckInterval) : deadline);
    spin_until = Clock::now() + spin_;
  }
}

void Transport::progress() {
  for (int p = 0; p < size_; ++p) {
    Peer& peer = peers_[p];
    if (peer.shm) {
      if (!peer.sends.empty()) progress_send_shm(p);
      if (!peer.recvs.empty()) progress_recv_shm(p);
    } else {
      if (!peer.sends.empty()) progress_send(p);
      if (!peer.recvs.empty()) progress_recv(p);
    }
  }
}

bool Transport::tcp_data_pending() const {
  for (const Peer& peer : peers_) {
    if (!peer.shm && (!peer.sends.empty() || !peer.recvs.empty())) return true;
  }
  return false;
}

void Transport::progress_send_shm(int p) {
  Peer& peer = peers_[p];
  while (!peer.sends.empty()) {
    const Pending& front = peer.sends.front();
    size_t k = peer.shm_out.write(front.ptr, front.left);
    if (k == 0) return;  // the ring is full
    peer.shm_bell.ring();
    consume(peer.sends, k, peer.sends_done);
  }
}

void Transport::progress_recv_shm(int p) {
  Peer& peer = peers_[p];
  while (!peer.recvs.empty()) {
    const Pending& front = peer.recvs.front();
    std::byte* dst = front.ptr;
    size_t k;
    if (front.reduce) {
      const DType dtype = front.dtype;
      const ReduceOp op = front.op;
      const size_t es = dtype_size(dtype);
      k = peer.shm_in.read(front.left, [&](const std::byte* src, size_t n) {
        reduce_into(dst, src, n / es, dtype, op);
        dst += n;
      });
    } else {
      const bool cold = front.cold;
      k = peer.shm_in.read(front.left, [&](const std::byte* src, size_t n) {
        cold ? shm::stream_copy(dst, src, n) : static_cast<void>(std::memcpy(dst, src, n));
        dst += n;
      });
    }
    if (k == 0) return;    // nothing new has arrived
    peer.shm_bell.ring();  // space for the peer's next sends
    consume(peer.recvs, k, peer.recvs_done);
  }
}

// A same-host peer that shut down cleanly while we still have data for it or expect
// data from it will never move its ring again: report it instead of timing out.
void Transport::check_closed_shm_peers() {
  for (int p = 0; p < size_; ++p) {
    const Peer& peer = peers_[p];
    if (!peer.shm || !peer.bye || (peer.sends.empty() && peer.recvs.empty())) continue;
    progress();  // what it wrote before leaving
    if (!peer.sends.empty() || !peer.recvs.empty()) lose(p, 0);
  }
}

// Consumes `n` bytes from the front of a request queue, counting completed requests.
void Transport::consume(std::deque<Pending>& q, size_t n, uint64_t& done) {
  while (n > 0) {
    auto& front = q.front();
    size_t take = std::min(n, front.left);
    front.ptr += take;
    front.left -= take;
    n -= take;
    if (front.left == 0) {
      q.pop_front();
      ++done;
    }
  }
}

void Transport::progress_send(int p) {
  Peer& peer = peers_[p];
  while (!peer.sends.empty()) {
    iovec iov[kMaxIov];
    int n = 0;
    size_t total = 0;
    for (auto it = peer.sends.begin(); it != peer.sends.end() && n < kMaxIov; ++it, ++n) {
      iov[n] = {it->ptr, it->left};
      total += it->left;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n);
    ssize_t k = ::sendmsg(peer.data.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      lose(p, errno);
    }
    consume(peer.sends, static_cast<size_t>(k), peer.sends_done);
    if (static_cast<size_t>(k) < total) return;  // the socket buffer is full
  }
}

void Transport::progress_recv(int p) {
  Peer& peer = peers_[p];
  while (!peer.recvs.empty()) {
    iovec iov[kMaxIov];
    int n = 0;
    size_t total = 0;
    for (auto it = peer.recvs.begin(); it != peer.recvs.end() && n < kMaxIov; ++it, ++n) {
      iov[n] = {it->ptr, it->left};
      total += it->left;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n);
    ssize_t k = ::recvmsg(peer.data.get(), &msg, MSG_DONTWAIT);
    if (k == 0) lose(p, 0);
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      lose(p, errno);
    }
    consume(peer.recvs, static_cast<size_t>(k), peer.recvs_done);
    if (static_cast<size_t>(k) < total) return;  // drained what had arrived
  }
}

void Transport::poll_once(Deadline deadline, Deadline wake_by) {
  pfds_.clear();
  pfd_peer_.clear();
  pfd_ctrl_.clear();
  auto add = [&](int fd, short events, int peer, bool ctrl) {
    pfds_.push_back({fd, events, 0});
    pfd_peer_.push_back(peer);
    pfd_ctrl_.push_back(ctrl);
  };
  add(wake_.get(), POLLIN, -1, false);
  for (int p = 0; p < size_; ++p) {
    Peer& peer = peers_[p];
    if (peer.ctrl_open) add(peer.ctrl.get(), POLLIN, p, true);
    if (peer.shm) continue;  // its data socket stays idle
    short events =
        static_cast<short>((peer.recvs.empty() ? 0 : POLLIN) | (peer.sends.empty() ? 0 : POLLOUT));
    if (events != 0) add(peer.data.get(), events, p, false);
  }
  int rc = ::poll(pfds_.data(), pfds_.size(), poll_timeout_ms(std::min(deadline, wake_by)));
  if (rc < 0) {
    if (errno == EINTR) return;
    fail(ErrorKind::kComm, fmt::format("poll failed: {}", errno_text(errno)));
    throw_failure();
  }
  if (rc == 0) {
    if (Clock::now() >= deadline) timeout();
    return;
  }
  for (size_t i = 1; i < pfds_.size(); ++i) {
    if (pfd_ctrl_[i] && pfds_[i].revents != 0) read_control(pfd_peer_[i], false);
  }
}

// Reads control frames from peer p. A relayed "abort" fails this transport with
// the original cause. EOF without a "bye" means the peer is gone: lose() it, unless
// `draining` (lose() is already reporting a loss and only wants an earlier cause).
void Transport::read_control(int p, bool draining) {
  Peer& peer = peers_[p];
  char buf[4096];
  while (peer.ctrl_open) {
    ssize_t k = ::recv(peer.ctrl.get(), buf, sizeof(buf), MSG_DONTWAIT);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (k <= 0) {
      int err = k == 0 ? 0 : errno;
      peer.ctrl_open = false;
      if (!peer.bye && !draining) lose(p, err);
      return;  // a clean shutdown: stop watching
    }
    peer.ctrl_in.append(buf, static_cast<size_t>(k));
    while (peer.ctrl_in.size() >= kFrameHeader) {
      const auto* h = reinterpret_cast<const std::byte*>(peer.ctrl_in.data());
      uint32_t type = get32(h), len = get32(h + 4);
      if (len > kMaxFrame || (type != kMsgBye && type != kMsgAbort) ||
          (type == kMsgAbort && len < 5)) {
        fail(ErrorKind::kComm,
             fmt::format("protocol error on the control connection of rank {}", p));
        throw_failure();
      }
      if (peer.ctrl_in.size() < kFrameHeader + len) break;
      std::string payload = peer.ctrl_in.substr(kFrameHeader, len);
      peer.ctrl_in.erase(0, kFrameHeader + len);
      if (type == kMsgBye) {
        peer.bye = true;
        continue;
      }
      ErrorKind kind = payload[0] == 1 ? ErrorKind::kTimeout : ErrorKind::kComm;
      uint32_t origin = get32(reinterpret_cast<const std::byte*>(payload.data()) + 1);
      if (origin >= static_cast<uint32_t>(size_)) origin = static_cast<uint32_t>(p);
      fail(kind, payload.substr(5), static_cast<int>(origin));
      throw_failure();
    }
  }
}

void Transport::drain_control() {
  for (int p = 0; p < size_; ++p) {
    if (p != rank_) read_control(p, /*draining=*/true);
  }
}

void Transport::check_peers() {
  if (failed()) throw_failure();
  pfds_.clear();
  pfd_peer_.clear();
  for (int p = 0; p < size_; ++p) {
    if (p == rank_ || !peers_[p].ctrl_open) continue;
    pfds_.push_back({peers_[p].ctrl.get(), POLLIN, 0});
    pfd_peer_.push_back(p);
  }
  if (pfds_.empty() || ::poll(pfds_.data(), pfds_.size(), 0) <= 0) return;
  for (size_t i = 0; i < pfds_.size(); ++i) {
    if (pfds_[i].revents != 0) read_control(pfd_peer_[i], false);
  }
}

void Transport::send_control(int p, uint32_t type, const std::string& payload) {
  const Fd& fd = peers_[p].ctrl;
  if (!fd.valid()) return;
  std::string frame(kFrameHeader, '\0');
  put32(reinterpret_cast<std::byte*>(frame.data()), type);
  put32(reinterpret_cast<std::byte*>(frame.data()) + 4, static_cast<uint32_t>(payload.size()));
  frame += payload;
  // Best effort: a control socket is nearly always empty, and a peer that cannot
  // take a few bytes will learn of the failure from the shutdown that follows.
  (void)!::send(fd.get(), frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}

void Transport::fail(ErrorKind kind, const std::string& text, int origin) {
  if (origin < 0 || origin >= size_) origin = rank_;
  kind = kind == ErrorKind::kTimeout ? ErrorKind::kTimeout : ErrorKind::kComm;
  {
    std::lock_guard<std::mutex> lock(fail_mu_);
    if (failed_.load(std::memory_order_relaxed)) return;
    fail_kind_ = kind;
    fail_message_ = origin == rank_ ? text : fmt::format("rank {} failed: {}", origin, text);
    failed_.store(true, std::memory_order_release);
  }
  // Socket descriptors are fixed after setup, so this is safe from any thread; the
  // worker may be inside a syscall on them, which shutdown() then ends. The notice
  // goes out before the shutdown, so a peer reads it before it sees our EOF.
  std::string payload(5, '\0');
  payload[0] = kind == ErrorKind::kTimeout ? '\1' : '\0';
  put32(reinterpret_cast<std::byte*>(payload.data()) + 1, static_cast<uint32_t>(origin));
  payload += text.substr(0, kMaxFrame - payload.size());
  for (int p = 0; p < size_; ++p) {
    if (p != rank_) send_control(p, kMsgAbort, payload);
  }
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    if (peers_[p].data.valid()) ::shutdown(peers_[p].data.get(), SHUT_RDWR);
    if (peers_[p].ctrl.valid()) ::shutdown(peers_[p].ctrl.get(), SHUT_RDWR);
  }
  uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof(one));
  // Wake our worker if it sleeps on the doorbell, and same-host peers sleeping on
  // theirs, so they read the "abort" now rather than at their next check.
  if (bell_.valid()) bell_.ring();
  for (int p = 0; p < size_; ++p) {
    if (peers_[p].shm) peers_[p].shm_bell.ring();
  }
}

std::exception_ptr Transport::failure() const {
  std::lock_guard<std::mutex> lock(fail_mu_);
  std::string text = "tcp: " + fail_message_;
  if (fail_kind_ == ErrorKind::kTimeout) return std::make_exception_ptr(TimeoutError(text));
  return std::make_exception_ptr(CommError(text));
}

void Transport::say_bye() {
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    send_control(p, kMsgBye, "");
    if (peers_[p].data.valid()) ::shutdown(peers_[p].data.get(), SHUT_RDWR);
    if (peers_[p].ctrl.valid()) ::shutdown(peers_[p].ctrl.get(), SHUT_WR);
    if (peers_[p].shm) peers_[p].shm_bell.ring();
  }
}

void Transport::lose(int p, int err) {
  // A peer that failed first may have told us why (and a relaying rank's shutdown
  // may be what we noticed): report that cause instead.
  if (!failed()) drain_control();
  std::string message = peers_[p].bye
                            ? fmt::format("rank {} has closed its communicator", p)
                            : fmt::format("lost connection to rank {} ({})", p, loss_reason(err));
  fail(ErrorKind::kComm, message);
  throw_failure();
}

void Transport::throw_failure() { std::rethrow_exception(failure()); }

void Transport::timeout() {
  std::string receiving, sending;
  for (int p = 0; p < size_; ++p) {
    if (!peers_[p].recvs.empty()) receiving += (receiving.empty() ? "" : ", ") + std::to_string(p);
    if (!peers_[p].sends.empty()) sending += (sending.empty() ? "" : ", ") + std::to_string(p);
  }
  std::string message = !receiving.empty()
                            ? fmt::format("timed out waiting for data from rank {}", receiving)
                            : fmt::format("timed out waiting for rank {} to accept data", sending);
  fail(ErrorKind::kTimeout, message);
  throw_failure();
}

}  // namespace dtrain::comm::tcp
