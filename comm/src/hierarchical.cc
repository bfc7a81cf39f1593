// HierarchicalCommunicator (see hierarchical.h): host layout from gathered keys, the two
// splits, the three-stage all-reduce, and the worker thread that keeps issue order.
#include "dtrain/comm/hierarchical.h"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace dtrain::comm {
namespace {

// One queued operation's completion: wait() rethrows what the operation threw.
class TaskWork final : public Work {
 public:
  void finish(std::exception_ptr error) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::move(error);
    done_ = true;
    cv_.notify_all();
  }
  void wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
    if (error_) std::rethrow_exception(error_);
  }
  bool is_completed() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;         // GUARDED_BY(mu_)
  std::exception_ptr error_;  // GUARDED_BY(mu_)
};

// Every rank's host key, gathered over `world`: lengths first, then the keys padded
// to the longest.
std::vector<std::string> gather_keys(Communicator& world, const std::string& key) {
  const auto n = static_cast<size_t>(world.size());
  int64_t len = static_cast<int64_t>(key.size());
  std::vector<int64_t> lens(n);
  world.allgather(&len, lens.data(), 1, DType::i64);
  int64_t longest = 1;
  for (int64_t l : lens) longest = std::max(longest, l);
  const auto width = static_cast<size_t>(longest);
  std::string mine = key;
  mine.resize(width, '\0');
  std::string all(width * n, '\0');
  world.allgather(mine.data(), all.data(), width, DType::u8);
  std::vector<std::string> keys(n);
  for (size_t r = 0; r < n; ++r) keys[r] = all.substr(r * width, static_cast<size_t>(lens[r]));
  return keys;
}

std::string read_first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

}  // namespace

class HierarchicalCommunicator::Queue {
 public:
  Queue() : thread_([this] { loop(); }) {}
  ~Queue() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();  // runs what is queued first (each fails at once on a failed comm)
  }
  std::shared_ptr<Work> submit(std::function<void()> fn) {
    auto work = std::make_shared<TaskWork>();
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.emplace_back(std::move(fn), work);
    }
    cv_.notify_one();
    return work;
  }

  // A blocking call: on the calling thread when nothing is queued or running (no
  // hand-off to the worker and back: two wake-ups, tens of microseconds when the
  // ranks outnumber the cores), else queued behind the rest and waited for. Work
  // submitted meanwhile starts after it, so the issue order holds either way.
  template <typename Fn>
  void run(Fn&& fn) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!tasks_.empty() || running_) {
        lock.unlock();
        submit(std::forward<Fn>(fn))->wait();
        return;
      }
      running_ = true;
    }
    struct Idle {
      Queue* q;
      ~Idle() {
        {
          std::lock_guard<std::mutex> lock(q->mu_);
          q->running_ = false;
        }
        q->cv_.notify_all();
      }
    } idle{this};
    fn();
  }

 private:
  void loop() {
    for (;;) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !running_ && (stop_ || !tasks_.empty()); });
      if (tasks_.empty()) return;
      auto [fn, work] = std::move(tasks_.front());
      tasks_.pop_front();
      running_ = true;
      lock.unlock();
      std::exception_ptr error;
      try {
        fn();
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      running_ = false;
      lock.unlock();
      work->finish(error);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<void()>, std::shared_ptr<TaskWork>>> tasks_;  // GUARDED_BY
  bool stop_ = false;                                                              // GUARDED_BY
  bool running_ = false;  // GUARDED_BY(mu_): a task runs, on the worker or inline
  std::thread thread_;    // last: starts once the members above exist
};

HostLayout host_layout(const std::vector<std::string>& keys, int rank) {
  DTRAIN_CHECK(rank >= 0 && static_cast<size_t>(rank) < keys.size(), InvalidArgument,
               "host_layout: rank {} outside a world of {}", rank, keys.size());
  std::map<std::string, int> host_of;  // key -> host index, by lowest world rank
  std::vector<int> ranks_on;           // per host index
  HostLayout l;
  for (size_t r = 0; r < keys.size(); ++r) {
    auto [it, fresh] = host_of.emplace(keys[r], static_cast<int>(ranks_on.size()));
    if (fresh) ranks_on.push_back(0);
    if (static_cast<int>(r) == rank) {
      l.host_index = it->second;
      l.local_rank = ranks_on[static_cast<size_t>(it->second)];
    }
    ++ranks_on[static_cast<size_t>(it->second)];
  }
  l.hosts = static_cast<int>(ranks_on.size());
  l.local_size = ranks_on[0];
  std::string counts;
  for (const auto& [key, h] : host_of) {
    counts += fmt::format("{}'{}': {}", counts.empty() ? "" : ", ", key,
                          ranks_on[static_cast<size_t>(h)]);
  }
  for (int c : ranks_on) {
    DTRAIN_CHECK(c == l.local_size, InvalidArgument,
                 "hierarchical all-reduce needs the same number of ranks on every host, got "
                 "{} (use the flat ring for uneven hosts)",
                 counts);
  }
  return l;
}

std::string host_key_from_env() {
  if (const char* id = std::getenv("DTRAIN_HOST_ID"); id != nullptr && *id != '\0') return id;
  std::array<char, 256> name{};
  ::gethostname(name.data(), name.size() - 1);
  std::array<char, 128> net{};
  ssize_t n = ::readlink("/proc/self/ns/net", net.data(), net.size() - 1);
  return fmt::format("{}/{}/{}", name.data(), read_first_line("/proc/sys/kernel/random/boot_id"),
                     n > 0 ? std::string(net.data(), static_cast<size_t>(n)) : "net:?");
}

