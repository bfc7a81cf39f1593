// convert_sync_batchnorm (sync_batchnorm.h).
#include "dtrain/parallel/sync_batchnorm.h"

#include <memory>

#include "dtrain/engine/nn/batchnorm.h"

namespace dtrain::parallel {

namespace {

int convert(nn::Module& m, comm::Communicator& comm) {
  int n = 0;
  if (auto* bn = dynamic_cast<nn::BatchNorm2d*>(&m)) {
    comm::Communicator* c = &comm;
    bn->set_stats_reduce([c](double* data, size_t count) {
      c->allreduce(data, count, DType::f64, comm::ReduceOp::kSum);
    });
    ++n;
  }
  for (const std::shared_ptr<nn::Module>& child : m.children()) n += convert(*child, comm);
  return n;
}

}  // namespace

int convert_sync_batchnorm(nn::Module& model, comm::Communicator& comm) {
  if (comm.size() <= 1) return 0;
  return convert(model, comm);
}

}  // namespace dtrain::parallel
