// The stall and desync inspector (inspector.h): numbering, the fingerprint check, the
// progress records the ranks publish, and the watchdog that reports a stall.
#include "dtrain/comm/inspector.h"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

namespace dtrain::comm {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

enum class OpKind : uint32_t {
  kAllreduce = 1,
  kBroadcast,
  kAllgather,
  kReduceScatter,
  kBarrier,
  kSplit
};

const char* kind_name(OpKind k) {
  switch (k) {
    case OpKind::kAllreduce:
      return "allreduce";
    case OpKind::kBroadcast:
      return "broadcast";
    case OpKind::kAllgather:
      return "allgather";
    case OpKind::kReduceScatter:
      return "reduce_scatter";
    case OpKind::kBarrier:
      return "barrier";
    case OpKind::kSplit:
      return "split";
  }
  return "collective";
}

// What one rank says it is calling; the desync check compares these across ranks.
struct Call {
  OpKind kind = OpKind::kBarrier;
  ReduceOp op = ReduceOp::kSum;
  uint64_t count = 0;
  DType dtype = DType::u8;
  int root = -1;
  std::string name;
};

bool has_reduce_op(OpKind k) { return k == OpKind::kAllreduce || k == OpKind::kReduceScatter; }

// "allreduce(avg) of 1024 f32", "broadcast of 10 i64 from rank 0", "barrier".
std::string describe(const Call& c) {
  if (c.kind == OpKind::kBarrier || c.kind == OpKind::kSplit) return kind_name(c.kind);
  std::string s = kind_name(c.kind);
  if (has_reduce_op(c.kind)) s += fmt::format("({})", reduce_op_name(c.op));
  s += fmt::format(" of {} {}", c.count, dtype_name(c.dtype));
  if (c.kind == OpKind::kAllgather || c.kind == OpKind::kReduceScatter) s += " per rank";
  if (c.kind == OpKind::kBroadcast) s += fmt::format(" from rank {}", c.root);
  return s;
}

// "#17 'bucket 3'" or "#17" for an unnamed one.
std::string label(uint64_t seq, const std::string& name) {
  return name.empty() ? fmt::format("#{}", seq) : fmt::format("#{} '{}'", seq, name);
}

int64_t unix_ms() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

double seconds_between(int64_t earlier_ms, int64_t later_ms) {
  return static_cast<double>(later_ms - earlier_ms) / 1000.0;
}

// ---- the fingerprint the desync check all-gathers -------------------------------------

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

struct Fingerprint {
  uint64_t seq;
  uint64_t count;
  uint32_t kind;
  uint32_t op;
  uint32_t dtype;
  int32_t root;
  uint64_t name_hash;  // of the whole name; `name` holds its start, for the message
  char name[40];
};
static_assert(sizeof(Fingerprint) == 80, "the fingerprint is exchanged as 80 raw bytes");

Fingerprint fingerprint_of(uint64_t seq, const Call& c) {
  Fingerprint f{};
  f.seq = seq;
  f.count = c.count;
  f.kind = static_cast<uint32_t>(c.kind);
  f.op = has_reduce_op(c.kind) ? static_cast<uint32_t>(c.op) : 0;
  f.dtype = static_cast<uint32_t>(c.dtype);
  f.root = c.root;
  f.name_hash = fnv1a(c.name);
  std::memcpy(f.name, c.name.data(), std::min(c.name.size(), sizeof(f.name) - 1));
  return f;
}

bool same(const Fingerprint& a, const Fingerprint& b) {
  return a.seq == b.seq && a.count == b.count && a.kind == b.kind && a.op == b.op &&
         a.dtype == b.dtype && a.root == b.root && a.name_hash == b.name_hash;
}

// "allreduce(avg) of 1024 f32 'bucket 3'", from a peer's fingerprint.
std::string describe(const Fingerprint& f) {
  Call c;
  c.kind = static_cast<OpKind>(f.kind);
  c.op = static_cast<ReduceOp>(f.op);
  c.count = f.count;
  c.dtype = static_cast<DType>(f.dtype);
  c.root = f.root;
  std::string name(f.name, strnlen(f.name, sizeof(f.name)));
  std::string s = describe(c);
  if (!name.empty())
    s += fmt::format(" '{}{}'", name, name.size() == sizeof(f.name) - 1 ? ".." : "");
  return s;
}

// The same message on every rank: the first rank that differs from rank 0, against rank 0.
std::optional<std::string> mismatch(const std::vector<Fingerprint>& all, uint64_t seq,
                                    const std::string& group) {
  for (size_t r = 1; r < all.size(); ++r) {
    if (same(all[r], all[0])) continue;
    return fmt::format("collective mismatch at #{} in group {}: rank 0 calls {}, rank {} calls {}",
                       seq, group, describe(all[0]), r, describe(all[r]));
  }
  return std::nullopt;
}

// ---- progress: what each rank publishes for the others' stall reports -----------------

struct Progress {
  uint64_t last_seq = 0;  // the last collective entered; 0: none yet
  int64_t entered_ms = 0;
  uint64_t pending_seq = 0;  // the oldest not completed; 0: none
  std::string last_what;     // describe() of the last one
  std::string last_name;
};

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

std::string encode(const Progress& p) {
  return fmt::format("{}\n{}\n{}\n{}\n{}", p.last_seq, p.entered_ms, p.pending_seq,
                     one_line(p.last_what), one_line(p.last_name));
}

std::optional<Progress> decode(const std::string& text) {
  std::istringstream in(text);
  Progress p;
  std::string line;
  if (!(in >> p.last_seq >> p.entered_ms >> p.pending_seq)) return std::nullopt;
  std::getline(in, line);  // the end of the numbers' line
  std::getline(in, p.last_what);
  std::getline(in, p.last_name);
  return p;
}

// ---- this rank's bookkeeping, shared by the communicator, its Works and the watchdog ----

struct Pending {
  uint64_t seq = 0;
  Call call;
  Clock::time_point entered;
  std::shared_ptr<Work> work;  // null until issued to the inner communicator
};

// Thread-safety: safe from any thread (one mutex).
class Tracker {
 public:
  uint64_t enter(Call call) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t seq = next_seq_++;
    while (!pending_.empty() && pending_.front().work && pending_.front().work->is_completed()) {
      pending_.pop_front();  // finished, never waited for: forget it
    }
    progress_.last_seq = seq;
    progress_.entered_ms = unix_ms();
    progress_.last_what = describe(call);
    progress_.last_name = call.name;
    pending_.push_back({seq, std::move(call), Clock::now(), nullptr});
    return seq;
  }
  uint64_t next_seq() const {
    std::lock_guard<std::mutex> lock(mu_);
    return next_seq_;
  }
  void issued(uint64_t seq, std::shared_ptr<Work> work) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Pending& p : pending_) {
      if (p.seq == seq) p.work = std::move(work);
    }
  }
  void completed(uint64_t seq) {
    std::lock_guard<std::mutex> lock(mu_);
    std::erase_if(pending_, [seq](const Pending& p) { return p.seq == seq; });
  }
  // Forgets finished ones; the oldest still pending after `timeout`, if any.
  std::optional<Pending> stalled(Clock::duration timeout) {
    std::lock_guard<std::mutex> lock(mu_);
    std::erase_if(pending_, [](const Pending& p) { return p.work && p.work->is_completed(); });
    if (pending_.empty() || Clock::now() - pending_.front().entered < timeout) return std::nullopt;
    return pending_.front();
  }
  Progress progress() const {
    std::lock_guard<std::mutex> lock(mu_);
    Progress p = progress_;
    p.pending_seq = pending_.empty() ? 0 : pending_.front().seq;
    return p;
  }

 private:
  mutable std::mutex mu_;
  uint64_t next_seq_ = 1;
  std::deque<Pending> pending_;  // in issue order
  Progress progress_;            // pending_seq filled in by progress()
};