std::unique_ptr<HierarchicalCommunicator> HierarchicalCommunicator::create(
    std::unique_ptr<Communicator> world, const std::string& host_key) {
  DTRAIN_CHECK(world != nullptr, InvalidArgument, "hierarchical: no world communicator");
  Communicator& w = *world;
  HostLayout layout = host_layout(gather_keys(w, host_key), w.rank());
  return std::unique_ptr<HierarchicalCommunicator>(
      new HierarchicalCommunicator(w, std::move(world), layout));
}

std::unique_ptr<HierarchicalCommunicator> HierarchicalCommunicator::create(
    Communicator& world, const std::string& host_key) {
  HostLayout layout = host_layout(gather_keys(world, host_key), world.rank());
  return std::unique_ptr<HierarchicalCommunicator>(
      new HierarchicalCommunicator(world, nullptr, layout));
}

HierarchicalCommunicator::HierarchicalCommunicator(Communicator& world,
                                                   std::unique_ptr<Communicator> owned,
                                                   const HostLayout& layout)
    : owned_world_(std::move(owned)), world_(&world), layout_(layout) {
  local_ = world_->split(layout_.host_index, world_->rank());
  cross_ = world_->split(layout_.local_rank, layout_.host_index);
  DTRAIN_CHECK(
      local_ && cross_ && local_->size() == layout_.local_size && cross_->size() == layout_.hosts,
      InternalError, "hierarchical: split gave local {} / cross {} ranks, expected {} / {}",
      local_ ? local_->size() : 0, cross_ ? cross_->size() : 0, layout_.local_size, layout_.hosts);
  queue_ = std::make_unique<Queue>();
}

HierarchicalCommunicator::~HierarchicalCommunicator() { queue_.reset(); }

void HierarchicalCommunicator::run_allreduce(void* data, size_t count, DType dtype, ReduceOp op) {
  if (count == 0) return;
  const size_t es = dtype_size(dtype);
  const auto local_size = static_cast<size_t>(local_->size());
  const size_t block = (count + local_size - 1) / local_size;
  auto* full = static_cast<std::byte*>(data);
  if (block * local_size != count) {  // pad to equal blocks; the tail is never copied back
    padded_.assign(block * local_size * es, std::byte{0});
    std::memcpy(padded_.data(), data, count * es);
    full = padded_.data();
  }
  shard_.resize(block * es);
  const ReduceOp level_op = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  local_->reduce_scatter(full, shard_.data(), block, dtype, level_op);
  cross_->allreduce(shard_.data(), block, dtype, level_op);
  local_->allgather(shard_.data(), full, block, dtype);
  if (full != data) std::memcpy(data, full, count * es);
  if (op == ReduceOp::kAvg) scale_in_place(data, count, dtype, 1.0 / size());
}

std::shared_ptr<Work> HierarchicalCommunicator::allreduce_async(void* data, size_t count,
                                                                DType dtype, ReduceOp op) {
  return queue_->submit([=, this] { run_allreduce(data, count, dtype, op); });
}

std::shared_ptr<Work> HierarchicalCommunicator::broadcast_async(void* data, size_t count,
                                                                DType dtype, int root) {
  return queue_->submit([=, this] { world_->broadcast(data, count, dtype, root); });
}

std::shared_ptr<Work> HierarchicalCommunicator::allgather_async(const void* send, void* recv,
                                                                size_t count, DType dtype) {
  return queue_->submit([=, this] { world_->allgather(send, recv, count, dtype); });
}

std::shared_ptr<Work> HierarchicalCommunicator::reduce_scatter_async(const void* send, void* recv,
                                                                     size_t count, DType dtype,
                                                                     ReduceOp op) {
  return queue_->submit([=, this] { world_->reduce_scatter(send, recv, count, dtype, op); });
}

void HierarchicalCommunicator::allreduce(void* data, size_t count, DType dtype, ReduceOp op) {
  queue_->run([=, this] { run_allreduce(data, count, dtype, op); });
}

void HierarchicalCommunicator::broadcast(void* data, size_t count, DType dtype, int root) {
  queue_->run([=, this] { world_->broadcast(data, count, dtype, root); });
}

void HierarchicalCommunicator::allgather(const void* send, void* recv, size_t count, DType dtype) {
  queue_->run([=, this] { world_->allgather(send, recv, count, dtype); });
}

void HierarchicalCommunicator::reduce_scatter(const void* send, void* recv, size_t count,
                                              DType dtype, ReduceOp op) {
  queue_->run([=, this] { world_->reduce_scatter(send, recv, count, dtype, op); });
}

void HierarchicalCommunicator::send(const void* data, size_t count, DType dtype, int peer) {
  queue_->run([=, this] { world_->send(data, count, dtype, peer); });
}

void HierarchicalCommunicator::recv(void* data, size_t count, DType dtype, int peer) {
  queue_->run([=, this] { world_->recv(data, count, dtype, peer); });
}

void HierarchicalCommunicator::barrier() {
  queue_->run([this] { world_->barrier(); });
}

void HierarchicalCommunicator::abort(const std::string& reason) {
  world_->abort(reason);
  local_->abort(reason);
  cross_->abort(reason);
}

void HierarchicalCommunicator::set_timeout(std::chrono::milliseconds timeout) {
  world_->set_timeout(timeout);
  local_->set_timeout(timeout);
  cross_->set_timeout(timeout);
}

std::unique_ptr<Communicator> HierarchicalCommunicator::split(int color, int key) {
  std::unique_ptr<Communicator> child;
  queue_->submit([&, this] { child = world_->split(color, key); })->wait();
  return child;
}

}  // namespace dtrain::comm
