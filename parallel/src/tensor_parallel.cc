// Tensor parallelism (see tensor_parallel.h): f, g, the stacked gather, the
// vocab-parallel embedding and cross-entropy, column- and row-parallel linears.
#include "dtrain/parallel/tensor_parallel.h"

#include <fmt/format.h>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/ops.h"

namespace dtrain::parallel {

namespace {

// A contiguous copy of x summed over tp (no autograd).
Tensor allreduce_copy(const Tensor& x, comm::Communicator& tp) {
  Tensor out = x.detach().contiguous().clone();
  if (tp.size() > 1) {
    tp.allreduce(out.raw_data(), static_cast<size_t>(out.numel()), out.dtype(),
                 comm::ReduceOp::kSum);
  }
  return out;
}

// g, or zeros of the input's shape when no gradient reached the output.
Tensor grad_or_zeros(const Tensor& g, const Shape& shape, TensorOptions options) {
  return g.defined() ? g : zeros(shape, options);
}

// 1 at the positions where `mine`, else 0, in a floating dtype.
void set_flag(Tensor& t, int64_t i, bool on) {
  if (t.dtype() == DType::f64) t.data<double>()[i] = on ? 1.0 : 0.0;
  else t.data<float>()[i] = on ? 1.0f : 0.0f;
}

// This rank's slice [rank * n / parts, ...) of t along dim, as its own tensor.
Tensor slice_of(const Tensor& t, int64_t dim, int rank, int parts) {
  const int64_t n = t.size(dim) / parts;
  return t.detach().narrow(dim, rank * n, n).contiguous().clone();
}

}  // namespace

Tensor copy_to_tp_region(const Tensor& x, comm::Communicator& tp) {
  if (tp.size() == 1) return x;
  const Shape shape = x.shape();
  const TensorOptions options = x.options();
  return make_function("copy_to_tp_region", {x}, {x.detach()},
                       [&tp, shape, options](const std::vector<Tensor>& g) {
                         Tensor dy = grad_or_zeros(g[0], shape, options);
                         return std::vector<Tensor>{allreduce_copy(dy, tp)};
                       })[0];
}

Tensor reduce_from_tp_region(const Tensor& x, comm::Communicator& tp) {
  if (tp.size() == 1) return x;
  return make_function("reduce_from_tp_region", {x}, {allreduce_copy(x, tp)},
                       [](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0]}; })[0];
}

Tensor gather_stacked(const Tensor& x, comm::Communicator& tp) {
  Tensor src = x.detach().contiguous();
  Shape shape = src.shape();
  shape.insert(shape.begin(), tp.size());
  Tensor out = empty(shape, src.options());
  if (tp.size() == 1) {
    out.copy_(src);
  } else {
    tp.allgather(src.raw_data(), out.raw_data(), static_cast<size_t>(src.numel()), src.dtype());
  }
  const int rank = tp.rank();
  const TensorOptions options = src.options();
  const Shape in_shape = src.shape();
  return make_function("gather_stacked", {x}, {out},
                       [rank, in_shape, options](const std::vector<Tensor>& g) {
                         if (!g[0].defined()) return std::vector<Tensor>{zeros(in_shape, options)};
                         return std::vector<Tensor>{g[0].select(0, rank).contiguous()};
                       })[0];
}

Tensor vocab_parallel_embedding(const Tensor& weight_shard, const Tensor& indices,
                                comm::Communicator& tp) {
  DTRAIN_CHECK(weight_shard.dim() == 2 && indices.dtype() == DType::i64, ShapeError,
               "vocab_parallel_embedding: expected weight [V/tp, D] and i64 ids, got {} and {} {}",
               shape_str(weight_shard.shape()), dtype_name(indices.dtype()),
               shape_str(indices.shape()));
  const int64_t rows = weight_shard.size(0), start = tp.rank() * rows;
  const Tensor ids = indices.to(Device::cpu()).contiguous();
  Tensor local = empty(ids.shape(), TensorOptions().with_dtype(DType::i64));
  Shape mask_shape = ids.shape();
  mask_shape.push_back(1);
  Tensor mask = empty(mask_shape, TensorOptions().with_dtype(weight_shard.dtype()));
  const int64_t* in = ids.data<int64_t>();
  int64_t* out = local.data<int64_t>();
  const int64_t vocab = rows * tp.size();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    DTRAIN_CHECK(in[i] >= 0 && in[i] < vocab, InvalidArgument,
                 "vocab_parallel_embedding: token id {} at position {} is outside the vocab of {}",
                 in[i], i, vocab);
    const bool mine = in[i] >= start && in[i] < start + rows;
    out[i] = mine ? in[i] - start : 0;
    set_flag(mask, i, mine);
  }
  const Device dev = weight_shard.device();
  Tensor rows_here = embedding(weight_shard, local.to(dev)) * mask.to(dev);
  return reduce_from_tp_region(rows_here, tp);
}

