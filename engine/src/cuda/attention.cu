// Scaled dot-product attention CUDA kernels (hand written; not cuDNN's SDPA): the
// arithmetic shared with the CPU kernel is fn::AttentionProb, fn::SoftmaxBwd and
// fn::attention_visible (dtrain/engine/functors.h); exp is fn::fast_exp as on the CPU.
//
// Heads are contiguous [t, dh] blocks (the front end copies strided inputs). Tiles are
// staged in dynamic shared memory with rows padded to dh + 1 elements (no bank
// conflicts when a warp reads 32 rows at one column), in the compute type (float for
// f32/f16/bf16, double for f64); 128 threads per block.
//   forward   one block per (head, tile of kFwdQ queries): online softmax over key tiles
//             of 32 (a warp per row, a lane per key), O rescaled per tile, out = O / l,
//             lse = m + log l saved for backward. Causal blocks stop at their last row.
//   backward  D = rowsum(dO * O) first; then one kernel per (head, tile of kKvK keys)
//             for dK, dV over the query tiles that see them, and one per (head, tile of
//             kFwdQ queries) for dQ, both recomputing P = exp(S - lse): no atomics, so
//             gradients are deterministic. Scores S = scale * q.k are recomputed twice.
// Simple and exact rather than fast: no tensor cores, no software pipelining.
#include <cmath>

#include "cuda/device_types.cuh"

namespace dtrain::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int64_t kFwdQ = 16;  // query rows per forward / dQ block
constexpr int64_t kFwdK = 32;  // keys per step (a warp's width)
constexpr int64_t kKvK = 16;   // key rows per dK/dV block
constexpr int64_t kKvQ = 32;   // query rows per step of the dK/dV block

template <typename C>
__device__ __forceinline__ C neg_inf() {
  return static_cast<C>(-INFINITY);
}

