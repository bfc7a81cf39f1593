// HeartbeatSender: a worker's background thread that sends Heartbeat every
// `interval` until stopped, and keeps the coordinator's latest answer (generation,
// job state) so the training loop can poll it cheaply between steps.
//
// A failed heartbeat does not throw out of the thread: it is counted and its
// message kept in last(). on_change (optional) runs on the heartbeat thread when
// the job's state or generation differs from the previous answer, or a heartbeat
// fails after having succeeded; it must not call stop().
//
// Thread-safety: last() and stop() are safe from any thread; the client must
// outlive the sender.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "dtrain/coordinator/client.h"

namespace dtrain::coordinator {

struct HeartbeatSnapshot {
  HeartbeatResult last;    // the latest successful answer
  uint64_t sent = 0;       // heartbeats answered
  uint64_t failed = 0;     // heartbeats that failed
  std::string last_error;  // the latest failure's message ("" when the last one worked)
};

class HeartbeatSender {
 public:
  struct Options {
    int rank = 0;
    uint64_t generation = 0;
    std::chrono::milliseconds interval{1000};
    std::function<void(const HeartbeatSnapshot&)> on_change;
    // Read before every heartbeat, on the heartbeat thread (optional): the training
    // progress the heartbeat carries to the coordinator (`dtrain status`).
    std::function<std::optional<WorkerProgress>()> progress;
  };
  // Sends the first heartbeat at once, then every interval.
  HeartbeatSender(CoordinatorClient& client, Options options);
  ~HeartbeatSender();  // stop()
  HeartbeatSender(const HeartbeatSender&) = delete;
  HeartbeatSender& operator=(const HeartbeatSender&) = delete;

  HeartbeatSnapshot last() const;
  void stop();  // idempotent; returns after the thread has ended

 private:
  void loop();

  CoordinatorClient& client_;
  Options options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;   // GUARDED_BY(mu_)
  HeartbeatSnapshot snap_;  // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace dtrain::coordinator
