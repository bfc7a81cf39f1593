// GrpcStore: comm::Store over the coordinator's key-value calls (see grpc_store.h).
#include "dtrain/coordinator/grpc_store.h"

namespace dtrain::coordinator {

void GrpcStore::set(const std::string& key, const std::string& value) { client_.set(key, value); }

std::string GrpcStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  return client_.get(key, timeout);
}

}  // namespace dtrain::coordinator
