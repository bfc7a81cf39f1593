// Recursive doubling (see recursive.h).
#include "recursive.h"

namespace dtrain::comm {
namespace {

void exchange(PointToPoint& p2p, void* data, void* scratch, size_t bytes, int peer,
              Deadline deadline) {
  PointToPoint::Request s = p2p.post_send(data, bytes, peer);
  PointToPoint::Request r = p2p.post_recv(scratch, bytes, peer);
  p2p.wait(r, deadline);
  p2p.wait(s, deadline);
}

}  // namespace

void recursive_doubling_allreduce(PointToPoint& p2p, void* data, size_t count, DType dtype,
                                  ReduceOp op, Deadline deadline, std::vector<std::byte>& scratch) {
  const int n = p2p.size(), r = p2p.rank();
  const size_t bytes = count * dtype_size(dtype);
  if (n == 1 || bytes == 0) return;
  if (scratch.size() < bytes) scratch.resize(bytes);
  int p = 1;
  while (p * 2 <= n) p *= 2;
  const int extra = n - p;
  const bool folded = r < 2 * extra;
  int virt = r - extra;  // this rank's number among the p that run the rounds
  if (folded && r % 2 == 0) {
    p2p.wait(p2p.post_send(data, bytes, r + 1), deadline);
    virt = -1;
  } else if (folded) {
    p2p.wait(p2p.post_recv(scratch.data(), bytes, r - 1), deadline);
    reduce_into(data, scratch.data(), count, dtype, op);
    virt = r / 2;
  }
  for (int mask = 1; virt >= 0 && mask < p; mask <<= 1) {
    const int v = virt ^ mask, peer = v < extra ? 2 * v + 1 : v + extra;
    exchange(p2p, data, scratch.data(), bytes, peer, deadline);
    reduce_into(data, scratch.data(), count, dtype, op);
  }
  if (folded && r % 2 == 0) p2p.wait(p2p.post_recv(data, bytes, r + 1), deadline);
  if (folded && r % 2 == 1) p2p.wait(p2p.post_send(data, bytes, r - 1), deadline);
  if (op == ReduceOp::kAvg) scale_in_place(data, count, dtype, 1.0 / n);
}

}  // namespace dtrain::comm
