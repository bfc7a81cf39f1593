// tcp::Transport: the PointToPoint of the tcp backend, a full mesh of sockets.
//
// Setup (connect()): listen, publish "nonce@host:port" in the store, connect to every
// lower rank and accept every higher one, two connections per pair (data, control),
// each opened by an acknowledged handshake; see tcp.h for the protocol.
//
// Progress: requests queue per peer and direction (FIFO). wait() moves every queued
// request forward with non-blocking sendmsg/recvmsg (batching queued buffers into
// one iovec); while the awaited request is not done it retries for spin_us (with
// sched_yield), then polls the data sockets that have work, every control socket
// and a wake-up eventfd, until the awaited request completes, the deadline passes
// (TimeoutError naming the ranks waited for) or something fails (CommError). On
// loopback the spin matters: a peer that sleeps in poll() must be woken for every
// chunk, which costs both ranks more than the polling does. Control sockets carry framed messages:
// "bye" (clean shutdown) and "abort" (a rank failed, with its reason and error kind). EOF or reset
// on a control socket without a "bye" means the peer's process is gone.
//
// Same host (TcpOptions::shm): for a peer whose host identity equals ours, sends are
// copied into the ring of the peer's shared-memory segment and receives read (or
// reduce, post_recv_reduce) from the ring in our own segment; see shm/segment.h.
// A wait with only shared-memory work spins like above, then sleeps on our
// segment's doorbell (futex) for at most kShmCheckInterval at a time, reading the
// control sockets between sleeps (with TCP work pending as well, it polls the
// sockets and looks at the rings at least that often): a dead peer (control EOF
// without "bye") or an "abort" is noticed within that interval, and a peer that
// said "bye" while we still expect data from it is reported as closed. fail() rings
// our own and every same-host peer's doorbell, so nobody sleeps through a failure.
//
// Failure: fail() records the first reason, sends "abort" (with the rank where the
// failure started and its reason) to every peer, shuts every socket down and wakes
// the poll; after that every wait() throws it. A rank that fails because of another
// rank's "abort" relays it, so every survivor reports the original cause even when
// it notices a relaying rank's shutdown first; for the same reason a lost
// connection is reported only after the control sockets have been drained.
//
// Thread-safety: post_*/wait/say_bye from one thread (the communicator's worker);
// fail(), failed() and failure() from any thread.
#pragma once

#include <poll.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dtrain/comm/ring.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "shm/direct_collective.h"
#include "shm/local_collective.h"
#include "shm/segment.h"
#include "tcp/socket.h"

namespace dtrain::comm::tcp {

class Transport final : public PointToPoint {
 public:
  // Builds the mesh; throws TimeoutError/CommError when it cannot by `deadline`.
  static std::unique_ptr<Transport> connect(Store& store, int rank, int size,
                                            const TcpOptions& opts, Deadline deadline);
  ~Transport() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Request post_send(const void* data, size_t bytes, int peer) override;
  Request post_recv(void* data, size_t bytes, int peer) override;
  // Shared-memory peers: copied out of the ring with shm::stream_copy.
  Request post_recv_cold(void* data, size_t bytes, int peer) override;
  bool can_recv_reduce(int peer) const override;
  Request post_recv_reduce(void* data, size_t count, DType dtype, ReduceOp op, int peer) override;
  void wait(const Request& request, Deadline deadline) override;
  // The wait loop of wait() for any condition (progressing posted requests meanwhile).
  void wait_until(const std::function<bool()>& ready, Deadline deadline);
  // wait_until for a condition every peer must help make true (the slots' waits): a
  // peer that closed its communicator cleanly meanwhile is reported as closed.
  void wait_for_every_peer(const std::function<bool()>& ready, Deadline deadline);

  // The one-host collectives, when every peer shares this host (TcpOptions::shm and
  // a slot size); nullptr otherwise.
  shm::LocalCollectives* local() { return local_.get(); }
  // The single-copy one-host collectives, when local() exists and every rank's probe
  // read every peer's memory (TcpOptions::direct); nullptr otherwise.
  shm::DirectCollectives* direct() { return direct_.get(); }

  // Whether data to and from `peer` goes through shared memory.
  bool uses_shm(int peer) const { return peers_[peer].shm; }

