// Layer norm and GELU CUDA kernels. The arithmetic is the functors of
// dtrain/engine/functors.h (fn::LayerNormFwd/Bwd, fn::layer_norm_rstd, fn::GeluFwd/Bwd),
// the same ones the CPU kernels of ops_transformer.cc call.
//
// Layer norm: one block per row; the row's sums (mean, variance; in backward sum(g) and
// sum(g * xhat)) accumulate in double through a warp-shuffle block reduction, as the
// CPU accumulates them in double. Statistics are stored in the stat type S (double
// for f64, float otherwise). dweight/dbias are column sums over rows: a first kernel
// sums chunks of rows per column into `partial`, a second adds the chunks in order
// (deterministic, no atomics).
#include "cuda/device_types.cuh"

namespace dtrain::cuda {

namespace {

constexpr int kRowBlock = 256;
constexpr int64_t kRowsPerChunk = 64;

template <typename S>
using stat_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Sum over the block of one double per thread; every thread gets the result.
__device__ double block_sum_d(double v, double* shared) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((tid & 31) == 0) shared[tid / 32] = v;
  __syncthreads();
  if (tid < 32) {
    const int warps = static_cast<int>(blockDim.x) / 32;
    double w = tid < warps ? shared[tid] : 0.0;
    for (int o = 16; o > 0; o /= 2) w += __shfl_down_sync(0xffffffffu, w, o);
    if (tid == 0) shared[0] = w;
  }
  __syncthreads();
  double r = shared[0];
  __syncthreads();
  return r;
}

template <typename T>
__global__ void layer_norm_fwd_kernel(const T* x, const T* w, const T* b, int64_t rows, int64_t d,
                                      compute_t<T> eps, T* y, stat_t<T>* mean, stat_t<T>* rstd) {
  using C = compute_t<T>;
  __shared__ double shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    double s = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) s += static_cast<double>(load(xr, j));
    const double mu = block_sum_d(s, shared) / static_cast<double>(d);
    double ss = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      double c = static_cast<double>(load(xr, j)) - mu;
      ss += c * c;
    }
    const double var = block_sum_d(ss, shared) / static_cast<double>(d);
    const C m = static_cast<C>(mu), rs = fn::layer_norm_rstd(static_cast<C>(var), eps);
    if (threadIdx.x == 0) {
      mean[r] = static_cast<stat_t<T>>(m);
      rstd[r] = static_cast<stat_t<T>>(rs);
    }
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      C wj = w ? load(w, j) : C(1), bj = b ? load(b, j) : C(0);
      y[r * d + j] = to_elem<T>(fn::LayerNormFwd{}(load(xr, j), m, rs, wj, bj));
    }
  }
}

template <typename T>
__global__ void layer_norm_dx_kernel(const T* dy, const T* x, const stat_t<T>* mean,
                                     const stat_t<T>* rstd, const T* w, int64_t rows, int64_t d,
                                     T* dx) {
  using C = compute_t<T>;
  __shared__ double shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    const C m = static_cast<C>(mean[r]), rs = static_cast<C>(rstd[r]);
    double sg = 0, sgx = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      C g = load(gr, j) * (w ? load(w, j) : C(1));
      sg += static_cast<double>(g);
      sgx += static_cast<double>(g) * static_cast<double>((load(xr, j) - m) * rs);
    }
    const C mg = static_cast<C>(block_sum_d(sg, shared) / static_cast<double>(d));
    const C mgx = static_cast<C>(block_sum_d(sgx, shared) / static_cast<double>(d));
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      C g = load(gr, j) * (w ? load(w, j) : C(1));
      dx[r * d + j] = to_elem<T>(fn::LayerNormBwd{}(g, (load(xr, j) - m) * rs, mg, mgx, rs));
    }
  }
}

// partial[c][0][j] = sum of dy * xhat, partial[c][1][j] = sum of dy over the rows of chunk c.
template <typename T>
__global__ void layer_norm_cols_kernel(const T* dy, const T* x, const stat_t<T>* mean,
                                       const stat_t<T>* rstd, int64_t rows, int64_t d,
                                       stat_t<T>* partial) {
  using S = stat_t<T>;
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t r0 = c * kRowsPerChunk;
    const int64_t r1 = rows < r0 + kRowsPerChunk ? rows : r0 + kRowsPerChunk;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      S sw = 0, sb = 0;
      for (int64_t r = r0; r < r1; ++r) {
        S g = static_cast<S>(load(dy, r * d + j));
        S xhat = (static_cast<S>(load(x, r * d + j)) - mean[r]) * rstd[r];
        sw += g * xhat;
        sb += g;
      }
      partial[(c * 2) * d + j] = sw;
      partial[(c * 2 + 1) * d + j] = sb;
    }
  }
}

