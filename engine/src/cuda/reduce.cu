// Reduction CUDA kernels: sum over dimensions, non-finite counting (loss scaling),
// softmax/log_softmax forward and backward, and the fused cross-entropy. One block
// reduces one output (one row); threads combine partial results with the shared
// combine functors (fn::Add, fn::Max) first in registers, then through shared memory.
// Sums accumulate in double (f32 and f64 inputs alike: the GPU tests hold f32 to 1e-5
// relative against the CPU, which accumulates sums in double too). Softmax rows use
// fn::fast_exp on f32 exactly as the CPU kernel does.
#include "cuda/device_types.cuh"

namespace dtrain::cuda {

namespace {

constexpr int kReduceBlock = 256;

// Combines one value per thread of the block with f; every thread gets the result.
template <typename T, typename F>
__device__ T block_combine(T v, F f, T* shared) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int o = 16; o > 0; o /= 2) v = f(v, __shfl_down_sync(0xffffffffu, v, o));
  if ((tid & 31) == 0) shared[tid / 32] = v;
  __syncthreads();
  if (tid < 32) {
    const int warps = static_cast<int>(blockDim.x) / 32;
    T w = tid < warps ? shared[tid] : shared[0];
    for (int o = 16; o > 0; o /= 2) w = f(w, __shfl_down_sync(0xffffffffu, w, o));
    if (tid == 0) shared[0] = w;
  }
  __syncthreads();
  T r = shared[0];
  __syncthreads();  // shared may be reused by the caller's next combine
  return r;
}

// Max is idempotent, so padding a partial warp with shared[0] above is exact for
// fn::Max; for fn::Add the padding must be zero: reduce_add pads explicitly.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int tid = static_cast<int>(threadIdx.x);
  fn::Add add;
  for (int o = 16; o > 0; o /= 2) v = add(v, __shfl_down_sync(0xffffffffu, v, o));
  if ((tid & 31) == 0) shared[tid / 32] = v;
  __syncthreads();
  if (tid < 32) {
    const int warps = static_cast<int>(blockDim.x) / 32;
    T w = tid < warps ? shared[tid] : T(0);
    for (int o = 16; o > 0; o /= 2) w = add(w, __shfl_down_sync(0xffffffffu, w, o));
    if (tid == 0) shared[0] = w;
  }
  __syncthreads();
  T r = shared[0];
  __syncthreads();
  return r;
}

// One block per output element (grid-stride over outputs).
template <typename T>
__global__ void reduce_sum_block_kernel(const T* x, Strided kept, Strided reduced, T* out,
                                        int64_t n_out, int64_t n_red) {
  __shared__ double shared[32];
  for (int64_t j = blockIdx.x; j < n_out; j += gridDim.x) {
    const T* base = x + strided_offset(kept, j);
    double acc = 0;
    for (int64_t r = threadIdx.x; r < n_red; r += blockDim.x) {
      acc = fn::Add{}(acc, static_cast<double>(load(base, strided_offset(reduced, r))));
    }
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) out[j] = to_elem<T>(acc);
  }
}

// One thread per output element, for short reductions.
template <typename T>
__global__ void reduce_sum_thread_kernel(const T* x, Strided kept, Strided reduced, T* out,
                                         int64_t n_out, int64_t n_red) {
  DTRAIN_GRID_STRIDE(j, n_out) {
    const T* base = x + strided_offset(kept, j);
    double acc = 0;
    for (int64_t r = 0; r < n_red; ++r) {
      acc = fn::Add{}(acc, static_cast<double>(load(base, strided_offset(reduced, r))));
    }
    out[j] = to_elem<T>(acc);
  }
}

template <typename T>
__global__ void count_nonfinite_kernel(const T* x, int64_t n, int* count) {
  int local = 0;
  DTRAIN_GRID_STRIDE(i, n) { local += fn::is_finite(static_cast<double>(load(x, i))) ? 0 : 1; }
  if (local) atomicAdd(count, local);
}

// Row r of [outer, c, inner]: element j at (o * c + j) * inner + k.
struct Row {
  int64_t base, step;
  __device__ Row(int64_t r, int64_t c, int64_t inner)
      : base((r / inner) * c * inner + r % inner), step(inner) {}
  __device__ int64_t at(int64_t j) const { return base + j * step; }
};

template <typename T>
__global__ void softmax_fwd_kernel(const T* x, T* y, int64_t rows, int64_t c, int64_t inner,
                                   bool log) {
  using C = compute_t<T>;
  __shared__ C shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    Row row(r, c, inner);
    C m = load(x, row.at(0));
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) m = fn::Max{}(m, load(x, row.at(j)));
    m = block_combine(m, fn::Max{}, shared);
    C s = 0;
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
      s = fn::Add{}(s, fn::fast_exp(load(x, row.at(j)) - m));
    }
    s = block_sum(s, shared);
    if (log) {
      C lse = m + std::log(s);
      for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
        y[row.at(j)] = to_elem<T>(load(x, row.at(j)) - lse);
      }
    } else {
      C inv = C(1) / s;
      for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
        y[row.at(j)] = to_elem<T>(fn::fast_exp(load(x, row.at(j)) - m) * inv);
      }
    }
  }
}

