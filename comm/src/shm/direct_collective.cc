// shm::DirectCollectives (see direct_collective.h for the protocol).
#include "shm/direct_collective.h"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <system_error>

#include "dtrain/common/error.h"

namespace dtrain::comm::shm {
namespace {

enum Kind : uint32_t { kProbe = 1, kAllreduce, kReduceScatter, kAllgather, kBroadcast };

const char* kind_name(uint32_t kind) {
  switch (kind) {
    case kProbe:
      return "the direct probe";
    case kAllreduce:
      return "allreduce";
    case kReduceScatter:
      return "reduce_scatter";
    case kAllgather:
      return "allgather";
    case kBroadcast:
      return "broadcast";
  }
  return "an unknown collective";
}

// Moves `bytes` between `local` and `remote` in process `pid` (into the peer when
// `write`, else out of it); 0 or the errno of the failure.
int cross_memory(bool write, pid_t pid, std::byte* local, uint64_t remote, size_t bytes) {
  while (bytes > 0) {
    iovec mine{local, bytes};
    iovec theirs{reinterpret_cast<void*>(remote), bytes};
    const ssize_t n = write ? ::process_vm_writev(pid, &mine, 1, &theirs, 1, 0)
                            : ::process_vm_readv(pid, &mine, 1, &theirs, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : EFAULT;
    local += n;
    remote += static_cast<uint64_t>(n);
    bytes -= static_cast<size_t>(n);
  }
  return 0;
}
int try_read(pid_t pid, uint64_t from, void* to, size_t bytes) {
  return cross_memory(false, pid, static_cast<std::byte*>(to), from, bytes);
}
int try_write(pid_t pid, const void* from, uint64_t to, size_t bytes) {
  // process_vm_writev only reads the local iovec.
  return cross_memory(true, pid, const_cast<std::byte*>(static_cast<const std::byte*>(from)), to,
                      bytes);
}

std::string errno_message(int err) { return std::system_category().message(err); }

// Block b of `count` elements split over n ranks: the first count % n one longer.
size_t block_start(size_t count, int n, int b) {
  const size_t ub = static_cast<size_t>(b), un = static_cast<size_t>(n);
  return ub * (count / un) + std::min(ub, count % un);
}
size_t block_count(size_t count, int n, int b) {
  return block_start(count, n, b + 1) - block_start(count, n, b);
}

uint64_t address(const void* p) { return reinterpret_cast<uint64_t>(p); }
uint64_t own_pid() { return static_cast<uint64_t>(::getpid()); }

}  // namespace

DirectCollectives::DirectCollectives(LocalCollectives& slots, std::function<void()> check_peers,
                                     size_t chunk_bytes)
    : slots_(slots),
      check_peers_(std::move(check_peers)),
      chunk_bytes_(chunk_bytes),
      scratch_(2 * chunk_bytes),  // zeroed: every page touched now, not in a collective
      pid_(static_cast<size_t>(slots.size())),
      addr_(static_cast<size_t>(slots.size())),
      probe_word_(std::random_device{}() | 1) {
  DTRAIN_CHECK(chunk_bytes_ >= 8, InvalidArgument,
               "shm: direct collectives need chunks of at least 8 bytes, got {}", chunk_bytes_);
  DTRAIN_CHECK(slots_.capacity() >= sizeof(Header), InternalError,
               "shm: direct collectives need slots of at least {} bytes, got {}", sizeof(Header),
               slots_.capacity());
}

DirectCollectives::Header DirectCollectives::call(uint32_t kind, const void* buffer, size_t count,
                                                  DType dtype, int root) {
  return {.pid = own_pid(),
          .addr = address(buffer),
          .count = count,
          .value = 0,
          .kind = kind,
          .dtype = static_cast<uint32_t>(dtype),
          .root = root,
          .enabled = 1};
}

DirectCollectives::Header DirectCollectives::header(int r) const {
  Header h;
  std::memcpy(&h, slots_.input(r), sizeof(h));
  return h;
}

void DirectCollectives::publish(const Header& mine, Deadline deadline) {
  running_ = kind_name(mine.kind);
  std::memcpy(slots_.begin(sizeof(Header), deadline), &mine, sizeof(Header));
  slots_.post(deadline);
  for (int r = 0; r < size(); ++r) {
    const Header h = r == rank() ? mine : header(r);
    const bool same = h.kind == mine.kind &&
                      (mine.kind == kProbe ||
                       (h.count == mine.count && h.dtype == mine.dtype && h.root == mine.root));
    DTRAIN_CHECK(same, CommError,
                 "tcp: collective mismatch: rank {} calls {} of {} {} (root {}), rank {} calls {} "
                 "of {} {} (root {})",
                 rank(), kind_name(mine.kind), mine.count,
                 dtype_name(static_cast<DType>(mine.dtype)), mine.root, r, kind_name(h.kind),
                 h.count, dtype_name(static_cast<DType>(h.dtype)), h.root);
    pid_[static_cast<size_t>(r)] = static_cast<pid_t>(h.pid);
    addr_[static_cast<size_t>(r)] = h.addr;
  }
}

void DirectCollectives::read(int r, uint64_t from, void* to, size_t bytes) {
  const pid_t pid = pid_[static_cast<size_t>(r)];
  const int err = try_read(pid, from, to, bytes);
  if (err == 0) return;
  check_peers_();  // a peer that is gone or failed: the transport's report of it
  DTRAIN_THROW(CommError, "tcp: cannot read rank {}'s buffer (pid {}) in {}: {}", r, pid, running_,
               errno_message(err));
}

void DirectCollectives::write(int r, const void* from, uint64_t to, size_t bytes) {
  const pid_t pid = pid_[static_cast<size_t>(r)];
  const int err = try_write(pid, from, to, bytes);
  if (err == 0) return;
  check_peers_();
  DTRAIN_THROW(CommError, "tcp: cannot write rank {}'s buffer (pid {}) in {}: {}", r, pid, running_,
               errno_message(err));
}

void DirectCollectives::barrier(Deadline deadline) {
  slots_.begin(0, deadline);
  slots_.post(deadline);
}

bool DirectCollectives::probe(bool enabled, bool fault, Deadline deadline, std::string* why) {
  Header mine = call(kProbe, fault ? nullptr : &probe_word_, 0, DType::u8, -1);
  mine.value = probe_word_;
  mine.enabled = enabled ? 1 : 0;
  publish(mine, deadline);
  std::string reason = enabled ? "" : "DTRAIN_DIRECT=0 on this rank";
  for (int r = 0; r < size() && reason.empty(); ++r) {
    if (r == rank()) continue;
    const Header h = header(r);
    uint64_t got = 0;
    const auto pid = static_cast<pid_t>(h.pid);
    int err = h.enabled == 0 ? 0 : try_read(pid, h.addr, &got, 8);
    if (h.enabled != 0 && err == 0 && got == h.value) err = try_write(pid, &got, h.addr, 8);
    if (h.enabled == 0) {
      reason = fmt::format("rank {} has DTRAIN_DIRECT=0", r);
    } else if (err != 0 || got != h.value) {
      reason = fmt::format("process_vm_readv/writev of rank {} (pid {}) failed: {}", r, h.pid,
                           err != 0 ? errno_message(err) : "read a different value");
    }
  }
  uint8_t ok = reason.empty() ? 1 : 0;
  slots_.allreduce(&ok, 1, DType::u8, ReduceOp::kMin, deadline);
  if (ok == 0 && reason.empty()) reason = "another rank cannot read its peers' memory";
  *why = reason;
  return ok != 0;
}

void DirectCollectives::reduce_chunk(std::byte* dst, const std::byte* own, size_t at, size_t count,
                                     DType dtype, ReduceOp op) {
  const size_t bytes = count * dtype_size(dtype);
  std::byte* acc = scratch_.data();
  std::byte* in = acc + chunk_bytes_;
  // x0 op ... op x_{rank-1} in the accumulator, then x_rank op that (the same bits for
  // two operands), then the higher ranks in order.
  const int me = rank();
  if (me > 0) read(0, addr_[0] + at, acc, bytes);
  for (int r = 1; r < me; ++r) {
    read(r, addr_[static_cast<size_t>(r)] + at, in, bytes);
    reduce_into(acc, in, count, dtype, op);
  }
  if (dst != own) std::memcpy(dst, own, bytes);
  if (me > 0) reduce_into(dst, acc, count, dtype, op);
  for (int r = me + 1; r < size(); ++r) {
    read(r, addr_[static_cast<size_t>(r)] + at, in, bytes);
    reduce_into(dst, in, count, dtype, op);
  }
  if (op == ReduceOp::kAvg) scale_in_place(dst, count, dtype, 1.0 / size());
}

void DirectCollectives::reduce_block(std::byte* dst, const std::byte* own, size_t first,
                                     size_t count, DType dtype, ReduceOp op) {
  const size_t es = dtype_size(dtype);
  const size_t step = std::max<size_t>(1, chunk_bytes_ / es);
  for (size_t done = 0; done < count; done += step) {
    const size_t k = std::min(step, count - done);
    reduce_chunk(dst + done * es, own + done * es, (first + done) * es, k, dtype, op);
  }
}

void DirectCollectives::allreduce(void* data, size_t count, DType dtype, ReduceOp op,
                                  Deadline deadline) {
  const size_t es = dtype_size(dtype);
  publish(call(kAllreduce, data, count, dtype, -1), deadline);
  auto* buf = static_cast<std::byte*>(data);
  const int n = size();
  const size_t first = block_start(count, n, rank()), total = block_count(count, n, rank());
  const size_t step = std::max<size_t>(1, chunk_bytes_ / es);
  for (size_t done = 0; done < total; done += step) {
    const size_t k = std::min(step, total - done), at = (first + done) * es;
    reduce_chunk(buf + at, buf + at, at, k, dtype, op);
    for (int i = 1; i < n; ++i) {  // the reduced chunk, still in cache, to every peer
      const int r = (rank() + i) % n;
      write(r, buf + at, addr_[static_cast<size_t>(r)] + at, k * es);
    }
  }
  barrier(deadline);  // every block is in every buffer; nobody reads or writes ours
}

void DirectCollectives::reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                                       ReduceOp op, Deadline deadline) {
  publish(call(kReduceScatter, send, count, dtype, -1), deadline);
  const size_t first = count * static_cast<size_t>(rank());
  reduce_block(static_cast<std::byte*>(recv),
               static_cast<const std::byte*>(send) + first * dtype_size(dtype), first, count, dtype,
               op);
  barrier(deadline);
}

void DirectCollectives::allgather(const void* send, void* recv, size_t count, DType dtype,
                                  Deadline deadline) {
  publish(call(kAllgather, send, count, dtype, -1), deadline);
  const size_t bytes = count * dtype_size(dtype);
  auto* out = static_cast<std::byte*>(recv);
  std::byte* own = out + bytes * static_cast<size_t>(rank());
  if (bytes > 0 && own != send) std::memcpy(own, send, bytes);
  for (int i = 1; i < size(); ++i) {
    const int r = (rank() + i) % size();
    read(r, addr_[static_cast<size_t>(r)], out + bytes * static_cast<size_t>(r), bytes);
  }
  barrier(deadline);
}

void DirectCollectives::broadcast(void* data, size_t count, DType dtype, int root,
                                  Deadline deadline) {
  publish(call(kBroadcast, data, count, dtype, root), deadline);
  if (rank() != root) read(root, addr_[static_cast<size_t>(root)], data, count * dtype_size(dtype));
  barrier(deadline);
}

}  // namespace dtrain::comm::shm
