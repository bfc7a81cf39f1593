// Store: the small key-value store ranks use to find each other (bootstrap).
//
// The tcp backend publishes each rank's listening address under a key and reads
// its peers'; the nccl backend will publish its ncclUniqueId the same way. In a job
// the store is the coordinator's gRPC key-value service; tests may use the
// in-process MemoryStore.
//
// Thread-safety: implementations are safe to call from several threads.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace dtrain::comm {

class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::string& value) = 0;
  // Blocks until key exists; throws TimeoutError naming the key after `timeout`.
  virtual std::string get(const std::string& key, std::chrono::milliseconds timeout) = 0;
};

// A Store in one process (threads as ranks, in tests).
class MemoryStore final : public Store {
 public:
  void set(const std::string& key, const std::string& value) override;
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> kv_;  // GUARDED_BY(mu_)
};

// A Store in a folder shared by the ranks (one host, or a shared file system): each
// key is a file, written to a temporary name and renamed into place, so readers see
// whole values; get() polls until the file appears. For mpirun-less tests and
// launches without a coordinator. Thread-safety: safe from any thread or process.
class FileStore final : public Store {
 public:
  // Creates `dir` if needed.
  explicit FileStore(std::string dir);
  void set(const std::string& key, const std::string& value) override;
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override;

 private:
  std::string path_of(const std::string& key) const;
  std::string dir_;
};

// Prefixes every key, so several communicators (or generations) share one store.
class PrefixStore final : public Store {
 public:
  PrefixStore(std::string prefix, Store& base) : prefix_(std::move(prefix)), base_(base) {}
  void set(const std::string& key, const std::string& value) override {
    base_.set(prefix_ + key, value);
  }
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override {
    return base_.get(prefix_ + key, timeout);
  }

 private:
  std::string prefix_;
  Store& base_;
};

}  // namespace dtrain::comm
