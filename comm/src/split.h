// The arithmetic of Communicator::split shared by the backends: argument checks and the
// group a rank lands in, computed from every rank's (color, key) pair (MPI_Comm_split
// semantics: same color, one group; ranked by (key, parent rank)).
//
// Deliberately not here: exchanging the pairs (each backend does it over its own
// communicator) and building the child.
#pragma once

#include <cstdint>
#include <vector>

namespace dtrain::comm::split_detail {

// Throws InvalidArgument unless color is Communicator::kNoColor or non-negative.
void check_color(int color, const char* backend);

struct Group {
  // Parent ranks of the members, in the order of their ranks in the child. Empty when
  // this rank passed kNoColor.
  std::vector<int> members;
  int rank = -1;  // this rank's rank in the child; -1 with kNoColor
};

// color_key holds 2 * parent_size values: rank r's color at 2r, its key at 2r + 1.
Group group_of(const std::vector<int64_t>& color_key, int parent_rank);

}  // namespace dtrain::comm::split_detail
