// Layer partitioning and pipeline schedules as plain data (see schedule.h).
#include "dtrain/parallel/schedule.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <map>
#include <tuple>
#include <utility>

#include "dtrain/common/error.h"

namespace dtrain::parallel {

std::vector<int64_t> partition_layers(const std::vector<int64_t>& layer_params, int stages) {
  const int64_t n = static_cast<int64_t>(layer_params.size());
  DTRAIN_CHECK(stages >= 1 && stages <= n, InvalidArgument,
               "pipeline: {} stages for a model of {} layers", stages, n);
  std::vector<int64_t> prefix(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    DTRAIN_CHECK(layer_params[i] >= 0, InvalidArgument,
                 "pipeline: layer {} has a negative parameter count {}", i, layer_params[i]);
    prefix[i + 1] = prefix[i] + layer_params[i];
  }
  // best[k][i]: the smallest largest stage when layers [0, i) form k stages;
  // cut[k][i]: where the last of those stages starts.
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max();
  const size_t S = static_cast<size_t>(stages) + 1, N = static_cast<size_t>(n) + 1;
  std::vector<std::vector<int64_t>> best(S, std::vector<int64_t>(N, kInf)), cut = best;
  best[0][0] = 0;
  for (size_t k = 1; k < S; ++k) {
    for (size_t i = k; i < N; ++i) {
      for (size_t j = k - 1; j < i; ++j) {
        if (best[k - 1][j] == kInf) continue;
        const int64_t worst = std::max(best[k - 1][j], prefix[i] - prefix[j]);
        if (worst < best[k][i]) best[k][i] = worst, cut[k][i] = static_cast<int64_t>(j);
      }
    }
  }
  std::vector<int64_t> starts(static_cast<size_t>(stages));
  size_t end = N - 1;
  for (size_t k = S - 1; k >= 1; --k) {
    starts[k - 1] = cut[k][end];
    end = static_cast<size_t>(cut[k][end]);
  }
  return starts;
}

const char* schedule_name(ScheduleKind kind) {
  return kind == ScheduleKind::kGPipe ? "gpipe" : "1f1b";
}

ScheduleKind parse_schedule(const std::string& name) {
  if (name == "gpipe") return ScheduleKind::kGPipe;
  if (name == "1f1b") return ScheduleKind::k1F1B;
  DTRAIN_THROW(InvalidArgument, "pipeline: unknown schedule '{}' (choices: gpipe, 1f1b)", name);
}

namespace {

// Appends the actions of one stage; `odd` stages receive before they send at the
// 1F1B exchanges (see the file comment of schedule.h).
struct StageBuilder {
  bool first, last, odd;
  std::vector<Action> out;