Tensor vocab_parallel_cross_entropy(const Tensor& logits_shard, const Tensor& target,
                                    comm::Communicator& tp) {
  DTRAIN_CHECK(logits_shard.dim() == 2 && target.dim() == 1 &&
                   target.size(0) == logits_shard.size(0) && target.dtype() == DType::i64,
               ShapeError, "vocab_parallel_cross_entropy: expected logits [N, V/tp] and i64 "
               "targets [N], got {} and {} {}", shape_str(logits_shard.shape()),
               dtype_name(target.dtype()), shape_str(target.shape()));
  const int64_t n = logits_shard.size(0), cols = logits_shard.size(1);
  const int64_t start = tp.rank() * cols, vocab = cols * tp.size();
  // log-sum-exp of this rank's slice, combined over tp (one number per row).
  Tensor lse_local = logits_shard.select(1, 0) - log_softmax(logits_shard, 1).select(1, 0);
  Tensor stacked = gather_stacked(lse_local, tp);  // [tp, N]
  Tensor lse = stacked.select(0, 0) - log_softmax(stacked, 0).select(0, 0);
  // The target logit, held by exactly one rank.
  const Tensor t = target.to(Device::cpu()).contiguous();
  Tensor onehot = zeros({n, cols}, TensorOptions().with_dtype(logits_shard.dtype()));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t.data<int64_t>()[i];
    DTRAIN_CHECK(v >= 0 && v < vocab, InvalidArgument,
                 "vocab_parallel_cross_entropy: target {} at row {} is outside the vocab of {}", v,
                 i, vocab);
    if (v < start || v >= start + cols) continue;
    set_flag(onehot, i * cols + v - start, true);
  }
  Tensor picked = sum(logits_shard * onehot.to(logits_shard.device()), {1});
  return mean(lse - reduce_from_tp_region(picked, tp));
}

// ---- linears ----

ColumnParallelLinear::ColumnParallelLinear(int64_t in, int64_t out, comm::Communicator& tp,
                                           Generator& gen, bool with_bias)
    : Module("ColumnParallelLinear"), in_(in), out_(out), tp_(tp) {
  DTRAIN_CHECK(out % tp.size() == 0, InvalidArgument,
               "ColumnParallelLinear: tp={} does not divide {} output features", tp.size(), out);
  nn::Linear full(nn::LinearOptions(in, out).bias(with_bias), gen);
  weight = register_parameter("weight", slice_of(full.weight, 0, tp.rank(), tp.size()));
  if (with_bias) bias = register_parameter("bias", slice_of(full.bias, 0, tp.rank(), tp.size()));
}

Tensor ColumnParallelLinear::forward(const Tensor& x) {
  return linear(copy_to_tp_region(x, tp_), weight, bias);
}

std::string ColumnParallelLinear::extra_repr() const {
  return fmt::format("{} -> {} (this rank {} of tp={})", in_, out_, out_ / tp_.size(),
                     tp_.size());
}

RowParallelLinear::RowParallelLinear(int64_t in, int64_t out, comm::Communicator& tp,
                                     Generator& gen, bool with_bias)
    : Module("RowParallelLinear"), in_(in), out_(out), tp_(tp) {
  DTRAIN_CHECK(in % tp.size() == 0, InvalidArgument,
               "RowParallelLinear: tp={} does not divide {} input features", tp.size(), in);
  nn::Linear full(nn::LinearOptions(in, out).bias(with_bias), gen);
  weight = register_parameter("weight", slice_of(full.weight, 1, tp.rank(), tp.size()));
  if (with_bias) bias = register_parameter("bias", full.bias.detach().clone());
}

Tensor RowParallelLinear::forward(const Tensor& x) {
  Tensor y = reduce_from_tp_region(linear(x, weight, Tensor()), tp_);
  return bias.defined() ? y + bias : y;
}

std::string RowParallelLinear::extra_repr() const {
  return fmt::format("{} (this rank {} of tp={}) -> {}", in_, in_ / tp_.size(), tp_.size(), out_);
}

}  // namespace dtrain::parallel