template <typename C>
__device__ __forceinline__ C dot(const C* a, const C* b, int64_t n) {
  C acc = 0;
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

// Copies rows [r0, r0 + rows) of a contiguous [t, dh] head into a padded shared tile
// (row stride ld), zero past t.
template <typename T, typename C>
__device__ void stage(const T* head, int64_t t, int64_t dh, int64_t r0, int64_t rows, C* tile,
                      int64_t ld) {
  for (int64_t e = threadIdx.x; e < rows * dh; e += blockDim.x) {
    const int64_t r = e / dh, d = e % dh, i = r0 + r;
    tile[r * ld + d] = i < t ? static_cast<C>(load(head, i * dh + d)) : C(0);
  }
}

template <typename C>
__device__ C warp_max(C v) {
  for (int o = 16; o > 0; o /= 2) v = fn::Max{}(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename C>
__device__ C warp_sum(C v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void attention_fwd_kernel(const T* q, const T* k, const T* v, int64_t t, int64_t dh,
                                     bool causal, compute_t<T> scale, int64_t tiles, T* out,
                                     compute_t<T>* lse) {
  using C = compute_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t ld = dh + 1;
  C* qs = reinterpret_cast<C*>(smem);
  C* ks = qs + kFwdQ * ld;
  C* vs = ks + kFwdK * ld;
  C* os = vs + kFwdK * ld;
  C* ss = os + kFwdQ * ld;
  C* ms = ss + kFwdQ * kFwdK;
  C* ls = ms + kFwdQ;
  C* cs = ls + kFwdQ;
  const int64_t bh = blockIdx.x / tiles;
  const int64_t i0 = (tiles - 1 - static_cast<int64_t>(blockIdx.x) % tiles) * kFwdQ;  // big first
  const int64_t base = bh * t * dh;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  stage(q + base, t, dh, i0, kFwdQ, qs, ld);
  for (int64_t e = threadIdx.x; e < kFwdQ * ld; e += blockDim.x) os[e] = C(0);
  if (threadIdx.x < kFwdQ) {
    ms[threadIdx.x] = neg_inf<C>();
    ls[threadIdx.x] = C(0);
  }
  const int64_t kend = causal ? (t < i0 + kFwdQ ? t : i0 + kFwdQ) : t;
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdK) {
    __syncthreads();  // the previous step's readers of ks, vs, ss are done
    stage(k + base, t, dh, j0, kFwdK, ks, ld);
    stage(v + base, t, dh, j0, kFwdK, vs, ld);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kFwdQ * kFwdK; e += blockDim.x) {
      const int64_t r = e / kFwdK, c = e % kFwdK, i = i0 + r, j = j0 + c;
      const bool vis = i < t && j < t && fn::attention_visible(i, j, causal);
      ss[e] = vis ? scale * dot(qs + r * ld, ks + c * ld, dh) : neg_inf<C>();
    }
    __syncthreads();
    for (int64_t r = warp; r < kFwdQ; r += warps) {  // online softmax, a lane per key
      const C sv = ss[r * kFwdK + lane];
      const C m_old = ms[r], m_new = fn::Max{}(m_old, warp_max(sv));
      const C p = sv == neg_inf<C>() ? C(0) : fn::fast_exp(sv - m_new);
      const C lt = warp_sum(p);
      ss[r * kFwdK + lane] = p;
      __syncwarp();  // every lane has read ms[r] before lane 0 overwrites it
      if (lane == 0) {
        const C corr = m_old == neg_inf<C>() ? C(0) : fn::fast_exp(m_old - m_new);
        ls[r] = ls[r] * corr + lt;
        ms[r] = m_new;
        cs[r] = corr;
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kFwdQ * dh; e += blockDim.x) {
      const int64_t r = e / dh, d = e % dh;
      C acc = os[r * ld + d] * cs[r];
      for (int64_t c = 0; c < kFwdK; ++c) acc += ss[r * kFwdK + c] * vs[c * ld + d];
      os[r * ld + d] = acc;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < kFwdQ * dh; e += blockDim.x) {
    const int64_t r = e / dh, d = e % dh, i = i0 + r;
    if (i < t) out[base + i * dh + d] = to_elem<T>(os[r * ld + d] / ls[r]);
  }
  if (threadIdx.x < kFwdQ && i0 + threadIdx.x < t) {
    lse[bh * t + i0 + threadIdx.x] = ms[threadIdx.x] + std::log(ls[threadIdx.x]);
  }
}

// dvec[row] = sum_d dout * out.
template <typename T>
__global__ void attention_dvec_kernel(const T* out, const T* dout, int64_t rows, int64_t dh,
                                      compute_t<T>* dvec) {
  using C = compute_t<T>;
  DTRAIN_GRID_STRIDE(r, rows) {
    C acc = 0;
    for (int64_t d = 0; d < dh; ++d) acc += load(dout, r * dh + d) * load(out, r * dh + d);
    dvec[r] = acc;
  }
}

// Per-row lse and D of rows [r0, r0 + n) into shared (0 past t).
template <typename C>
__device__ void stage_rows(const C* lse, const C* dvec, int64_t t, int64_t r0, int64_t n, C* ls,
                           C* ds) {
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    const bool in = r0 + r < t;
    ls[r] = in ? lse[r0 + r] : C(0);
    ds[r] = in ? dvec[r0 + r] : C(0);
  }
}

// P and dS of the (rows x cols) tile of queries i0.. and keys j0.. into ps, dss.
template <typename C>
__device__ void score_grads(const C* qs, const C* dos, const C* ks, const C* vs, const C* ls,
                            const C* ds, int64_t rows, int64_t cols, int64_t i0, int64_t j0,
                            int64_t t, int64_t dh, int64_t ld, bool causal, C scale, C* ps,
                            C* dss) {
  for (int64_t e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int64_t r = e / cols, c = e % cols, i = i0 + r, j = j0 + c;
    const bool vis = i < t && j < t && fn::attention_visible(i, j, causal);
    const C s = scale * dot(qs + r * ld, ks + c * ld, dh);
    const C p = fn::AttentionProb{}(s, ls[r], vis);
    const C dp = dot(dos + r * ld, vs + c * ld, dh);
    if (ps) ps[e] = p;
    dss[e] = fn::SoftmaxBwd{}(dp, p, ds[r]);
  }
}

template <typename T>
__global__ void attention_dkv_kernel(const T* q, const T* k, const T* v, const T* dout,
                                     const compute_t<T>* lse, const compute_t<T>* dvec, int64_t t,
                                     int64_t dh, bool causal, compute_t<T> scale, int64_t tiles,
                                     T* dk, T* dv) {
  using C = compute_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t ld = dh + 1;
  C* ks = reinterpret_cast<C*>(smem);
  C* vs = ks + kKvK * ld;
  C* dks = vs + kKvK * ld;
  C* dvs = dks + kKvK * ld;
  C* qs = dvs + kKvK * ld;
  C* dos = qs + kKvQ * ld;
  C* ps = dos + kKvQ * ld;
  C* dss = ps + kKvQ * kKvK;
  C* ls = dss + kKvQ * kKvK;
  C* ds = ls + kKvQ;
  const int64_t bh = blockIdx.x / tiles, j0 = (static_cast<int64_t>(blockIdx.x) % tiles) * kKvK;
  const int64_t base = bh * t * dh;
  stage(k + base, t, dh, j0, kKvK, ks, ld);
  stage(v + base, t, dh, j0, kKvK, vs, ld);
  for (int64_t e = threadIdx.x; e < kKvK * ld; e += blockDim.x) dks[e] = dvs[e] = C(0);
  const int64_t istart = causal ? (j0 / kKvQ) * kKvQ : 0;  // earlier queries see none of these
  for (int64_t i0 = istart; i0 < t; i0 += kKvQ) {
    __syncthreads();
    stage(q + base, t, dh, i0, kKvQ, qs, ld);
    stage(dout + base, t, dh, i0, kKvQ, dos, ld);
    stage_rows(lse + bh * t, dvec + bh * t, t, i0, kKvQ, ls, ds);
    __syncthreads();
    score_grads(qs, dos, ks, vs, ls, ds, kKvQ, kKvK, i0, j0, t, dh, ld, causal, scale, ps, dss);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kKvK * dh; e += blockDim.x) {
      const int64_t c = e / dh, d = e % dh;
      C av = 0, ak = 0;
      for (int64_t r = 0; r < kKvQ; ++r) {
        av += ps[r * kKvK + c] * dos[r * ld + d];
        ak += dss[r * kKvK + c] * qs[r * ld + d];
      }
      dvs[c * ld + d] += av;
      dks[c * ld + d] += scale * ak;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < kKvK * dh; e += blockDim.x) {
    const int64_t c = e / dh, d = e % dh, j = j0 + c;
    if (j < t) {
      dk[base + j * dh + d] = to_elem<T>(dks[c * ld + d]);
      dv[base + j * dh + d] = to_elem<T>(dvs[c * ld + d]);
    }
  }
}

template <typename T>
__global__ void attention_dq_kernel(const T* q, const T* k, const T* v, const T* dout,
                                    const compute_t<T>* lse, const compute_t<T>* dvec, int64_t t,
                                    int64_t dh, bool causal, compute_t<T> scale, int64_t tiles,
                                    T* dq) {
  using C = compute_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t ld = dh + 1;
  C* qs = reinterpret_cast<C*>(smem);
  C* dos = qs + kFwdQ * ld;
  C* dqs = dos + kFwdQ * ld;
  C* ks = dqs + kFwdQ * ld;
  C* vs = ks + kFwdK * ld;
  C* dss = vs + kFwdK * ld;
  C* ls = dss + kFwdQ * kFwdK;
  C* ds = ls + kFwdQ;
  const int64_t bh = blockIdx.x / tiles;
  const int64_t i0 = (tiles - 1 - static_cast<int64_t>(blockIdx.x) % tiles) * kFwdQ;
  const int64_t base = bh * t * dh;
  stage(q + base, t, dh, i0, kFwdQ, qs, ld);
  stage(dout + base, t, dh, i0, kFwdQ, dos, ld);
  stage_rows(lse + bh * t, dvec + bh * t, t, i0, kFwdQ, ls, ds);
  for (int64_t e = threadIdx.x; e < kFwdQ * ld; e += blockDim.x) dqs[e] = C(0);
  const int64_t kend = causal ? (t < i0 + kFwdQ ? t : i0 + kFwdQ) : t;
  for (int64_t j0 = 0; j0 < kend; j0 += kFwdK) {
    __syncthreads();
    stage(k + base, t, dh, j0, kFwdK, ks, ld);
    stage(v + base, t, dh, j0, kFwdK, vs, ld);
    __syncthreads();
    score_grads<C>(qs, dos, ks, vs, ls, ds, kFwdQ, kFwdK, i0, j0, t, dh, ld, causal, scale, nullptr,
                   dss);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < kFwdQ * dh; e += blockDim.x) {
      const int64_t r = e / dh, d = e % dh;
      C acc = 0;
      for (int64_t c = 0; c < kFwdK; ++c) acc += dss[r * kFwdK + c] * ks[c * ld + d];
      dqs[r * ld + d] += scale * acc;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < kFwdQ * dh; e += blockDim.x) {
    const int64_t r = e / dh, d = e % dh, i = i0 + r;
    if (i < t) dq[base + i * dh + d] = to_elem<T>(dqs[r * ld + d]);
  }
}

int64_t fwd_elems(int64_t dh) {
  return (2 * kFwdQ + 2 * kFwdK) * (dh + 1) + kFwdQ * kFwdK + 3 * kFwdQ;
}
int64_t dkv_elems(int64_t dh) {
  return (4 * kKvK + 2 * kKvQ) * (dh + 1) + 2 * kKvQ * kKvK + 2 * kKvQ;
}
int64_t dq_elems(int64_t dh) {
  return (3 * kFwdQ + 2 * kFwdK) * (dh + 1) + kFwdQ * kFwdK + 2 * kFwdQ;
}

int64_t compute_size(DType dt) { return dt == DType::f64 ? 8 : 4; }

// Launches kernel on grid blocks with `bytes` of dynamic shared memory (raising the
// kernel's limit above the 48 KiB default when needed).
template <typename K, typename... Args>
void launch(K kernel, int64_t blocks, int64_t bytes, void* stream, Args... args) {
  if (bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(bytes),
           as_stream(stream)>>>(args...);
}

}  // namespace

int64_t attention_shared_bytes(DType dt, int64_t dh) {
  int64_t e = fwd_elems(dh);
  if (dkv_elems(dh) > e) e = dkv_elems(dh);
  if (dq_elems(dh) > e) e = dq_elems(dh);
  return e * compute_size(dt);
}

void attention_forward(DType dt, const void* q, const void* k, const void* v, int64_t bh, int64_t t,
                       int64_t dh, bool causal, double scale, void* out, void* lse, void* stream) {
  if (bh * t == 0) return;
  dispatch_floating(dt, "scaled_dot_product_attention", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    using C = compute_t<T>;
    const int64_t tiles = (t + kFwdQ - 1) / kFwdQ;
    launch(attention_fwd_kernel<T>, bh * tiles, fwd_elems(dh) * compute_size(dt), stream,
           static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), t, dh,
           causal, static_cast<C>(scale), tiles, static_cast<T*>(out), static_cast<C*>(lse));
  });
  check_launch("scaled_dot_product_attention");
}

void attention_backward(DType dt, const void* q, const void* k, const void* v, const void* out,
                        const void* lse, const void* dout, int64_t bh, int64_t t, int64_t dh,
                        bool causal, double scale, void* dq, void* dk, void* dv, void* dvec,
                        void* stream) {
  if (bh * t == 0) return;
  dispatch_floating(dt, "scaled_dot_product_attention backward", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    using C = compute_t<T>;
    const T* pq = static_cast<const T*>(q);
    const T* pk = static_cast<const T*>(k);
    const T* pv = static_cast<const T*>(v);
    const T* pdo = static_cast<const T*>(dout);
    const C* pl = static_cast<const C*>(lse);
    C* pd = static_cast<C*>(dvec);
    attention_dvec_kernel<T><<<grid_for(bh * t), kBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(out), pdo, bh * t, dh, pd);
    const C sc = static_cast<C>(scale);
    const int64_t kv_tiles = (t + kKvK - 1) / kKvK, q_tiles = (t + kFwdQ - 1) / kFwdQ;
    launch(attention_dkv_kernel<T>, bh * kv_tiles, dkv_elems(dh) * compute_size(dt), stream, pq, pk,
           pv, pdo, pl, static_cast<const C*>(pd), t, dh, causal, sc, kv_tiles, static_cast<T*>(dk),
           static_cast<T*>(dv));
    launch(attention_dq_kernel<T>, bh * q_tiles, dq_elems(dh) * compute_size(dt), stream, pq, pk,
           pv, pdo, pl, static_cast<const C*>(pd), t, dh, causal, sc, q_tiles, static_cast<T*>(dq));
  });
  check_launch("scaled_dot_product_attention backward");
}

}  // namespace dtrain::cuda
