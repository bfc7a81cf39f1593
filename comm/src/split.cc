// Communicator::split's group arithmetic (split.h).
#include "split.h"

#include <algorithm>
#include <tuple>

#include "dtrain/comm/communicator.h"
#include "dtrain/common/error.h"

namespace dtrain::comm::split_detail {

void check_color(int color, const char* backend) {
  DTRAIN_CHECK(color == Communicator::kNoColor || color >= 0, InvalidArgument,
               "{}: split color must be non-negative or kNoColor ({}), got {}", backend,
               Communicator::kNoColor, color);
}

Group group_of(const std::vector<int64_t>& color_key, int parent_rank) {
  const int n = static_cast<int>(color_key.size() / 2);
  DTRAIN_CHECK(parent_rank >= 0 && parent_rank < n, InvalidArgument,
               "split: rank {} outside a communicator of {} ranks", parent_rank, n);
  const int64_t color = color_key[2 * static_cast<size_t>(parent_rank)];
  Group g;
  if (color == Communicator::kNoColor) return g;
  for (int r = 0; r < n; ++r) {
    if (color_key[2 * static_cast<size_t>(r)] == color) g.members.push_back(r);
  }
  auto key = [&](int r) { return std::make_tuple(color_key[2 * static_cast<size_t>(r) + 1], r); };
  std::sort(g.members.begin(), g.members.end(), [&](int a, int b) { return key(a) < key(b); });
  g.rank = static_cast<int>(std::find(g.members.begin(), g.members.end(), parent_rank) -
                            g.members.begin());
  return g;
}

}  // namespace dtrain::comm::split_detail