// Marks its collective completed in the Tracker once waited for.
class InspectedWork final : public Work {
 public:
  InspectedWork(std::shared_ptr<Work> inner, std::shared_ptr<Tracker> tracker, uint64_t seq)
      : inner_(std::move(inner)), tracker_(std::move(tracker)), seq_(seq) {}
  void wait() override {
    try {
      inner_->wait();
    } catch (...) {
      tracker_->completed(seq_);
      throw;
    }
    tracker_->completed(seq_);
  }
  bool is_completed() const override { return inner_->is_completed(); }
  std::optional<std::chrono::steady_clock::time_point> completed_at() const override {
    return inner_->completed_at();
  }

 private:
  std::shared_ptr<Work> inner_;
  std::shared_ptr<Tracker> tracker_;
  uint64_t seq_;
};

// ---- the stall report --------------------------------------------------------------

std::string progress_key(const std::string& group, int rank) {
  return fmt::format("inspect/{}/progress/{}", group, rank);
}

// One line on rank r, against this rank's stalled collective #seq. lagging: r has not entered it.
std::string peer_line(int r, const std::optional<Progress>& p, uint64_t seq, const Call& mine,
                      int64_t now, bool& lagging) {
  lagging = false;
  if (!p) {
    lagging = true;
    return fmt::format(
        "stall: rank {} has published no progress (not started, or its store is "
        "unreachable)",
        r);
  }
  const double ago = seconds_between(p->entered_ms, now);
  if (p->last_seq == 0) {
    lagging = true;
    return fmt::format("stall: rank {} has not entered #{}: it has entered no collective yet", r,
                       seq);
  }
  if (p->last_seq < seq) {
    lagging = true;
    return fmt::format(
        "stall: rank {} has not entered #{}: its last collective is {} ({}), "
        "entered {:.1f} s ago",
        r, seq, label(p->last_seq, p->last_name), p->last_what, ago);
  }
  if (p->last_seq == seq && (p->last_name != mine.name || p->last_what != describe(mine))) {
    return fmt::format(
        "stall: rank {} entered #{} as {} '{}', {:.1f} s ago: the ranks call "
        "different collectives",
        r, seq, p->last_what, p->last_name, ago);
  }
  if (p->last_seq == seq) {
    return fmt::format("stall: rank {} entered {} too, {:.1f} s ago", r, label(seq, mine.name),
                       ago);
  }
  return fmt::format(
      "stall: rank {} is past #{}: its last collective is {} ({}), entered {:.1f} s "
      "ago",
      r, seq, label(p->last_seq, p->last_name), p->last_what, ago);
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (int r : ranks) s += (s.empty() ? "" : ", ") + std::to_string(r);
  return s;
}

