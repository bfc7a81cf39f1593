// HeartbeatSender: the worker's heartbeat thread (see heartbeat.h). It sleeps on a
// condition variable so that stop() wakes it at once; a heartbeat already in
// flight finishes first (bounded by the client's call_timeout).
#include "dtrain/coordinator/heartbeat.h"

#include "dtrain/common/error.h"

namespace dtrain::coordinator {

HeartbeatSender::HeartbeatSender(CoordinatorClient& client, Options options)
    : client_(client), options_(std::move(options)) {
  DTRAIN_CHECK(options_.interval.count() > 0, InvalidArgument,
               "heartbeat: the interval must be positive, got {} ms", options_.interval.count());
  thread_ = std::thread([this] { loop(); });
}

HeartbeatSender::~HeartbeatSender() { stop(); }

HeartbeatSnapshot HeartbeatSender::last() const {
  std::lock_guard<std::mutex> lock(mu_);
  return snap_;
}

void HeartbeatSender::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void HeartbeatSender::loop() {
  for (;;) {
    HeartbeatResult answer;
    std::string error;
    try {
      answer = client_.heartbeat(options_.rank, options_.generation,
                                 options_.progress ? options_.progress() : std::nullopt);
    } catch (const Error& e) {
      error = e.message();
    }
    bool changed = false;
    HeartbeatSnapshot copy;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (error.empty()) {
        changed = snap_.sent == 0 || answer.generation != snap_.last.generation ||
                  answer.state != snap_.last.state || !snap_.last_error.empty();
        snap_.last = answer;
        ++snap_.sent;
        snap_.last_error.clear();
      } else {
        changed = snap_.last_error.empty();
        ++snap_.failed;
        snap_.last_error = error;
      }
      copy = snap_;
    }
    if (changed && options_.on_change) options_.on_change(copy);
    std::unique_lock<std::mutex> lock(mu_);
    if (cv_.wait_for(lock, options_.interval, [&] { return stopping_; })) return;
  }
}

}  // namespace dtrain::coordinator