  // Records the first failure, tells every peer (kind, origin, text), shuts the
  // sockets down and wakes a blocked wait(). `origin` is the rank the failure
  // started at (-1: this one); the message reads "rank <origin> failed: <text>" for
  // failures relayed from another rank. Idempotent; safe from any thread.
  void fail(ErrorKind kind, const std::string& text, int origin = -1);
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  // The recorded failure as an exception ("tcp: <message>").
  std::exception_ptr failure() const;

  // Reads whatever the control sockets hold without blocking; throws when a peer
  // has failed or is gone. Called before each operation.
  void check_peers();

  // Clean shutdown: tells every peer "bye" and shuts the sockets down. Call only
  // when idle and not failed.
  void say_bye();

 private:
  struct Pending {
    std::byte* ptr;
    size_t left;
    // post_recv_reduce: combine into ptr instead of copying (shm receives only).
    bool reduce = false;
    DType dtype = DType::u8;
    ReduceOp op = ReduceOp::kSum;
    // post_recv_cold: copy with non-temporal stores (shm receives only).
    bool cold = false;
  };
  struct Peer {
    Fd data;
    Fd ctrl;
    std::deque<Pending> sends, recvs;
    uint64_t sends_posted = 0, sends_done = 0, recvs_posted = 0, recvs_done = 0;
    bool bye = false;        // the peer shut down cleanly
    bool ctrl_open = false;  // the control socket is still watched
    std::string ctrl_in;     // bytes of an incomplete control frame
    // Same host: data travels through these rings instead of `data`.
    bool shm = false;
    shm::ByteRing shm_in;    // in our segment, written by the peer
    shm::ByteRing shm_out;   // in the peer's segment, written by us
    shm::Doorbell shm_bell;  // the peer's doorbell
  };

  Transport(int rank, int size);
  void connect_lower(Store& store, const TcpOptions& opts, Deadline deadline);
  void accept_higher(int listener, const std::string& tag, uint64_t nonce, Deadline deadline);
  // Same-host discovery and segment creation (before the mesh), and mapping of the
  // peers' segments (after it).
  std::vector<int> find_same_host(Store& store, const TcpOptions& opts, Deadline deadline);
  void create_segment(Store& store, const TcpOptions& opts, const std::vector<int>& local,
                      uint64_t nonce);
  void make_local_collectives(const std::vector<int>& local);
  // Collective over the slots, after the mesh is up: direct_ stays only when every
  // rank can read every peer's memory.
  void probe_direct(const TcpOptions& opts, Deadline deadline);
  void map_segments(Store& store, const TcpOptions& opts, const std::vector<int>& local,
                    Deadline deadline);

  static void consume(std::deque<Pending>& q, size_t bytes, uint64_t& done);
  bool is_done(const Request& r) const;
  void progress();
  void progress_send(int p);
  void progress_recv(int p);
  void progress_send_shm(int p);
  void progress_recv_shm(int p);
  bool tcp_data_pending() const;
  void check_closed_shm_peers();
  void poll_once(Deadline deadline, Deadline wake_by);
  void read_control(int p, bool draining);
  void drain_control();
  void send_control(int p, uint32_t type, const std::string& payload);
  [[noreturn]] void lose(int p, int err);
  [[noreturn]] void throw_failure();
  [[noreturn]] void timeout();

  const int rank_, size_;
  std::chrono::microseconds spin_{0};
  // Of spin_, how long a wait spins without sched_yield (all of it when this host has
  // a core per rank, else 3 us).
  std::chrono::microseconds pure_spin_{3};
  std::vector<Peer> peers_;
  Fd wake_;                             // eventfd written by fail()
  std::vector<pollfd> pfds_;            // poll set of the last poll_once, reused
  std::vector<int> pfd_peer_;           // peer of each pfds_ entry (-1: wake_)
  std::vector<bool> pfd_ctrl_;          // whether the entry is a control socket
  shm::Segment shm_own_;                // ours: the rings our same-host peers write to
  std::vector<shm::Segment> shm_peer_;  // theirs, mapped
  shm::Doorbell bell_;                  // ours; valid when any peer uses shm
  std::unique_ptr<shm::LocalCollectives> local_;
  std::unique_ptr<shm::DirectCollectives> direct_;  // built on *local_

  std::atomic<bool> failed_{false};
  mutable std::mutex fail_mu_;
  ErrorKind fail_kind_ = ErrorKind::kComm;  // GUARDED_BY(fail_mu_)
  std::string fail_message_;                // GUARDED_BY(fail_mu_)
};

}  // namespace dtrain::comm::tcp
