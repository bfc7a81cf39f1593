#include "dtrain/comm/store.h"

#include "dtrain/common/error.h"

namespace dtrain::comm {

void MemoryStore::set(const std::string& key, const std::string& value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    kv_[key] = value;
  }
  cv_.notify_all();
}

std::string MemoryStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  bool found = cv_.wait_for(lock, timeout, [&] { return kv_.count(key) > 0; });
  DTRAIN_CHECK(found, TimeoutError, "store: key '{}' did not appear within {} ms", key,
               timeout.count());
  return kv_[key];
}

}  // namespace dtrain::comm
