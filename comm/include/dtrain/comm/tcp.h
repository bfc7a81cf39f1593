// tcp: dtrain's own transport over TCP sockets, the embedded default backend.
//
// Bootstrap: each rank listens on an ephemeral port of TcpOptions::bind_address,
// publishes "host:port:nonce" in the Store under "tcp/<tag>/addr/<rank>", reads its
// peers' entries and builds a full mesh: for every pair the higher rank connects to
// the lower one, twice: a data connection (raw byte stream, no framing, for the
// pipelined ring and send/recv) and a control connection (small framed messages:
// "bye" on a clean shutdown, "abort" with a reason when a rank fails). Each
// connection opens with a handshake (magic, version, world size, both ranks, the
// job tag, the listener's nonce) that is acknowledged; anything else connecting to
// the port is dropped.
//
// Same host: each rank also publishes a host identity (host name, boot id, mount
// and IPC namespaces) under "tcp/<tag>/host/<rank>"; for a pair with equal
// identities (and TcpOptions::shm on both sides) the data goes through shared-memory
// rings (comm/src/shm) and the data socket stays idle, while the control connection
// still carries "bye"/"abort" and tells a dead peer by its EOF. Each such rank
// publishes its segment's name under "tcp/<tag>/shm/<rank>", maps its peers'
// segments, acknowledges under "tcp/<tag>/shm-mapped/<owner>/<rank>", and unlinks
// its own name once every same-host peer has mapped it. When every rank of the
// communicator shares the host, the collectives also get the one-host algorithms:
// `local` (shared-memory slots, small messages) and `direct` (single-copy reads of
// the peers' buffers with process_vm_readv, and writes into them with
// process_vm_writev, probed once the mesh is up).
//
// Execution: one worker thread per communicator runs the queued operations in
// issue order (async forms return at once; blocking forms wait). Collectives run the
// pipelined Ring (ring.h) over the sockets; the worker drives all sockets with
// non-blocking I/O and poll (after a short spin), so sends, receives and reductions
// overlap. Every op has a deadline of CommOptions::timeout from the moment it
// starts.
//
// Failure: a peer whose process dies is noticed on its control connection (EOF or
// reset without a "bye") by every rank, which fails the running and queued ops with
// CommError "tcp: lost connection to rank R (connection reset) during allreduce";
// a peer that stops answering gives TimeoutError naming the rank waited for. A rank
// that fails tells the others why ("abort") and shuts its sockets down, so no rank
// hangs. A failed communicator stays failed: later calls throw at once.
//
// Split: split() all-gathers every rank's (color, key) over the parent, and the ranks of
// each group then build a fresh mesh (own sockets, shared-memory rings and worker
// thread) through the parent's Store under the tag "<tag>/split<seq>/c<color>", seq
// counting the splits this communicator has done (the same on every rank, since split
// is collective). A group of one rank opens no sockets. Ranks in errors of a child are
// its own ranks, not the parent's.
//
// Thread-safety: as Communicator (one issuing thread; abort() from any thread).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "dtrain/comm/algorithm.h"
#include "dtrain/comm/communicator.h"
#include "dtrain/comm/ring.h"
#include "dtrain/comm/store.h"

