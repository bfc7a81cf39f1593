// GrpcStore: the comm::Store a job's communicators bootstrap through, backed by
// the coordinator's key-value calls (Set, and Get with wait).
//
// It does not own the client: the client must outlive the store. Keys are shared by
// the whole job; wrap it in a comm::PrefixStore to give a communicator or a
// generation its own key space.
//
// Thread-safety: safe to call from several threads (the client is).
#pragma once

#include <chrono>
#include <string>

#include "dtrain/comm/store.h"
#include "dtrain/coordinator/client.h"

namespace dtrain::coordinator {

class GrpcStore final : public comm::Store {
 public:
  explicit GrpcStore(CoordinatorClient& client) : client_(client) {}
  void set(const std::string& key, const std::string& value) override;
  // Throws TimeoutError naming the key (and the coordinator) after `timeout`.
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override;

 private:
  CoordinatorClient& client_;
};

}  // namespace dtrain::coordinator
