// Latency-bound collectives over a PointToPoint, for small messages between hosts
// (the ring's 2(n-1) steps cost 2(n-1) round trips; these cost log2(n)).
//
// recursive_doubling_allreduce: in round k every rank exchanges its whole partial
// result with the rank whose (virtual) number differs in bit k and combines the two;
// after log2(p) rounds (p the largest power of two <= n) every rank holds the result.
// The n - p ranks beyond p first fold in: rank 2i hands its input to rank 2i+1
// (i < n - p), takes no part in the rounds, and receives the result at the end. Both
// partners of a round combine the same two operands (a op b == b op a for every op),
// so every rank ends with the same bits.
#pragma once

#include <cstddef>
#include <vector>

#include "dtrain/comm/ring.h"

namespace dtrain::comm {

void recursive_doubling_allreduce(PointToPoint& p2p, void* data, size_t count, DType dtype,
                                  ReduceOp op, Deadline deadline, std::vector<std::byte>& scratch);

}  // namespace dtrain::comm