template <typename T>
__global__ void softmax_bwd_kernel(const T* dy, const T* y, T* dx, int64_t rows, int64_t c,
                                   int64_t inner, bool log) {
  using C = compute_t<T>;
  __shared__ C shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    Row row(r, c, inner);
    C s = 0;
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
      C d = load(dy, row.at(j));
      s = fn::Add{}(s, log ? d : d * load(y, row.at(j)));
    }
    s = block_sum(s, shared);
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
      C d = load(dy, row.at(j)), v = load(y, row.at(j));
      dx[row.at(j)] = to_elem<T>(log ? fn::LogSoftmaxBwd{}(d, v, s) : fn::SoftmaxBwd{}(d, v, s));
    }
  }
}

template <typename T>
__global__ void cross_entropy_fwd_kernel(const T* x, const int64_t* target, int64_t n, int64_t c,
                                         T* probs, T* row_loss, int64_t* bad) {
  using C = compute_t<T>;
  __shared__ C shared[32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const T* xr = x + r * c;
    int64_t t = target[r];
    C m = load(xr, 0);
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) m = fn::Max{}(m, load(xr, j));
    m = block_combine(m, fn::Max{}, shared);
    C s = 0;
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
      s = fn::Add{}(s, fn::fast_exp(load(xr, j) - m));
    }
    s = block_sum(s, shared);
    if (probs) {
      C inv = C(1) / s;
      for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
        probs[r * c + j] = to_elem<T>(fn::fast_exp(load(xr, j) - m) * inv);
      }
    }
    if (threadIdx.x == 0) {
      if (t < 0 || t >= c) {
        *bad = r;
        row_loss[r] = to_elem<T>(0.f);
      } else {
        row_loss[r] = to_elem<T>(m + std::log(s) - load(xr, t));
      }
    }
  }
}

template <typename T>
__global__ void cross_entropy_bwd_kernel(const T* probs, const int64_t* target, int64_t n,
                                         int64_t c, compute_t<T> scale, T* dx) {
  DTRAIN_GRID_STRIDE(e, n * c) {
    int64_t r = e / c, j = e % c;
    dx[e] = to_elem<T>(fn::CrossEntropyBwd{}(load(probs, e), target[r] == j, scale));
  }
}

unsigned rows_grid(int64_t rows) {
  return static_cast<unsigned>(rows < 1 ? 1 : (rows > 65535 * 16 ? 65535 * 16 : rows));
}

}  // namespace

void reduce_sum(DType dt, const void* x, const Strided& kept, const Strided& reduced, void* out,
                int64_t n_out, int64_t n_reduced, void* stream) {
  if (n_out == 0) return;
  dispatch_floating(dt, "sum", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    const T* px = static_cast<const T*>(x);
    T* po = static_cast<T*>(out);
    if (n_reduced <= 64) {
      reduce_sum_thread_kernel<T><<<grid_for(n_out), kBlock, 0, as_stream(stream)>>>(
          px, kept, reduced, po, n_out, n_reduced);
    } else {
      reduce_sum_block_kernel<T><<<rows_grid(n_out), kReduceBlock, 0, as_stream(stream)>>>(
          px, kept, reduced, po, n_out, n_reduced);
    }
  });
  check_launch("sum");
}

void count_nonfinite(DType dt, const void* x, int64_t n, int* count, void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "count_nonfinite", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    count_nonfinite_kernel<T>
        <<<grid_for(n), kBlock, 0, as_stream(stream)>>>(static_cast<const T*>(x), n, count);
  });
  check_launch("count_nonfinite");
}

void softmax_forward(DType dt, const void* x, void* y, int64_t outer, int64_t c, int64_t inner,
                     bool log, void* stream) {
  int64_t rows = outer * inner;
  if (rows * c == 0) return;
  dispatch_floating(dt, "softmax", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    softmax_fwd_kernel<T><<<rows_grid(rows), kReduceBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), rows, c, inner, log);
  });
  check_launch("softmax");
}

void softmax_backward(DType dt, const void* dy, const void* y, void* dx, int64_t outer, int64_t c,
                      int64_t inner, bool log, void* stream) {
  int64_t rows = outer * inner;
  if (rows * c == 0) return;
  dispatch_floating(dt, "softmax backward", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    softmax_bwd_kernel<T><<<rows_grid(rows), kReduceBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), rows, c, inner,
        log);
  });
  check_launch("softmax backward");
}

void cross_entropy_forward(DType dt, const void* x, const int64_t* target, int64_t n, int64_t c,
                           void* probs, void* row_loss, int64_t* bad, void* stream) {
  if (n * c == 0) return;
  dispatch_floating(dt, "cross_entropy", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    cross_entropy_fwd_kernel<T><<<rows_grid(n), kReduceBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), target, n, c, static_cast<T*>(probs), static_cast<T*>(row_loss),
        bad);
  });
  check_launch("cross_entropy");
}

void cross_entropy_backward(DType dt, const void* probs, const int64_t* target, int64_t n,
                            int64_t c, double scale, void* dx, void* stream) {
  if (n * c == 0) return;
  dispatch_floating(dt, "cross_entropy backward", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    cross_entropy_bwd_kernel<T><<<grid_for(n * c), kBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(probs), target, n, c, static_cast<compute_t<T>>(scale),
        static_cast<T*>(dx));
  });
  check_launch("cross_entropy backward");
}

}  // namespace dtrain::cuda
