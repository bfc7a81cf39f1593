// The plan of a pipeline, as plain data: which layers each stage holds, and the order
// in which each stage runs its forwards, backwards, sends and receives.
//
// Schedules (p stages, m micro-batches, picotron's and Megatron's names):
//   kGPipe ("all forward, all backward"): every forward, then every backward; each
//          stage keeps the activations of all m micro-batches.
//   k1F1B: min(p - 1 - stage, m) warm-up forwards, then one forward and one backward
//          in turn, then the remaining backwards; a stage keeps at most p - stage
//          micro-batches in flight. The bubble is the same, (p - 1) / (m + p - 1).
//
// Blocking point-to-point: a send may not return until the peer receives (large
// messages over tcp). In the 1F1B steady state stage s sends an activation forward
// while stage s+1 sends a gradient back; both sending first would deadlock. So at
// each such exchange odd stages receive before they send (even stages send first):
// neighbours always have opposite parity, and every pairing of the two then meets.
// tests/test_pipeline.cc runs every schedule through a simulator with rendezvous
// semantics to show it completes.
//
// Deliberately not here: running a schedule (pipeline.h), interleaved (virtual
// stage) schedules, zero-bubble splits of the backward.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dtrain::parallel {

// First layer index of each stage (size `stages`, starting with 0): contiguous,
// non-empty stages minimising the largest stage's parameter count (exact DP).
// InvalidArgument, one line with the numbers, when stages < 1 or stages > layers,
// or a count is negative.
std::vector<int64_t> partition_layers(const std::vector<int64_t>& layer_params, int stages);

enum class ActionKind {
  kRecvForward,  // activation of `microbatch` from stage - 1
  kForward,
  kSendForward,   // output of `microbatch` to stage + 1
  kRecvBackward,  // gradient of this stage's output from stage + 1
  kBackward,
  kSendBackward,  // gradient of this stage's input to stage - 1
};
struct Action {
  ActionKind kind;
  int microbatch;
  bool operator==(const Action& o) const { return kind == o.kind && microbatch == o.microbatch; }
};

enum class ScheduleKind { kGPipe, k1F1B };
const char* schedule_name(ScheduleKind kind);  // "gpipe", "1f1b"
// Parses "gpipe" or "1f1b"; InvalidArgument naming the choices otherwise.
ScheduleKind parse_schedule(const std::string& name);

// Every action of `stage` in order. The first stage has no receives of activations
// nor sends of gradients, the last none of the other two. InvalidArgument unless
// 0 <= stage < stages and microbatches >= 1.
std::vector<Action> make_schedule(ScheduleKind kind, int stages, int stage, int microbatches);

// "F3", "B0", "recvF3", "sendB0".
std::string action_str(const Action& a);

// A timeline, one row per stage, forwards and backwards placed in unit time slots as
// early as their data allows ("." idle), for --print-schedule:
//   stage 0: F0 F1 .  .  B0 B1
//   stage 1: .  F0 F1 B0 B1 .
std::string format_schedule(ScheduleKind kind, int stages, int microbatches);

}  // namespace dtrain::parallel
