// sum and mean over all elements or over chosen dimensions. Accumulates in double.
#include <algorithm>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

std::vector<bool> reduced_mask(const Tensor& a, const std::vector<int64_t>& dims, const char* op) {
  std::vector<bool> mask(static_cast<size_t>(a.dim()), false);
  for (int64_t d : dims) {
    int64_t i = d < 0 ? d + a.dim() : d;
    DTRAIN_CHECK(i >= 0 && i < a.dim(), InvalidArgument, "{}: dimension {} out of range for {}", op,
                 d, shape_str(a.shape()));
    mask[static_cast<size_t>(i)] = true;
  }
  return mask;
}

template <typename T>
void reduce_sum_kernel(const Tensor& x, const std::vector<bool>& mask, Tensor& out) {
  const T* p = x.data<T>();
  T* o = out.data<T>();
  const Shape& shape = x.shape();
  size_t nd = shape.size();
  int64_t n = x.numel();
  int64_t m = out.numel();
  // Special case: [R, C] reducing rows (bias gradients).
  if (nd == 2 && mask[0] && !mask[1]) {
    int64_t r = shape[0], c = shape[1];
    std::vector<double> acc(static_cast<size_t>(c), 0.0);
    for (int64_t i = 0; i < r; ++i) {
      const T* row = p + i * c;
      for (int64_t j = 0; j < c; ++j) acc[j] += row[j];
    }
    for (int64_t j = 0; j < c; ++j) o[j] = static_cast<T>(acc[j]);
    return;
  }
  // Output strides over the input's dims (0 where reduced).
  Shape ost(nd, 0);
  int64_t acc_stride = 1;
  for (size_t i = nd; i-- > 0;) {
    if (!mask[i]) {
      ost[i] = acc_stride;
      acc_stride *= shape[i];
    }
  }
  std::vector<double> acc(static_cast<size_t>(m), 0.0);
  std::vector<int64_t> idx(nd, 0);
  int64_t off = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc[static_cast<size_t>(off)] += p[i];
    for (size_t d = nd; d-- > 0;) {
      if (++idx[d] < shape[d]) {
        off += ost[d];
        break;
      }
      off -= ost[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
  for (int64_t j = 0; j < m; ++j) o[j] = static_cast<T>(acc[static_cast<size_t>(j)]);
}

// Broadcasts g (with kept dims) back to `shape`.
Tensor expand_to(const Tensor& g, const Shape& shape) {
  Tensor out = zeros(shape, g.options());
  return add(out, g);
}

}  // namespace

Tensor sum(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim) {
  DTRAIN_CHECK(a.defined(), InvalidArgument, "sum: undefined input");
  std::vector<bool> mask = reduced_mask(a, dims, "sum");
  Shape kept, squeezed;
  for (size_t i = 0; i < mask.size(); ++i) {
    kept.push_back(mask[i] ? 1 : a.shape()[i]);
    if (!mask[i]) squeezed.push_back(a.shape()[i]);
  }
  Tensor out;
#ifdef DTRAIN_WITH_CUDA
  if (a.device().is_cuda()) out = cuda::sum(a, mask, kept);  // strided input is fine
#endif
  if (!out.defined()) {
    Tensor x = a.contiguous();
    out = empty(kept, a.options());
    DTRAIN_DISPATCH_FLOAT(a.dtype(), "sum", [&] { reduce_sum_kernel<scalar_t>(x, mask, out); });
  }
  if (!keepdim) out = out.reshape(squeezed);
  if (!any_requires_grad({a})) return out;
  Shape in_shape = a.shape();
  return make_function("sum", {a}, {out}, [in_shape, kept](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{expand_to(g[0].reshape(kept), in_shape)};
  })[0];
}

Tensor sum(const Tensor& a) {
  std::vector<int64_t> all(static_cast<size_t>(a.dim()));
  for (int64_t i = 0; i < a.dim(); ++i) all[static_cast<size_t>(i)] = i;
  return sum(a, all, false);
}

Tensor mean(const Tensor& a, const std::vector<int64_t>& dims, bool keepdim) {
  std::vector<bool> mask = reduced_mask(a, dims, "mean");
  int64_t count = 1;
  for (size_t i = 0; i < mask.size(); ++i) {
    if (mask[i]) count *= a.shape()[i];
  }
  DTRAIN_CHECK(count > 0, ShapeError, "mean: no elements to average in {}", shape_str(a.shape()));
  return mul_scalar(sum(a, dims, keepdim), 1.0 / static_cast<double>(count));
}

Tensor mean(const Tensor& a) {
  std::vector<int64_t> all(static_cast<size_t>(a.dim()));
  for (int64_t i = 0; i < a.dim(); ++i) all[static_cast<size_t>(i)] = i;
  return mean(a, all, false);
}

}  // namespace dtrain