struct StallReport {
  std::vector<std::string> lines;
  std::string summary;  // the abort reason
};

StallReport stall_report(const Pending& p, int rank, int size, Store* store,
                         const std::string& group) {
  StallReport rep;
  const double waited = std::chrono::duration<double>(Clock::now() - p.entered).count();
  const std::string what = fmt::format("{} {}", kind_name(p.call.kind), label(p.seq, p.call.name));
  rep.lines.push_back(fmt::format("stall: rank {} waits in {} for {:.1f} s ({}, group {})", rank,
                                  what, waited, describe(p.call), group));
  std::vector<int> lagging;
  const int64_t now = unix_ms();
  for (int r = 0; r < size && store; ++r) {
    if (r == rank) continue;
    std::optional<Progress> peer;
    try {
      peer = decode(store->get(progress_key(group, r), milliseconds(200)));
    } catch (const Error&) {
      // Unpublished or unreachable: reported as such.
    }
    bool behind = false;
    rep.lines.push_back(peer_line(r, peer, p.seq, p.call, now, behind));
    if (behind) lagging.push_back(r);
  }
  if (!store) rep.lines.push_back("stall: the other ranks' progress is unknown (no store)");
  std::string who = lagging.empty() ? "every other rank has entered it or gone past it"
                    : lagging.size() == 1
                        ? fmt::format("rank {} has not entered it", lagging[0])
                        : fmt::format("ranks {} have not entered it", rank_list(lagging));
  if (!store) who = "the other ranks' progress is unknown";
  rep.summary = fmt::format("stall: rank {} waited {:.1f} s in {} (group {}); {}", rank, waited,
                            what, group, who);
  return rep;
}

// ---- the decorator -------------------------------------------------------------------

