// Row-major GEMM for the CPU kernels (internal to the engine):
//   C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C
//
// f32 has two fast implementations, OpenBLAS (cblas_sgemm) and oneDNN (dnnl_sgemm);
// cpu::gemm uses the one chosen at configure time (DTRAIN_SGEMM=onednn|openblas,
// default onednn: on this project's AVX-512 machines Debian's OpenBLAS 0.3.21 runs
// its Haswell kernel and oneDNN's JIT GEMM measured 2-3x faster on the models'
// shapes; bench/train_throughput shows the effect). f64 always uses OpenBLAS.
// Both f32 paths are tested against gemm_reference.
#pragma once

#include <cblas.h>

#include <oneapi/dnnl/dnnl.h>
#include <cstdint>

#include "dtrain/common/error.h"

namespace dtrain::cpu {

inline void gemm_openblas(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                          const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                          float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}

inline void gemm_onednn(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                        float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a, lda, b,
                                ldb, beta, c, ldc);
  DTRAIN_CHECK(st == dnnl_success, InternalError,
               "dnnl_sgemm failed (status {}) for M={} N={} K={} lda={} ldb={} ldc={}",
               static_cast<int>(st), m, n, k, lda, ldb, ldc);
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
#if defined(DTRAIN_SGEMM_OPENBLAS)
  gemm_openblas(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#else
  gemm_onednn(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}

// Reference GEMM (the test oracle for the BLAS path), accumulating in double.
template <typename T>
void gemm_reference(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        double av = trans_a ? a[p * lda + i] : a[i * lda + p];
        double bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
        acc += av * bv;
      }
      double prev = beta == T(0) ? 0.0 : static_cast<double>(beta) * c[i * ldc + j];
      c[i * ldc + j] = static_cast<T>(alpha * acc + prev);
    }
  }
}

}  // namespace dtrain::cpu
