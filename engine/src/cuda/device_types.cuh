// Shared by the .cu files: element loads/stores through the compute type, dtype
// dispatch, strided index arithmetic and launch checks. Kernels compute half types
// (f16, bf16) in float and f64 in double; everything else in float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/kernels.h"

namespace dtrain::cuda {

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename Compute<T>::type;

template <typename T>
__device__ __forceinline__ compute_t<T> load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(p[i]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(p[i]);
  } else {
    return static_cast<compute_t<T>>(p[i]);
  }
}

template <typename T, typename V>
__device__ __forceinline__ T to_elem(V v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// Calls f(T*{}) with T the device type of a floating dtype.
template <typename F>
void dispatch_floating(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32:
      return f(static_cast<float*>(nullptr));
    case DType::f64:
      return f(static_cast<double*>(nullptr));
    case DType::f16:
      return f(static_cast<__half*>(nullptr));
    case DType::bf16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    default:
      throw_unsupported_dtype(op, dt);
  }
}

// Calls f(T*{}) for any dtype.
template <typename F>
void dispatch_any(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::i32:
      return f(static_cast<int32_t*>(nullptr));
    case DType::i64:
      return f(static_cast<int64_t*>(nullptr));
    case DType::u8:
      return f(static_cast<uint8_t*>(nullptr));
    default:
      return dispatch_floating(dt, op, static_cast<F&&>(f));
  }
}

#define DTRAIN_ELEM_T(tag) std::remove_pointer_t<decltype(tag)>

// Element offset of the i-th row-major position of g.
__device__ __forceinline__ int64_t strided_offset(const Strided& g, int64_t i) {
  int64_t off = 0;
  for (int d = g.nd - 1; d >= 0; --d) {
    int64_t s = g.shape[d];
    off += (i % s) * g.strides[d];
    i /= s;
  }
  return off;
}

constexpr int kBlock = 256;
inline unsigned grid_for(int64_t n) {
  int64_t b = (n + kBlock - 1) / kBlock;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}
inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

#define DTRAIN_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

}  // namespace dtrain::cuda
