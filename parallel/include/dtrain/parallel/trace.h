// Tracer: a timeline of training steps, written as Chrome trace JSON.
//
// The Trainer records forward, backward, gradient sync and optimizer spans; DDP
// records pack (a gradient copied into its bucket), one all-reduce per bucket (from
// issue to completion), wait (the training thread blocked on the buckets after
// backward) and unpack (the averages copied back into grad()). write_chrome_trace
// turns them into {"traceEvents": [{"name","cat","ph":"X","ts","dur","pid","tid"}]}
// that chrome://tracing and ui.perfetto.dev open: pid is the rank, tid 0 the
// training thread, tid 1 + b the all-reduce of bucket b (its own track, so its
// overlap with backward is visible; buckets in flight together never mis-nest).
// ts are steady_clock microseconds since the clock's epoch, the same for every
// process on one host, so the rank files of one host line up when merged.
//
//   Tracer tracer(rank);
//   { ScopedSpan s(&tracer, SpanKind::kForward); ... }       // a null tracer: no-op
//   write_chrome_trace(tracer, "trace.rank0.json");
//   CommOverlap o = communication_overlap(tracer.spans());    // hidden behind backward
//
// Off is a null Tracer* (DdpOptions::tracer, TrainerParts::tracer): each hook is one
// pointer test. On, a span costs a clock read and a locked push_back.
//
// GPU: spans measure the host. A CUDA kernel or copy is queued, not finished, when
// its span ends (the all-reduce's completion is the backend's own, see
// comm::Work::completed_at).
//
// Not here: flow arrows, counters, the clock alignment of ranks on different hosts.
// Thread-safety: record() and spans() may be called from any thread; set_step from
// the training thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace dtrain::parallel {

using TraceClock = std::chrono::steady_clock;

enum class SpanKind {
  kStep,           // one whole training step (the rest nest inside it)
  kForward,        // the loss of one (micro-)batch
  kBackward,       // from the last forward's end to the plan's return
  kSyncGradients,  // the plan's gradient synchronisation
  kOptimizer,      // the plan's optimizer step and the schedule
  kPack,           // DDP: one gradient copied into its bucket
  kAllReduce,      // DDP: one bucket's average, issue to completion
  kWait,           // DDP: the training thread blocked on the buckets
  kUnpack,         // DDP: the averages copied back into grad()
};

const char* span_name(SpanKind kind);      // "forward", "allreduce", ...
const char* span_category(SpanKind kind);  // "compute", "ddp" or "comm"

struct Span {
  SpanKind kind = SpanKind::kStep;
  TraceClock::time_point start;
  TraceClock::time_point end;
  int bucket = -1;    // DDP's bucket index; -1: none
  int64_t step = -1;  // the training step (1-based) it belongs to; -1: before the first
};

// The track a span is drawn on: 0 the training thread, 1 + b bucket b's all-reduce.
int span_tid(const Span& span);

class Tracer {
 public:
  explicit Tracer(int rank) : rank_(rank) {}
  int rank() const { return rank_; }
  // Spans recorded from now on belong to `step`.
  void set_step(int64_t step) { step_.store(step, std::memory_order_relaxed); }
  int64_t step() const { return step_.load(std::memory_order_relaxed); }
  // Records [start, end), stamped with the current step.
  void record(SpanKind kind, TraceClock::time_point start, TraceClock::time_point end,
              int bucket = -1);
  std::vector<Span> spans() const;  // a copy, in recording order

 private:
  int rank_;
  std::atomic<int64_t> step_{-1};
  mutable std::mutex mu_;
  std::vector<Span> spans_;  // GUARDED_BY(mu_)
};

// Records its lifetime as one span; does nothing for a null tracer.
class ScopedSpan {
 public:
  ScopedSpan(Tracer* tracer, SpanKind kind, int bucket = -1)
      : tracer_(tracer), kind_(kind), bucket_(bucket) {
    if (tracer_) start_ = TraceClock::now();
  }
  ~ScopedSpan() {
    if (tracer_) tracer_->record(kind_, start_, TraceClock::now(), bucket_);
  }
  ScopedSpan(const ScopedSpan&) = delete;
  ScopedSpan& operator=(const ScopedSpan&) = delete;

 private:
  Tracer* tracer_;
  SpanKind kind_;
  int bucket_;
  TraceClock::time_point start_;
};

// The Chrome trace JSON of the tracer's spans (with process and thread names).
std::string chrome_trace_json(const Tracer& tracer);
// Writes it to path. Throws IoError naming the path when it cannot be written.
void write_chrome_trace(const Tracer& tracer, const std::string& path);
// Throws IoError unless path can be created (or overwritten) now: checked before
// training so that a bad --trace fails at the start, not after the run.
void check_trace_writable(const std::string& path);

// --trace FILE for one rank: FILE with ".rank<r>" before its ".json" (trace.json ->
// trace.rank0.json; a name without .json gets ".rank<r>.json" appended); a FILE that
// ends in '/' or is an existing folder gets "trace.rank<r>.json" inside it.
std::string trace_path_for_rank(const std::string& flag, int rank);

// All-reduce time and how much of it ran while backward did. allreduce_s is the
// union of the all-reduce spans (buckets in flight together count once), hidden_s
// its intersection with the union of the backward spans, wait_s the sum of the
// wait spans.
struct CommOverlap {
  double allreduce_s = 0;
  double hidden_s = 0;
  double wait_s = 0;
  double exposed_s() const { return allreduce_s - hidden_s; }
  double hidden_fraction() const { return allreduce_s > 0 ? hidden_s / allreduce_s : 0; }
};
CommOverlap communication_overlap(const std::vector<Span>& spans);
// The same per training step, in step order (steps without all-reduce included).
std::vector<std::pair<int64_t, CommOverlap>> communication_overlap_by_step(
    const std::vector<Span>& spans);
// "communication: 41.2 ms in all-reduce, 29.0 ms hidden behind backward (70%), 12.2 ms
// exposed; 11.0 ms waiting after backward", or a line saying there was none.
std::string overlap_line(const CommOverlap& overlap);

}  // namespace dtrain::parallel
