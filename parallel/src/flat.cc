// Flat parameter buffers (see flat.h).
#include "flat.h"

#include <cmath>
#include <set>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"

namespace dtrain::parallel::flat {

Tensor flat_view(const Tensor& flat, const Shape& shape, int64_t offset) {
  return make_view(flat, shape, contiguous_strides(shape), flat.impl()->offset + offset);
}

void point_into(const Tensor& p, const Tensor& flat, const Shape& shape, int64_t offset) {
  TensorImpl* impl = p.impl();
  impl->storage = flat.impl()->storage;
  impl->offset = flat.impl()->offset + offset;
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
}

void check_params(const std::vector<Tensor>& params, const std::vector<double>& wd,
                  const char* who) {
  DTRAIN_CHECK(!params.empty(), InvalidArgument, "{}: got no parameters", who);
  DTRAIN_CHECK(wd.size() == params.size(), InvalidArgument,
               "{}: {} weight decay values for {} parameters", who, wd.size(), params.size());
  std::set<const TensorImpl*> seen;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    DTRAIN_CHECK(p.defined() && p.is_leaf() && p.is_contiguous(), InvalidArgument,
                 "{}: parameter {} must be a defined, contiguous leaf tensor", who, i);
    DTRAIN_CHECK(p.dtype() == DType::f32, DTypeError, "{}: parameter {} {} is {}, expected f32",
                 who, i, shape_str(p.shape()), dtype_name(p.dtype()));
    DTRAIN_CHECK(p.device().is_cpu(), UnsupportedError,
                 "{}: parameter {} is on {}; sharded AdamW runs on the CPU only for now", who, i,
                 p.device().str());
    DTRAIN_CHECK(seen.insert(p.impl()).second, InvalidArgument,
                 "{}: parameter {} appears more than once", who, i);
    DTRAIN_CHECK(std::isfinite(wd[i]) && wd[i] >= 0.0, InvalidArgument,
                 "{}: weight decay {} of parameter {} must be finite and >= 0", who, wd[i], i);
  }
}

Tensor pack_broadcast(comm::Communicator& comm, const FlatLayout& l,
                      const std::vector<Tensor>& params) {
  Tensor flat = zeros({l.total});
  NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    flat_view(flat, l.shapes[i], l.offsets[i]).copy_(params[i]);
  }
  comm.broadcast(flat.raw_data(), static_cast<size_t>(l.total), DType::f32, 0);
  return flat;
}

Tensor gather_flat(comm::Communicator& comm, const FlatLayout& l, const Tensor& shard) {
  Tensor full = empty({l.total});
  int64_t s = 0;
  for (size_t b = 0; b < l.bucket_numel.size(); s += l.chunk(b), ++b) {
    comm.allgather(shard.data<float>() + s, full.data<float>() + l.bucket_begin[b],
                   static_cast<size_t>(l.chunk(b)), DType::f32);
  }
  return full;
}

}  // namespace dtrain::parallel::flat
