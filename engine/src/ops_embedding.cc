// embedding: a row gather out of a [V,D] table, and its scatter-add backward.
//
// Forward copies row indices[p] of the weight into row p of the output [..., D].
// Every index is validated before anything is written, and an index outside [0,V)
// throws InvalidArgument naming the index, its position and V (the usual cause is a
// tokenizer/vocabulary mismatch). Backward allocates a zero [V,D] gradient and adds
// each output-gradient row into the row it came from; repeated indices accumulate.
// The gradient is dense (no sparse-gradient mode): V*D is what the optimizer updates.
// Indices are not differentiable.
#include <cstring>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

void check_indices(const int64_t* idx, int64_t n, int64_t v) {
  for (int64_t p = 0; p < n; ++p) {
    DTRAIN_CHECK(idx[p] >= 0 && idx[p] < v, InvalidArgument,
                 "embedding: index {} at position {} is out of range for a table of {} rows "
                 "(expected [0,{}))",
                 idx[p], p, v, v);
  }
}

template <typename T>
void embedding_forward_kernel(const T* w, const int64_t* idx, int64_t n, int64_t d, T* out) {
  for (int64_t p = 0; p < n; ++p) {
    std::memcpy(out + p * d, w + idx[p] * d, static_cast<size_t>(d) * sizeof(T));
  }
}

template <typename T>
void embedding_backward_kernel(const T* g, const int64_t* idx, int64_t n, int64_t d, T* dw) {
  for (int64_t p = 0; p < n; ++p) {
    const T* __restrict src = g + p * d;
    T* __restrict dst = dw + idx[p] * d;
    for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
  }
}

}  // namespace

Tensor embedding(const Tensor& weight, const Tensor& indices) {
  DTRAIN_CHECK(weight.defined() && indices.defined(), InvalidArgument,
               "embedding: undefined input");
  DTRAIN_CHECK(weight.dim() == 2, ShapeError, "embedding: expected weight [V,D], got {}",
               shape_str(weight.shape()));
  DTRAIN_CHECK(indices.dtype() == DType::i64, DTypeError,
               "embedding: indices must be i64, got {} {}", dtype_name(indices.dtype()),
               shape_str(indices.shape()));
  const int64_t v = weight.shape()[0], d = weight.shape()[1];
  const int64_t n = indices.numel();
#ifdef DTRAIN_WITH_CUDA
  if (weight.device().is_cuda() || indices.device().is_cuda()) {
    Shape os = indices.shape();
    os.push_back(d);
    Tensor out = cuda::embedding(weight.detach(), indices, os);
    if (!any_requires_grad({weight})) return out;
    Shape w_shape = weight.shape();
    Tensor idx = indices.detach();
    return make_function(
        "embedding", {weight, indices}, {out}, [idx, w_shape](const std::vector<Tensor>& g) {
          if (!g[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
          return std::vector<Tensor>{cuda::embedding_backward(g[0], idx, w_shape), Tensor()};
        })[0];
  }
#endif
  Tensor ic = indices.contiguous();
  const int64_t* pi = ic.data<int64_t>();
  check_indices(pi, n, v);
  Shape out_shape = indices.shape();
  out_shape.push_back(d);
  Tensor wc = weight.detach().contiguous();
  Tensor out = empty(out_shape, weight.options());
  DTRAIN_DISPATCH_FLOAT(weight.dtype(), "embedding", [&] {
    embedding_forward_kernel<scalar_t>(wc.data<scalar_t>(), pi, n, d, out.data<scalar_t>());
  });
  if (!any_requires_grad({weight})) return out;
  Shape w_shape = weight.shape();
  return make_function("embedding", {weight, indices}, {out},
                       [ic, w_shape, n, d](const std::vector<Tensor>& g) {
                         if (!g[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
                         Tensor gc = g[0].contiguous();
                         Tensor dw = zeros(w_shape, gc.options());
                         DTRAIN_DISPATCH_FLOAT(gc.dtype(), "embedding backward", [&] {
                           embedding_backward_kernel<scalar_t>(
                               gc.data<scalar_t>(), ic.data<int64_t>(), n, d, dw.data<scalar_t>());
                         });
                         return std::vector<Tensor>{dw, Tensor()};
                       })[0];
}

}  // namespace dtrain