class Inspected final : public Communicator {
 public:
  Inspected(std::unique_ptr<Communicator> inner, Store* store, InspectorOptions o,
            std::unique_ptr<Communicator> checker)
      : inner_(std::move(inner)),
        checker_(std::move(checker)),
        store_(store),
        options_(std::move(o)),
        tracker_(std::make_shared<Tracker>()) {
    if (options_.stall_timeout.count() > 0) watchdog_ = std::thread([this] { watch(); });
  }
  ~Inspected() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
  }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  void name_next(std::string_view name) override { next_name_ = std::string(name); }

  std::shared_ptr<Work> allreduce_async(void* data, size_t count, DType dtype,
                                        ReduceOp op) override {
    const uint64_t seq = begin({OpKind::kAllreduce, op, count, dtype, -1, {}});
    return issued(seq, [&] { return inner_->allreduce_async(data, count, dtype, op); });
  }
  std::shared_ptr<Work> broadcast_async(void* data, size_t count, DType dtype, int root) override {
    const uint64_t seq = begin({OpKind::kBroadcast, ReduceOp::kSum, count, dtype, root, {}});
    return issued(seq, [&] { return inner_->broadcast_async(data, count, dtype, root); });
  }
  std::shared_ptr<Work> allgather_async(const void* send, void* recv, size_t count,
                                        DType dtype) override {
    const uint64_t seq = begin({OpKind::kAllgather, ReduceOp::kSum, count, dtype, -1, {}});
    return issued(seq, [&] { return inner_->allgather_async(send, recv, count, dtype); });
  }
  std::shared_ptr<Work> reduce_scatter_async(const void* send, void* recv, size_t count,
                                             DType dtype, ReduceOp op) override {
    const uint64_t seq = begin({OpKind::kReduceScatter, op, count, dtype, -1, {}});
    return issued(seq, [&] { return inner_->reduce_scatter_async(send, recv, count, dtype, op); });
  }
  void barrier() override {
    const uint64_t seq = begin({OpKind::kBarrier, ReduceOp::kSum, 0, DType::u8, -1, {}});
    blocking(seq, [&] { inner_->barrier(); });
  }
  void send(const void* data, size_t count, DType dtype, int peer) override {
    inner_->send(data, count, dtype, peer);
  }
  void recv(void* data, size_t count, DType dtype, int peer) override {
    inner_->recv(data, count, dtype, peer);
  }
  void abort(const std::string& reason) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      aborted_ = true;
    }
    cv_.notify_all();
    inner_->abort(reason);
    if (checker_) checker_->abort(reason);
  }
  void set_timeout(milliseconds timeout) override {
    inner_->set_timeout(timeout);
    if (checker_) checker_->set_timeout(timeout);
  }
  milliseconds timeout() const override { return inner_->timeout(); }
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  uint64_t begin(Call call);
  void hold(uint64_t seq, const Call& call);
  void check(uint64_t seq, const Call& call);
  template <typename Issue>
  std::shared_ptr<Work> issued(uint64_t seq, Issue issue);
  template <typename Run>
  void blocking(uint64_t seq, Run run);
  void watch();
  void log(const std::string& line) const {
    if (options_.log) return options_.log(line);
    std::fprintf(stderr, "%s\n", line.c_str());
  }

  std::unique_ptr<Communicator> inner_;
  std::unique_ptr<Communicator> checker_;  // carries the fingerprints; null: no check
  Store* store_;
  InspectorOptions options_;
  std::shared_ptr<Tracker> tracker_;
  std::string next_name_;  // issuing thread only
  std::string failure_;    // issuing thread only: the mismatch that ended this communicator
  uint64_t splits_ = 0;    // issuing thread only
  std::mutex mu_;
  std::condition_variable cv_;
  bool aborted_ = false;   // GUARDED_BY(mu_)
  bool stopping_ = false;  // GUARDED_BY(mu_)
  std::thread watchdog_;
};

// Names the call, holds it (fault injection: before entering, as a rank busy elsewhere),
// numbers and records it, and checks it against the other ranks'. Returns its number.
uint64_t Inspected::begin(Call call) {
  DTRAIN_CHECK(failure_.empty(), CommError, "{}", failure_);
  call.name = std::exchange(next_name_, {});
  if (tracker_->next_seq() == options_.test_hold_at) hold(options_.test_hold_at, call);
  const uint64_t seq = tracker_->enter(call);
  try {
    if (checker_) check(seq, call);
  } catch (...) {
    tracker_->completed(seq);
    throw;
  }
  return seq;
}