  void forward(int mb, bool send = true) {
    if (!first) out.push_back({ActionKind::kRecvForward, mb});
    out.push_back({ActionKind::kForward, mb});
    if (!last && send) out.push_back({ActionKind::kSendForward, mb});
  }
  void backward(int mb, bool recv = true, bool send = true) {
    if (!last && recv) out.push_back({ActionKind::kRecvBackward, mb});
    out.push_back({ActionKind::kBackward, mb});
    if (!first && send) out.push_back({ActionKind::kSendBackward, mb});
  }
  // Two transfers with different neighbours or directions, in parity order.
  void exchange(Action send, Action recv, bool has_send, bool has_recv) {
    std::vector<Action> pair;
    if (has_send) pair.push_back(send);
    if (has_recv) pair.push_back(recv);
    if (odd) std::reverse(pair.begin(), pair.end());
    out.insert(out.end(), pair.begin(), pair.end());
  }
};

std::vector<Action> one_f_one_b(StageBuilder b, int stages, int stage, int m) {
  const int warmup = std::min(stages - 1 - stage, m);
  for (int mb = 0; mb < warmup; ++mb) b.forward(mb);
  for (int i = 0; i < m - warmup; ++i) {
    const int f = warmup + i;
    if (i == 0)
      b.forward(f, /*send=*/false);  // later forwards got their input below
    else
      b.out.push_back({ActionKind::kForward, f});
    b.exchange({ActionKind::kSendForward, f}, {ActionKind::kRecvBackward, i}, !b.last, !b.last);
    b.backward(i, /*recv=*/false, /*send=*/false);
    const bool more = f + 1 < m;
    b.exchange({ActionKind::kSendBackward, i}, {ActionKind::kRecvForward, f + 1}, !b.first,
               more && !b.first);
  }
  for (int i = m - warmup; i < m; ++i) b.backward(i);
  return std::move(b.out);
}

}  // namespace

std::vector<Action> make_schedule(ScheduleKind kind, int stages, int stage, int microbatches) {
  DTRAIN_CHECK(stages >= 1 && stage >= 0 && stage < stages, InvalidArgument,
               "pipeline: stage {} of {} stages", stage, stages);
  DTRAIN_CHECK(microbatches >= 1, InvalidArgument, "pipeline: {} micro-batches (need >= 1)",
               microbatches);
  StageBuilder b{stage == 0, stage == stages - 1, stage % 2 == 1, {}};
  if (kind == ScheduleKind::k1F1B) return one_f_one_b(std::move(b), stages, stage, microbatches);
  for (int mb = 0; mb < microbatches; ++mb) b.forward(mb);
  for (int mb = 0; mb < microbatches; ++mb) b.backward(mb);
  return std::move(b.out);
}

std::string action_str(const Action& a) {
  switch (a.kind) {
    case ActionKind::kRecvForward:
      return fmt::format("recvF{}", a.microbatch);
    case ActionKind::kForward:
      return fmt::format("F{}", a.microbatch);
    case ActionKind::kSendForward:
      return fmt::format("sendF{}", a.microbatch);
    case ActionKind::kRecvBackward:
      return fmt::format("recvB{}", a.microbatch);
    case ActionKind::kBackward:
      return fmt::format("B{}", a.microbatch);
    case ActionKind::kSendBackward:
      return fmt::format("sendB{}", a.microbatch);
  }
  return "?";
}

std::string format_schedule(ScheduleKind kind, int stages, int microbatches) {
  // Compute actions of each stage in order; each takes one slot, starting when the
  // stage is free and its input (the neighbour's F or B of that micro-batch) is done.
  std::vector<std::vector<Action>> compute(static_cast<size_t>(stages));
  for (int s = 0; s < stages; ++s) {
    for (const Action& a : make_schedule(kind, stages, s, microbatches)) {
      if (a.kind == ActionKind::kForward || a.kind == ActionKind::kBackward) {
        compute[s].push_back(a);
      }
    }
  }
  std::map<std::tuple<int, int, int>, int> end;  // (stage, is_backward, mb) -> end slot
  std::vector<size_t> next(compute.size(), 0);
  std::vector<int> free_at(compute.size(), 0);
  std::vector<std::map<int, std::string>> slots(compute.size());
  for (bool progress = true; progress;) {
    progress = false;
    for (int s = 0; s < stages; ++s) {
      while (next[s] < compute[s].size()) {
        const Action& a = compute[s][next[s]];
        const bool bwd = a.kind == ActionKind::kBackward;
        const int dep_stage = bwd ? (s == stages - 1 ? s : s + 1) : s - 1;
        const auto dep = std::make_tuple(dep_stage, bwd && s != stages - 1 ? 1 : 0, a.microbatch);
        int start = free_at[s];
        if (dep_stage >= 0) {
          auto it = end.find(dep);
          if (it == end.end()) break;
          start = std::max(start, it->second);
        }
        slots[s][start] = action_str(a);
        end[{s, bwd ? 1 : 0, a.microbatch}] = free_at[s] = start + 1;
        ++next[s];
        progress = true;
      }
    }
  }
  const int total = *std::max_element(free_at.begin(), free_at.end());
  const size_t width = action_str({ActionKind::kForward, microbatches - 1}).size();
  std::string out;
  for (int s = 0; s < stages; ++s) {
    std::string row = fmt::format("stage {}:", s);
    for (int t = 0; t < total; ++t) {
      auto it = slots[s].find(t);
      row += fmt::format(" {:<{}}", it == slots[s].end() ? "." : it->second, width);
    }
    while (!row.empty() && row.back() == ' ') row.pop_back();
    out += row + "\n";
  }
  return out;
}

}  // namespace dtrain::parallel
