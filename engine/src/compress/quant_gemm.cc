// The s8 x s8 -> s32 GEMM of quant.h: oneDNN's dnnl_gemm_s8s8s32 and a plain loop.
#include <oneapi/dnnl/dnnl.h>

#include "dtrain/common/error.h"
#include "dtrain/engine/compress/quant.h"

namespace dtrain::compress {

namespace {

void gemm_reference(int64_t m, int64_t n, int64_t k, const int8_t* a, const int8_t* b, int32_t* c,
                    bool bt) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      int32_t acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        acc += static_cast<int32_t>(a[i * k + p]) *
               static_cast<int32_t>(bt ? b[j * k + p] : b[p * n + j]);
      }
      c[i * n + j] = acc;
    }
  }
}

void gemm_onednn(int64_t m, int64_t n, int64_t k, const int8_t* a, const int8_t* b, int32_t* c,
                 bool bt) {
  const int32_t c_offset = 0;
  dnnl_status_t st = dnnl_gemm_s8s8s32('N', bt ? 'T' : 'N', 'F', m, n, k, 1.0f, a, k, 0, b,
                                       bt ? k : n, 0, 0.0f, c, n, &c_offset);
  DTRAIN_CHECK(st == dnnl_success, InternalError,
               "dnnl_gemm_s8s8s32 failed (status {}) for M={} N={} K={}", static_cast<int>(st), m,
               n, k);
}

}  // namespace

void gemm_s8s8s32(Int8Kernel kernel, int64_t m, int64_t n, int64_t k, const int8_t* a,
                  const int8_t* b, int32_t* c, bool b_transposed) {
  DTRAIN_CHECK(m >= 0 && n >= 0 && k >= 0, InvalidArgument,
               "gemm_s8s8s32: negative size M={} N={} K={}", m, n, k);
  if (m == 0 || n == 0) return;
  if (kernel == Int8Kernel::kReference) {  // the others are oneDNN's GEMM
    gemm_reference(m, n, k, a, b, c, b_transposed);
  } else {
    gemm_onednn(m, n, k, a, b, c, b_transposed);
  }
}

}  // namespace dtrain::compress