void Inspected::hold(uint64_t seq, const Call& call) {
  log(
      fmt::format("fault injection (DTRAIN_TEST_STALL_AT): rank {} holds before {} {} for up to "
                  "{} ms",
                  rank(), kind_name(call.kind), label(seq, call.name), timeout().count()));
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout(), [this] { return aborted_ || stopping_; });
}

void Inspected::check(uint64_t seq, const Call& call) {
  const Fingerprint mine = fingerprint_of(seq, call);
  std::vector<Fingerprint> all(static_cast<size_t>(size()));
  checker_->allgather(&mine, all.data(), sizeof(Fingerprint), DType::u8);
  std::optional<std::string> bad = mismatch(all, seq, options_.group);
  if (!bad) return;
  // Every rank saw the same fingerprints and fails alike; the checker stays up so that no
  // rank's exchange is cut short by another's abort.
  failure_ = *bad;
  inner_->abort(*bad);
  DTRAIN_THROW(InvalidArgument, "{}", *bad);
}

template <typename Issue>
std::shared_ptr<Work> Inspected::issued(uint64_t seq, Issue issue) {
  std::shared_ptr<Work> work;
  try {
    work = issue();
  } catch (...) {
    tracker_->completed(seq);
    throw;
  }
  tracker_->issued(seq, work);
  return std::make_shared<InspectedWork>(std::move(work), tracker_, seq);
}

template <typename Run>
void Inspected::blocking(uint64_t seq, Run run) {
  try {
    run();
  } catch (...) {
    tracker_->completed(seq);
    throw;
  }
  tracker_->completed(seq);
}

std::unique_ptr<Communicator> Inspected::split(int color, int key) {
  const uint64_t seq = begin({OpKind::kSplit, ReduceOp::kSum, 0, DType::u8, -1, {}});
  std::unique_ptr<Communicator> child, child_checker;
  blocking(seq, [&] {
    child = inner_->split(color, key);
    if (checker_) child_checker = checker_->split(color, key);
  });
  const uint64_t n = splits_++;  // the same on every rank: split is collective
  if (!child) return nullptr;
  InspectorOptions o = options_;
  o.group = fmt::format("{}/split{}/c{}", options_.group, n, color);
  o.test_hold_at = 0;
  return make_inspected_communicator(std::move(child), store_, std::move(o),
                                     std::move(child_checker));
}

// The watchdog thread: publishes progress, and reports the first stall, then aborts.
void Inspected::watch() {
  const auto interval =
      std::clamp(options_.stall_timeout / 4, milliseconds(10), milliseconds(5000));
  const std::string key = progress_key(options_.group, rank());
  std::string published;
  bool reported = false;
  for (;;) {
    std::string now = encode(tracker_->progress());
    if (store_ && now != published) {
      try {
        store_->set(key, now);
        published = std::move(now);
      } catch (const Error&) {
        // The store may be restarting; the next tick tries again.
      }
    }
    if (!reported) {
      if (std::optional<Pending> p = tracker_->stalled(options_.stall_timeout)) {
        StallReport rep = stall_report(*p, rank(), size(), store_, options_.group);
        for (const std::string& line : rep.lines) log(line);
        abort(rep.summary);
        reported = true;
      }
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (cv_.wait_for(lock, interval, [this] { return stopping_; })) return;
  }
}

}  // namespace

std::unique_ptr<Communicator> make_inspected_communicator(std::unique_ptr<Communicator> inner,
                                                          Store* store, InspectorOptions options,
                                                          std::unique_ptr<Communicator> checker) {
  DTRAIN_CHECK(inner != nullptr, InvalidArgument, "make_inspected_communicator: no communicator");
  DTRAIN_CHECK(options.stall_timeout.count() >= 0, InvalidArgument,
               "inspector: stall timeout must be >= 0 ms, got {}", options.stall_timeout.count());
  if (!options.check_collectives) checker.reset();
  if (options.check_collectives && !checker) {
    DTRAIN_CHECK(inner->backend() != "nccl", UnsupportedError,
                 "--check-collectives over nccl needs a host communicator for the fingerprints "
                 "(a tcp communicator of the same ranks); none was given");
    checker = inner->split(0, inner->rank());
  }
  return std::make_unique<Inspected>(std::move(inner), store, std::move(options),
                                     std::move(checker));
}

}  // namespace dtrain::comm
