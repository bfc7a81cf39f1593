// The pipelined ring (see ring.h for the algorithms and their contract).
//
// Every ring collective is one "pass": S steps around the ring, where at step s each
// rank sends segment send_seg(s) = base - s to its right neighbour and receives
// segment recv_seg(s) = base - s - 1 from its left one (mod n). Because
// send_seg(s + 1) == recv_seg(s), what a rank receives (and reduces) at step s is
// exactly what it forwards at step s + 1, chunk by chunk. The first `reduce_steps`
// steps receive into scratch slots and reduce into place; the remaining steps
// receive straight into the destination. Units (step, chunk) are processed in order;
// the receives of the next `window` units are always posted, so the transport
// fills them while the current unit is reduced.
#include <algorithm>
#include <cstring>

#include "dtrain/comm/ring.h"

namespace dtrain::comm {

struct Ring::Pass {
  DType dtype = DType::f32;
  ReduceOp op = ReduceOp::kSum;
  std::vector<size_t> seg_offset;  // n + 1 element offsets: segment j = [off[j], off[j+1])
  int base = 0;                    // send_seg(s) = base - s, recv_seg(s) = base - s - 1
  int steps = 0;
  int reduce_steps = 0;            // the first reduce_steps steps reduce, the rest copy
  const std::byte* src = nullptr;  // step-0 sends read src + segment offset
  std::byte* out = nullptr;        // copy steps (and in-place reductions) write here
  // Out-of-place reduction (reduce_scatter): local contributions are read from
  // `local`, partial sums travel in scratch slots, the last step writes `final_out`
  // (segment-relative). In place (allreduce): local == out, final_out unused.
  const std::byte* local = nullptr;
  std::byte* final_out = nullptr;
  double final_scale = 1.0;  // applied to the fully reduced chunks (kAvg)
};

PointToPoint::Request PointToPoint::post_recv_reduce(void*, size_t, DType, ReduceOp, int peer) {
  DTRAIN_THROW(InvalidArgument, "this transport cannot reduce on receive (from rank {})", peer);
}

namespace {

int mod(int a, int n) { return ((a % n) + n) % n; }

std::vector<size_t> even_segments(size_t count, int n) {
  std::vector<size_t> off(static_cast<size_t>(n) + 1);
  size_t base = count / static_cast<size_t>(n), rem = count % static_cast<size_t>(n);
  for (int j = 0; j < n; ++j) {
    off[j + 1] = off[j] + base + (static_cast<size_t>(j) < rem ? 1 : 0);
  }
  return off;
}

std::vector<size_t> block_segments(size_t count, int n) {
  std::vector<size_t> off(static_cast<size_t>(n) + 1);
  for (int j = 0; j <= n; ++j) off[j] = static_cast<size_t>(j) * count;
  return off;
}

void check_dtype(DType dtype, const char* op) {
  DTRAIN_CHECK(dtype_size(dtype) > 0, DTypeError, "ring {}: unknown dtype {}", op,
               static_cast<int>(dtype));
}

struct Unit {
  int step;
  size_t off;  // element offset in the full buffer
  size_t len;  // elements
};

}  // namespace

Ring::Ring(PointToPoint& p2p, RingOptions options) : p2p_(p2p), opts_(options) {
  DTRAIN_CHECK(opts_.chunk_bytes >= 64, InvalidArgument,
               "ring: chunk_bytes must be at least 64, got {}", opts_.chunk_bytes);
  DTRAIN_CHECK(opts_.window >= 1, InvalidArgument, "ring: window must be at least 1, got {}",
               opts_.window);
}

void Ring::run(const Pass& p, Deadline deadline) {
  const int n = p2p_.size(), rank = p2p_.rank();
  const int right = mod(rank + 1, n), left = mod(rank - 1, n);
  const size_t es = dtype_size(p.dtype);
  const size_t ce = std::max<size_t>(1, opts_.chunk_bytes / es);
  const bool in_place = p.local == p.out;
  const size_t window = static_cast<size_t>(opts_.window);
  const bool cold = p.seg_offset.back() * es >= opts_.cold_min_bytes;
  // In place, a transport that reduces on receive needs no scratch at all.
  const bool recv_reduce = in_place && p.reduce_steps > 0 && p2p_.can_recv_reduce(left);

  auto chunks_of = [&](int seg, auto&& fn) {
    size_t begin = p.seg_offset[seg], end = p.seg_offset[seg + 1];
    for (size_t off = begin; off < end; off += ce) fn(off, std::min(ce, end - off));
  };
  std::vector<Unit> units;
  for (int s = 0; s < p.steps; ++s) {
    chunks_of(mod(p.base - s - 1, n), [&](size_t off, size_t len) {
      units.push_back({s, off, len});
    });
  }

  // Scratch: `window` slots in place. Out of place a slot also holds a partial sum
  // until its forward send has left, and that send follows, in the stream to the
  // right, every step-0 chunk of this rank's first segment: with fewer than a
  // segment's chunks plus `window` slots, reusing a slot would wait for the right
  // neighbour to be ahead of us, which all ranks cannot be at once (a deadlock as
  // soon as the transport buffers less than a segment, as the shared-memory rings do).
  const size_t slot_bytes = std::min(opts_.chunk_bytes, ce * es);
  size_t seg_chunks = 0;
  for (int j = 0; j < n; ++j) {
    seg_chunks = std::max(seg_chunks, (p.seg_offset[j + 1] - p.seg_offset[j] + ce - 1) / ce);
  }
  const size_t slots =
      p.reduce_steps == 0 || recv_reduce ? 0 : (in_place ? window : seg_chunks + window);
  if (scratch_.size() < slots * slot_bytes) scratch_.resize(slots * slot_bytes);
  std::vector<PointToPoint::Request> slot_send(slots);
  std::vector<bool> slot_busy(slots, false);
  auto slot_ptr = [&](size_t u) { return scratch_.data() + (u % slots) * slot_bytes; };

  PointToPoint::Request last_send;
  bool any_send = false;
  auto send = [&](const std::byte* ptr, size_t len) {
    last_send = p2p_.post_send(ptr, len * es, right);
    any_send = true;
    return last_send;
  };
  chunks_of(mod(p.base, n), [&](size_t off, size_t len) { send(p.src + off * es, len); });

  std::vector<PointToPoint::Request> recv_req(window);
  size_t posted = 0;
  auto post_next = [&] {
    const Unit& un = units[posted];
    std::byte* dst;
    if (un.step < p.reduce_steps && recv_reduce) {
      recv_req[posted % window] =
          p2p_.post_recv_reduce(p.out + un.off * es, un.len, p.dtype, p.op, left);
      ++posted;
      return;
    }
    if (un.step < p.reduce_steps) {
      size_t slot = posted % slots;
      if (slot_busy[slot]) p2p_.wait(slot_send[slot], deadline);
      slot_busy[slot] = false;
      dst = slot_ptr(posted);
    } else {
      dst = p.out + un.off * es;
    }
    const bool cold_copy = cold && un.step >= p.reduce_steps;  // straight into the output
    recv_req[posted % window] = cold_copy ? p2p_.post_recv_cold(dst, un.len * es, left)
                                          : p2p_.post_recv(dst, un.len * es, left);
    ++posted;
  };
  while (posted < std::min(window, units.size())) post_next();

  for (size_t u = 0; u < units.size(); ++u) {
    const Unit& un = units[u];
    p2p_.wait(recv_req[u % window], deadline);
    const bool forward = un.step + 1 < p.steps;
    const std::byte* fwd = nullptr;  // what step + 1 sends: this chunk, reduced or copied
    if (un.step >= p.reduce_steps) {
      fwd = p.out + un.off * es;
    } else if (recv_reduce) {  // already reduced by the transport
      fwd = p.out + un.off * es;
      if (un.step == p.reduce_steps - 1) {
        scale_in_place(p.out + un.off * es, un.len, p.dtype, p.final_scale);
      }
    } else {
      std::byte* slot = slot_ptr(u);
      const bool last_reduce = un.step == p.reduce_steps - 1;
      if (in_place) {
        fwd = p.out + un.off * es;
        reduce_into(p.out + un.off * es, slot, un.len, p.dtype, p.op);
        if (last_reduce) scale_in_place(p.out + un.off * es, un.len, p.dtype, p.final_scale);
      } else if (!last_reduce) {
        reduce_into(slot, p.local + un.off * es, un.len, p.dtype, p.op);
        fwd = slot;
      } else {
        // Segment-relative offset into the caller's output block.
        std::byte* dst = p.final_out + (un.off - p.seg_offset[mod(p.base - un.step - 1, n)]) * es;
        std::memcpy(dst, p.local + un.off * es, un.len * es);
        reduce_into(dst, slot, un.len, p.dtype, p.op);
        scale_in_place(dst, un.len, p.dtype, p.final_scale);
      }
    }
    if (forward) {
      PointToPoint::Request r = send(fwd, un.len);
      if (!in_place && un.step < p.reduce_steps) {
        slot_send[u % slots] = r;
        slot_busy[u % slots] = true;
      }
    }
    if (posted < units.size()) post_next();
  }
  if (any_send) p2p_.wait(last_send, deadline);  // sends complete in order
}

void Ring::allreduce(void* data, size_t count, DType dtype, ReduceOp op, Deadline deadline) {
  check_dtype(dtype, "allreduce");
  const int n = p2p_.size();
  const double scale = op == ReduceOp::kAvg ? 1.0 / n : 1.0;
  if (count == 0) return;
  if (n == 1) return scale_in_place(data, count, dtype, scale);
  Pass p;
  p.dtype = dtype;
  p.op = op;
  p.seg_offset = even_segments(count, n);
  p.base = p2p_.rank();
  p.steps = 2 * (n - 1);
  p.reduce_steps = n - 1;
  p.src = static_cast<const std::byte*>(data);
  p.out = static_cast<std::byte*>(data);
  p.local = p.out;
  p.final_scale = scale;
  run(p, deadline);
}

void Ring::reduce_scatter(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                          Deadline deadline) {
  check_dtype(dtype, "reduce_scatter");
  const int n = p2p_.size(), rank = p2p_.rank();
  const double scale = op == ReduceOp::kAvg ? 1.0 / n : 1.0;
  if (count == 0) return;
  const size_t bytes = count * dtype_size(dtype);
  if (n == 1) {
    if (recv != send) std::memmove(recv, send, bytes);
    return scale_in_place(recv, count, dtype, scale);
  }
  Pass p;
  p.dtype = dtype;
  p.op = op;
  p.seg_offset = block_segments(count, n);
  p.base = rank - 1;  // the last step receives segment `rank`
  p.steps = n - 1;
  p.reduce_steps = n - 1;
  p.src = static_cast<const std::byte*>(send);
  p.local = p.src;
  p.final_out = static_cast<std::byte*>(recv);
  p.final_scale = scale;
  run(p, deadline);
}

void Ring::allgather(const void* send, void* recv, size_t count, DType dtype, Deadline deadline) {
  check_dtype(dtype, "allgather");
  const int n = p2p_.size(), rank = p2p_.rank();
  if (count == 0) return;
  const size_t bytes = count * dtype_size(dtype);
  std::byte* own = static_cast<std::byte*>(recv) + static_cast<size_t>(rank) * bytes;
  if (own != send) std::memmove(own, send, bytes);
  if (n == 1) return;
  Pass p;
  p.dtype = dtype;
  p.seg_offset = block_segments(count, n);
  p.base = rank;
  p.steps = n - 1;
  p.reduce_steps = 0;
  p.src = static_cast<const std::byte*>(recv);
  p.out = static_cast<std::byte*>(recv);
  run(p, deadline);
}

void Ring::broadcast(void* data, size_t count, DType dtype, int root, Deadline deadline) {
  check_dtype(dtype, "broadcast");
  const int n = p2p_.size(), rank = p2p_.rank();
  if (count == 0 || n == 1) return;
  const int dist = mod(rank - root, n);
  const int right = mod(rank + 1, n), left = mod(rank - 1, n);
  const size_t es = dtype_size(dtype), ce = std::max<size_t>(1, opts_.chunk_bytes / es);
  const size_t chunks = (count + ce - 1) / ce;
  std::byte* base = static_cast<std::byte*>(data);
  auto len_of = [&](size_t k) { return std::min(ce, count - k * ce) * es; };

  PointToPoint::Request last_send;
  if (dist == 0) {
    for (size_t k = 0; k < chunks; ++k)
      last_send = p2p_.post_send(base + k * ce * es, len_of(k), right);
    p2p_.wait(last_send, deadline);
    return;
  }
  const size_t window = static_cast<size_t>(opts_.window);
  std::vector<PointToPoint::Request> recv_req(window);
  size_t posted = 0;
  auto post_next = [&] {
    recv_req[posted % window] = p2p_.post_recv(base + posted * ce * es, len_of(posted), left);
    ++posted;
  };
  while (posted < std::min(window, chunks)) post_next();
  const bool forward = dist < n - 1;
  for (size_t k = 0; k < chunks; ++k) {
    p2p_.wait(recv_req[k % window], deadline);
    if (forward) last_send = p2p_.post_send(base + k * ce * es, len_of(k), right);
    if (posted < chunks) post_next();
  }
  if (forward) p2p_.wait(last_send, deadline);
}

void Ring::barrier(Deadline deadline) {
  const int n = p2p_.size();
  if (n == 1) return;
  // After a ring allgather every rank has heard (transitively) from every other.
  std::vector<uint8_t> all(static_cast<size_t>(n));
  uint8_t mine = 1;
  allgather(&mine, all.data(), 1, DType::u8, deadline);
}

}  // namespace dtrain::comm
