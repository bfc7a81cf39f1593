// The fused CPU attention kernel (attention.h).
#include "cpu/attention.h"

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "dtrain/engine/functors.h"

namespace dtrain::cpu {

namespace {

template <typename T>
const T* head_ptr(const AttentionOperand<T>& a, int64_t bh, int64_t heads) {
  return a.base + (bh / heads) * a.sb + (bh % heads) * a.sh;
}

// Threads for the (batch, head) loop: f32 only (oneDNN runs each GEMM on the calling
// thread inside the team); f64 stays on one thread.
template <typename T>
int attention_threads(const AttentionGeom& g) {
  if constexpr (std::is_same_v<T, double>) return 1;
  return threads_for(g.batch * g.heads, g.batch * g.heads * g.t * g.t * g.dh);
}

// Keys visible to query tile [i0, i0 + tq): all T, or up to the tile's last row.
int64_t tile_keys(const AttentionGeom& g, int64_t i0, int64_t tq) {
  return g.causal ? i0 + tq : g.t;
}

// Softmax of row[0, n_vis) in place (row[n_vis, tk) zeroed, the masked keys); returns
// the row's log-sum-exp.
template <typename T>
T softmax_row(T* __restrict row, int64_t n_vis, int64_t tk) {
  T m = row[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n_vis; ++j) m = row[j] > m ? row[j] : m;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n_vis; ++j) {
    T e = fn::fast_exp(row[j] - m);
    row[j] = e;
    s += e;
  }
  const T inv = T(1) / s;
#pragma omp simd
  for (int64_t j = 0; j < n_vis; ++j) row[j] *= inv;
  for (int64_t j = n_vis; j < tk; ++j) row[j] = T(0);
  return m + std::log(s);
}

template <typename T>
void forward_head(const AttentionGeom& g, const T* q, int64_t ldq, const T* k, int64_t ldk,
                  const T* v, int64_t ldv, T* out, T* lse, T* s) {
  const int64_t dh = g.dh;
  for (int64_t i0 = 0; i0 < g.t; i0 += kAttentionBlockQ) {
    const int64_t tq = std::min(kAttentionBlockQ, g.t - i0), tk = tile_keys(g, i0, tq);
    gemm(false, true, tq, tk, dh, static_cast<T>(g.scale), q + i0 * ldq, ldq, k, ldk, T(0), s, tk);
    for (int64_t r = 0; r < tq; ++r) {
      const int64_t i = i0 + r;
      lse[i] = softmax_row(s + r * tk, g.causal ? i + 1 : tk, tk);
    }
    gemm(false, false, tq, dh, tk, T(1), s, tk, v, ldv, T(0), out + i0 * dh, dh);
  }
}

template <typename T>
void backward_head(const AttentionGeom& g, const T* q, int64_t ldq, const T* k, int64_t ldk,
                   const T* v, int64_t ldv, const T* out, const T* lse, const T* dout, T* dq, T* dk,
                   T* dv, T* p, T* dp, T* dvec) {
  const int64_t dh = g.dh;
  const T scale = static_cast<T>(g.scale);
  for (int64_t i = 0; i < g.t; ++i) {
    const T* __restrict a = dout + i * dh;
    const T* __restrict b = out + i * dh;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < dh; ++d) acc += a[d] * b[d];
    dvec[i] = acc;
  }
  for (int64_t e = 0; e < g.t * dh; ++e) dk[e] = dv[e] = T(0);
  for (int64_t i0 = 0; i0 < g.t; i0 += kAttentionBlockQ) {
    const int64_t tq = std::min(kAttentionBlockQ, g.t - i0), tk = tile_keys(g, i0, tq);
    gemm(false, true, tq, tk, dh, scale, q + i0 * ldq, ldq, k, ldk, T(0), p, tk);
    gemm(false, true, tq, tk, dh, T(1), dout + i0 * dh, dh, v, ldv, T(0), dp, tk);
    for (int64_t r = 0; r < tq; ++r) {
      const int64_t i = i0 + r;
      T* __restrict pr = p + r * tk;
      T* __restrict dr = dp + r * tk;
      const T l = lse[i], di = dvec[i];
#pragma omp simd
      for (int64_t j = 0; j < tk; ++j) {
        T pj = fn::AttentionProb{}(pr[j], l, fn::attention_visible(i, j, g.causal));
        pr[j] = pj;
        dr[j] = fn::SoftmaxBwd{}(dr[j], pj, di);
      }
    }
    gemm(true, false, tk, dh, tq, T(1), p, tk, dout + i0 * dh, dh, T(1), dv, dh);
    gemm(false, false, tq, dh, tk, scale, dp, tk, k, ldk, T(0), dq + i0 * dh, dh);
    gemm(true, false, tk, dh, tq, scale, dp, tk, q + i0 * ldq, ldq, T(1), dk, dh);
  }
}

}  // namespace

template <typename T>
void attention_forward(const AttentionGeom& g, AttentionOperand<T> q, AttentionOperand<T> k,
                       AttentionOperand<T> v, T* out, T* lse) {
  const int64_t bh_count = g.batch * g.heads, head = g.t * g.dh;
  if (bh_count * g.t == 0) return;
  const int threads = attention_threads<T>(g);
  const size_t scratch = static_cast<size_t>(std::min(kAttentionBlockQ, g.t) * g.t);
  parallel_for(bh_count, threads, [&](int64_t begin, int64_t end, int) {
    std::vector<T> s(scratch);
    for (int64_t bh = begin; bh < end; ++bh) {
      forward_head(g, head_ptr(q, bh, g.heads), q.ld, head_ptr(k, bh, g.heads), k.ld,
                   head_ptr(v, bh, g.heads), v.ld, out + bh * head, lse + bh * g.t, s.data());
    }
  });
}

template <typename T>
void attention_backward(const AttentionGeom& g, AttentionOperand<T> q, AttentionOperand<T> k,
                        AttentionOperand<T> v, const T* out, const T* lse, const T* dout, T* dq,
                        T* dk, T* dv) {
  const int64_t bh_count = g.batch * g.heads, head = g.t * g.dh;
  if (bh_count * g.t == 0) return;
  const int threads = attention_threads<T>(g);
  const size_t scratch = static_cast<size_t>(std::min(kAttentionBlockQ, g.t) * g.t);
  parallel_for(bh_count, threads, [&](int64_t begin, int64_t end, int) {
    std::vector<T> p(scratch), dp(scratch), dvec(static_cast<size_t>(g.t));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t o = bh * head;
      backward_head(g, head_ptr(q, bh, g.heads), q.ld, head_ptr(k, bh, g.heads), k.ld,
                    head_ptr(v, bh, g.heads), v.ld, out + o, lse + bh * g.t, dout + o, dq + o,
                    dk + o, dv + o, p.data(), dp.data(), dvec.data());
    }
  });
}

template void attention_forward<float>(const AttentionGeom&, AttentionOperand<float>,
                                       AttentionOperand<float>, AttentionOperand<float>, float*,
                                       float*);
template void attention_forward<double>(const AttentionGeom&, AttentionOperand<double>,
                                        AttentionOperand<double>, AttentionOperand<double>, double*,
                                        double*);
template void attention_backward<float>(const AttentionGeom&, AttentionOperand<float>,
                                        AttentionOperand<float>, AttentionOperand<float>,
                                        const float*, const float*, const float*, float*, float*,
                                        float*);
template void attention_backward<double>(const AttentionGeom&, AttentionOperand<double>,
                                         AttentionOperand<double>, AttentionOperand<double>,
                                         const double*, const double*, const double*, double*,
                                         double*, double*);

}  // namespace dtrain::cpu