namespace dtrain::comm {

struct TcpOptions {
  // Address the listening socket binds to; "0.0.0.0" or "::" for every interface.
  std::string bind_address = "127.0.0.1";
  // Host name or address the peers connect to. Empty: the bind address, or this
  // host's name when the bind address is a wildcard.
  std::string advertise_host;
  // Names the communicator in store keys and in the handshake (for example the job
  // id plus the generation); connections carrying another tag are refused. Ranks of
  // one communicator must agree; two communicators on one store need two tags.
  std::string tag = "default";
  // SO_SNDBUF/SO_RCVBUF of the data connections; 0 keeps the kernel's autotuning.
  int socket_buffer_bytes = 4 << 20;
  // Before blocking in poll(), a waiting rank keeps polling its sockets for this
  // long (yielding the CPU between attempts): it saves a sleep/wake-up round trip
  // per pipeline step, which is most of the idle time at high bandwidth. 0: block
  // at once.
  int spin_us = 300;
  // The first part of that spin without any syscall (pause instructions); the rest
  // yields the CPU between looks. -1: the whole spin when this host has a core per
  // rank, else 3 us. DTRAIN_TCP_PURE_SPIN_US.
  int pure_spin_us = -1;
  // Chunking of the pipelined ring; must be the same on every rank.
  RingOptions ring;
  // Shared-memory fast path: data between two ranks on one host goes through a
  // ring buffer in shared memory instead of their data socket (the control socket
  // stays). Used for a pair only when both ranks enable it.
  bool shm = true;
  // Capacity of each shared-memory ring (one per direction and same-host pair); a
  // multiple of 4096. Allocated in /dev/shm when the communicator is created.
  // Measured (2 ranks, 2-core VM): large messages did not tell 1, 2 and 8 MiB rings
  // apart; 4 MiB keeps four 1 MiB chunks in flight.
  size_t shm_ring_bytes = 4 << 20;
  // Single-copy collectives (Algo::kDirect, comm/src/shm/direct_collective.h) when
  // every rank of the communicator shares this host: each rank reads its peers'
  // buffers with process_vm_readv. Probed at setup; used only when every rank has it
  // on and every rank could read every peer. DTRAIN_DIRECT (0 or 1).
  bool direct = true;
  // The reduction's unit: a peer's chunk is read into a scratch buffer of this size,
  // combined from the cache and (allreduce) written to the peers from the cache.
  // DTRAIN_DIRECT_CHUNK_BYTES. Measured (2 ranks, 2-core VM, comm/README.md, with the
  // push): 256 KiB gave 18.5-18.8 GB/s busbw at 512 KiB - 1 MiB and 6.3-7.5 at 64 MiB,
  // 128 and 512 KiB about the same, 64 KiB 15 and 6.1, 4 MiB 7.5-7.9 at 8 MiB and 4.6 at
  // 64 MiB (the chunk leaves the 4 MiB L2 before it is pushed).
  size_t direct_chunk_bytes = 256 << 10;
  // Test hook: this rank publishes an unreadable address in the probe, so its peers'
  // reads fail and nobody uses direct.
  bool direct_probe_fault = false;
  // Algorithm choice by size (algorithm.h); algos.local_max_bytes is also the size
  // of each collective slot of the one-host algorithm (two per rank, allocated when
  // every rank of the communicator shares this host; 0: none). Every rank must use
  // the same AlgoOptions.
  AlgoOptions algos;

  // Defaults, overridden by DTRAIN_TCP_BIND, DTRAIN_TCP_ADVERTISE,
  // DTRAIN_TCP_SOCKET_BUFFER, DTRAIN_TCP_CHUNK_BYTES, DTRAIN_TCP_COLD_MIN_BYTES
  // (ring.cold_min_bytes), DTRAIN_TCP_SPIN_US, DTRAIN_SHM
  // (0 or 1), DTRAIN_SHM_RING_BYTES, DTRAIN_DIRECT (0 or 1), DTRAIN_DIRECT_CHUNK_BYTES
  // and AlgoOptions::from_env's variables when set (InvalidArgument on values that do
  // not parse).
  static TcpOptions from_env();
};

// Joins the group `rank` of `size` through `store`; blocks until the mesh is
// connected (or throws TimeoutError/CommError after opts.timeout). Size 1 opens no
// sockets and does not touch the store. The communicator keeps a reference to `store`
// for split(): the store must outlive it and every communicator split from it.
std::unique_ptr<Communicator> make_tcp_communicator(Store& store, int rank, int size,
                                                    CommOptions opts);
std::unique_ptr<Communicator> make_tcp_communicator(Store& store, int rank, int size,
                                                    CommOptions opts, const TcpOptions& tcp);

// The algorithm a tcp communicator runs for a call of `bytes` (counted as
// algorithm_for counts them), after its setup probes (direct only where the probe
// agreed); nullopt when `comm` is not a tcp communicator.
std::optional<Algo> tcp_algorithm(const Communicator& comm, Collective c, size_t bytes);

}  // namespace dtrain::comm
