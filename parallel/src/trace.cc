// Tracer: span storage, the Chrome trace writer and the overlap arithmetic (see trace.h).
#include "dtrain/parallel/trace.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>

#include "dtrain/common/error.h"

namespace dtrain::parallel {

namespace {

using Interval = std::pair<double, double>;  // [start, end) in seconds

double seconds(TraceClock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

double micros(TraceClock::duration d) {
  return std::chrono::duration<double, std::micro>(d).count();
}

// The spans of `kind` as sorted, disjoint intervals.
std::vector<Interval> merged(const std::vector<Span>& spans, SpanKind kind) {
  std::vector<Interval> in;
  for (const Span& s : spans) {
    if (s.kind == kind && s.end > s.start) in.emplace_back(seconds(s.start), seconds(s.end));
  }
  std::sort(in.begin(), in.end());
  std::vector<Interval> out;
  for (const Interval& i : in) {
    if (!out.empty() && i.first <= out.back().second) {
      out.back().second = std::max(out.back().second, i.second);
    } else {
      out.push_back(i);
    }
  }
  return out;
}

double total(const std::vector<Interval>& v) {
  double t = 0;
  for (const Interval& i : v) t += i.second - i.first;
  return t;
}

// The measure of the intersection of two sorted, disjoint interval lists.
double intersection(const std::vector<Interval>& a, const std::vector<Interval>& b) {
  double t = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const double lo = std::max(a[i].first, b[j].first);
    const double hi = std::min(a[i].second, b[j].second);
    if (hi > lo) t += hi - lo;
    (a[i].second < b[j].second ? i : j)++;
  }
  return t;
}

nlohmann::json event_json(const Span& s, int pid) {
  nlohmann::json e = {{"name", span_name(s.kind)},
                      {"cat", span_category(s.kind)},
                      {"ph", "X"},
                      {"ts", micros(s.start.time_since_epoch())},
                      {"dur", micros(s.end - s.start)},
                      {"pid", pid},
                      {"tid", span_tid(s)}};
  nlohmann::json args = {{"step", s.step}};
  if (s.bucket >= 0) args["bucket"] = s.bucket;
  e["args"] = std::move(args);
  return e;
}

nlohmann::json name_event(const char* what, int pid, int tid, const std::string& name) {
  return {{"name", what}, {"ph", "M"}, {"pid", pid}, {"tid", tid}, {"args", {{"name", name}}}};
}

}  // namespace

const char* span_name(SpanKind kind) {
  switch (kind) {
    case SpanKind::kStep:
      return "step";
    case SpanKind::kForward:
      return "forward";
    case SpanKind::kBackward:
      return "backward";
    case SpanKind::kSyncGradients:
      return "sync gradients";
    case SpanKind::kOptimizer:
      return "optimizer";
    case SpanKind::kPack:
      return "pack";
    case SpanKind::kAllReduce:
      return "allreduce";
    case SpanKind::kWait:
      return "wait";
    case SpanKind::kUnpack:
      return "unpack";
  }
  return "?";
}

const char* span_category(SpanKind kind) {
  switch (kind) {
    case SpanKind::kPack:
    case SpanKind::kWait:
    case SpanKind::kUnpack:
      return "ddp";
    case SpanKind::kAllReduce:
      return "comm";
    default:
      return "compute";
  }
}

int span_tid(const Span& span) {
  return span.kind == SpanKind::kAllReduce ? 1 + std::max(span.bucket, 0) : 0;
}

void Tracer::record(SpanKind kind, TraceClock::time_point start, TraceClock::time_point end,
                    int bucket) {
  Span s{kind, start, end, bucket, step()};
  std::lock_guard<std::mutex> lock(mu_);
  spans_.push_back(s);
}

std::vector<Span> Tracer::spans() const {
  std::lock_guard<std::mutex> lock(mu_);
  return spans_;
}

std::string chrome_trace_json(const Tracer& tracer) {
  const int pid = tracer.rank();
  nlohmann::json events = nlohmann::json::array();
  events.push_back(name_event("process_name", pid, 0, fmt::format("rank {}", pid)));
  events.push_back(name_event("thread_name", pid, 0, "training thread"));
  std::map<int, int> buckets;  // tid -> bucket
  for (const Span& s : tracer.spans()) {
    events.push_back(event_json(s, pid));
    if (s.kind == SpanKind::kAllReduce) buckets[span_tid(s)] = s.bucket;
  }
  for (auto [tid, bucket] : buckets) {
    events.push_back(
        name_event("thread_name", pid, tid, fmt::format("allreduce bucket {}", bucket)));
  }
  return nlohmann::json{{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}}.dump();
}

void write_chrome_trace(const Tracer& tracer, const std::string& path) {
  const std::string json = chrome_trace_json(tracer);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  DTRAIN_CHECK(out.good(), IoError, "--trace: cannot write the trace file '{}'", path);
  out << json << '\n';
  out.close();
  DTRAIN_CHECK(!out.fail(), IoError, "--trace: writing the trace file '{}' failed", path);
}

void check_trace_writable(const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  DTRAIN_CHECK(out.good(), IoError,
               "--trace: cannot create the trace file '{}' (does its folder exist and is it "
               "writable?)",
               path);
}

std::string trace_path_for_rank(const std::string& flag, int rank) {
  namespace fs = std::filesystem;
  DTRAIN_CHECK(!flag.empty(), InvalidArgument, "--trace: expected a file or folder, got ''");
  std::error_code ec;
  if (flag.back() == '/' || fs::is_directory(flag, ec)) {
    return (fs::path(flag) / fmt::format("trace.rank{}.json", rank)).string();
  }
  const std::string ext = ".json";
  if (flag.size() > ext.size() && flag.compare(flag.size() - ext.size(), ext.size(), ext) == 0) {
    return fmt::format("{}.rank{}.json", flag.substr(0, flag.size() - ext.size()), rank);
  }
  return fmt::format("{}.rank{}.json", flag, rank);
}

CommOverlap communication_overlap(const std::vector<Span>& spans) {
  CommOverlap o;
  const std::vector<Interval> allreduce = merged(spans, SpanKind::kAllReduce);
  o.allreduce_s = total(allreduce);
  o.hidden_s = intersection(allreduce, merged(spans, SpanKind::kBackward));
  for (const Span& s : spans) {
    if (s.kind == SpanKind::kWait)
      o.wait_s += std::chrono::duration<double>(s.end - s.start).count();
  }
  return o;
}

std::vector<std::pair<int64_t, CommOverlap>> communication_overlap_by_step(
    const std::vector<Span>& spans) {
  std::map<int64_t, std::vector<Span>> by_step;
  for (const Span& s : spans) by_step[s.step].push_back(s);
  std::vector<std::pair<int64_t, CommOverlap>> out;
  for (const auto& [step, group] : by_step) out.emplace_back(step, communication_overlap(group));
  return out;
}

std::string overlap_line(const CommOverlap& o) {
  if (o.allreduce_s <= 0) return "communication: no bucketed all-reduce traced on this rank";
  return fmt::format(
      "communication: {:.1f} ms in all-reduce, {:.1f} ms hidden behind backward ({:.0f}%), "
      "{:.1f} ms exposed; {:.1f} ms waiting after backward",
      o.allreduce_s * 1e3, o.hidden_s * 1e3, o.hidden_fraction() * 100, o.exposed_s() * 1e3,
      o.wait_s * 1e3);
}

}  // namespace dtrain::parallel