template <typename T>
__global__ void layer_norm_cols_finish_kernel(const stat_t<T>* partial, int64_t chunks, int64_t d,
                                              T* dw, T* db) {
  DTRAIN_GRID_STRIDE(j, d) {
    double sw = 0, sb = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      sw += static_cast<double>(partial[(c * 2) * d + j]);
      sb += static_cast<double>(partial[(c * 2 + 1) * d + j]);
    }
    if (dw) dw[j] = to_elem<T>(sw);
    if (db) db[j] = to_elem<T>(sb);
  }
}

template <typename T>
__global__ void gelu_fwd_kernel(const T* x, T* y, int64_t n) {
  DTRAIN_GRID_STRIDE(i, n) { y[i] = to_elem<T>(fn::GeluFwd{}(load(x, i))); }
}

template <typename T>
__global__ void gelu_bwd_kernel(const T* dy, const T* x, T* dx, int64_t n) {
  DTRAIN_GRID_STRIDE(i, n) { dx[i] = to_elem<T>(fn::GeluBwd{}(load(dy, i), load(x, i))); }
}

unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(rows < 1 ? 1 : (rows > 65535 * 16 ? 65535 * 16 : rows));
}

}  // namespace

int64_t layer_norm_partial_rows(int64_t rows) {
  return rows < 1 ? 1 : (rows + kRowsPerChunk - 1) / kRowsPerChunk;
}

void layer_norm_forward(DType dt, const void* x, const void* w, const void* b, int64_t rows,
                        int64_t d, double eps, void* y, void* mean, void* rstd, void* stream) {
  if (rows * d == 0) return;
  dispatch_floating(dt, "layer_norm", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    using S = stat_t<T>;
    layer_norm_fwd_kernel<T><<<row_grid(rows), kRowBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(b), rows, d,
        static_cast<compute_t<T>>(eps), static_cast<T*>(y), static_cast<S*>(mean),
        static_cast<S*>(rstd));
  });
  check_launch("layer_norm");
}

void layer_norm_backward(DType dt, const void* dy, const void* x, const void* mean,
                         const void* rstd, const void* w, int64_t rows, int64_t d, void* dx,
                         void* dw, void* db, void* partial, void* stream) {
  if (d == 0) return;
  dispatch_floating(dt, "layer_norm backward", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    using S = stat_t<T>;
    const T* pdy = static_cast<const T*>(dy);
    const T* px = static_cast<const T*>(x);
    const S* pm = static_cast<const S*>(mean);
    const S* pr = static_cast<const S*>(rstd);
    if (dx && rows > 0) {
      layer_norm_dx_kernel<T><<<row_grid(rows), kRowBlock, 0, as_stream(stream)>>>(
          pdy, px, pm, pr, static_cast<const T*>(w), rows, d, static_cast<T*>(dx));
    }
    if (dw || db) {
      const int64_t chunks = rows > 0 ? layer_norm_partial_rows(rows) : 0;
      S* part = static_cast<S*>(partial);
      if (chunks > 0) {
        dim3 grid(static_cast<unsigned>(std::min<int64_t>((d + kBlock - 1) / kBlock, 65535)),
                  static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
        layer_norm_cols_kernel<T>
            <<<grid, kBlock, 0, as_stream(stream)>>>(pdy, px, pm, pr, rows, d, part);
      }
      layer_norm_cols_finish_kernel<T><<<grid_for(d), kBlock, 0, as_stream(stream)>>>(
          part, chunks, d, static_cast<T*>(dw), static_cast<T*>(db));
    }
  });
  check_launch("layer_norm backward");
}

void gelu_forward(DType dt, const void* x, void* y, int64_t n, void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "gelu", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    gelu_fwd_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(static_cast<const T*>(x),
                                                                      static_cast<T*>(y), n);
  });
  check_launch("gelu");
}

void gelu_backward(DType dt, const void* dy, const void* x, void* dx, int64_t n, void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "gelu backward", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    gelu_bwd_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), n);
  });
  check_launch("gelu backward");
}

}  // namespace dtrain::cuda
