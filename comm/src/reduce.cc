// Reduction arithmetic shared by every backend: dst = dst op src for each DType, and
// the final scaling of kAvg.
//
// Every loop is a plain element-wise loop over __restrict pointers so the compiler
// vectorises it (-O3 -march=native). f16 and bf16 are combined in float and rounded
// back to nearest-even once per combine, exactly as dtrain::Half / dtrain::BFloat16
// convert; f16 uses the F16C instructions when the target has them. Integer sums wrap
// around (two's complement) instead of being undefined; integer averages round to
// nearest (computed in double, exact below 2^53). max/min use plain comparisons:
// NaN handling is not specified.
//
// Deliberately not here: transport, chunking and threading (ring.cc, tcp/).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "dtrain/comm/communicator.h"

namespace dtrain::comm {
namespace {

// ---- 16-bit float <-> float, inline so the loops vectorise ----

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Same rounding as dtrain::BFloat16(float): nearest-even, NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float half_to_float(uint16_t h) {
  Half x;
  x.bits = h;
  return static_cast<float>(x);
}

inline uint16_t float_to_half(float f) { return Half(f).bits; }

template <typename T>
inline T combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return a + b;
    case ReduceOp::kMax:
      return b > a ? b : a;
    case ReduceOp::kMin:
      return b < a ? b : a;
  }
  return a;
}

// Native types. The op is a template parameter so each loop body is branch-free.
template <typename T, ReduceOp Op>
void reduce_native(T* __restrict dst, const T* __restrict src, size_t n) {
  if constexpr (std::is_integral_v<T> && (Op == ReduceOp::kSum || Op == ReduceOp::kAvg)) {
    using U = std::make_unsigned_t<T>;  // wrap-around instead of signed overflow
    for (size_t i = 0; i < n; ++i) {
      dst[i] = static_cast<T>(static_cast<U>(static_cast<U>(dst[i]) + static_cast<U>(src[i])));
    }
  } else {
    for (size_t i = 0; i < n; ++i) dst[i] = combine<T>(dst[i], src[i], Op);
  }
}

template <ReduceOp Op>
void reduce_bf16(uint16_t* __restrict dst, const uint16_t* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    dst[i] = float_to_bf16(combine<float>(bf16_to_float(dst[i]), bf16_to_float(src[i]), Op));
  }
}

template <ReduceOp Op>
void reduce_f16(uint16_t* __restrict dst, const uint16_t* __restrict src, size_t n) {
  size_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dst + i)));
    __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    __m256 r;
    if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kAvg) {
      r = _mm256_add_ps(a, b);
    } else if constexpr (Op == ReduceOp::kMax) {
      r = _mm256_blendv_ps(a, b, _mm256_cmp_ps(b, a, _CMP_GT_OQ));
    } else {
      r = _mm256_blendv_ps(a, b, _mm256_cmp_ps(b, a, _CMP_LT_OQ));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) {
    dst[i] = float_to_half(combine<float>(half_to_float(dst[i]), half_to_float(src[i]), Op));
  }
}

template <ReduceOp Op>
void reduce_typed(void* dst, const void* src, size_t n, DType dtype) {
  switch (dtype) {
    case DType::f32:
      return reduce_native<float, Op>(static_cast<float*>(dst), static_cast<const float*>(src), n);
    case DType::f64:
      return reduce_native<double, Op>(static_cast<double*>(dst), static_cast<const double*>(src),
                                       n);
    case DType::i32:
      return reduce_native<int32_t, Op>(static_cast<int32_t*>(dst),
                                        static_cast<const int32_t*>(src), n);
    case DType::i64:
      return reduce_native<int64_t, Op>(static_cast<int64_t*>(dst),
                                        static_cast<const int64_t*>(src), n);
    case DType::u8:
      return reduce_native<uint8_t, Op>(static_cast<uint8_t*>(dst),
                                        static_cast<const uint8_t*>(src), n);
    case DType::f16:
      return reduce_f16<Op>(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), n);
    case DType::bf16:
      return reduce_bf16<Op>(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), n);
  }
  DTRAIN_THROW(DTypeError, "reduce: unknown dtype {}", static_cast<int>(dtype));
}

template <typename T>
void scale_float(T* __restrict data, size_t n, T factor) {
  for (size_t i = 0; i < n; ++i) data[i] *= factor;
}

template <typename T>
void scale_int(T* __restrict data, size_t n, double factor) {
  for (size_t i = 0; i < n; ++i) {
    data[i] = static_cast<T>(std::llround(static_cast<double>(data[i]) * factor));
  }
}

void scale_bf16(uint16_t* __restrict data, size_t n, float factor) {
  for (size_t i = 0; i < n; ++i) data[i] = float_to_bf16(bf16_to_float(data[i]) * factor);
}

void scale_f16(uint16_t* __restrict data, size_t n, float factor) {
  size_t i = 0;
#if defined(__F16C__)
  __m256 f = _mm256_set1_ps(factor);
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + i)));
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(data + i),
        _mm256_cvtps_ph(_mm256_mul_ps(a, f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) data[i] = float_to_half(half_to_float(data[i]) * factor);
}

}  // namespace

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "?";
}

void reduce_into(void* dst, const void* src, size_t count, DType dtype, ReduceOp op) {
  if (count == 0) return;
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return reduce_typed<ReduceOp::kSum>(dst, src, count, dtype);
    case ReduceOp::kMax:
      return reduce_typed<ReduceOp::kMax>(dst, src, count, dtype);
    case ReduceOp::kMin:
      return reduce_typed<ReduceOp::kMin>(dst, src, count, dtype);
  }
  DTRAIN_THROW(InvalidArgument, "reduce: unknown reduce op {}", static_cast<int>(op));
}

// Floats multiply by the factor rounded to the element's compute type (float for
// f32/f16/bf16, double for f64); integers round value * factor to nearest.
void scale_in_place(void* data, size_t count, DType dtype, double factor) {
  if (count == 0 || factor == 1.0) return;
  switch (dtype) {
    case DType::f32:
      return scale_float<float>(static_cast<float*>(data), count, static_cast<float>(factor));
    case DType::f64:
      return scale_float<double>(static_cast<double*>(data), count, factor);
    case DType::f16:
      return scale_f16(static_cast<uint16_t*>(data), count, static_cast<float>(factor));
    case DType::bf16:
      return scale_bf16(static_cast<uint16_t*>(data), count, static_cast<float>(factor));
    case DType::i32:
      return scale_int<int32_t>(static_cast<int32_t*>(data), count, factor);
    case DType::i64:
      return scale_int<int64_t>(static_cast<int64_t*>(data), count, factor);
    case DType::u8:
      return scale_int<uint8_t>(static_cast<uint8_t*>(data), count, factor);
  }
  DTRAIN_THROW(DTypeError, "scale: unknown dtype {}", static_cast<int>(dtype));
}

}  // namespace dtrain::comm
