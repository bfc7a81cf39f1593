// Elementwise CUDA kernels: fill, strided gather/scatter with dtype conversion, unary
// and binary ops with broadcasting, activation backward, dropout, embedding and the
// fused SGD/Adam updates. The arithmetic is the functors of dtrain/engine/functors.h,
// the same ones the CPU kernels call; these kernels only load, call and store.
#include "cuda/device_types.cuh"

namespace dtrain::cuda {

namespace {

template <typename T>
__global__ void fill_kernel(T* p, int64_t n, T v) {
  DTRAIN_GRID_STRIDE(i, n) { p[i] = v; }
}

template <typename S, typename D>
__global__ void gather_kernel(const S* src, Strided g, D* dst, int64_t n) {
  DTRAIN_GRID_STRIDE(i, n) {
    if constexpr (std::is_same_v<S, D>) {
      dst[i] = src[strided_offset(g, i)];
    } else {
      dst[i] = to_elem<D>(load(src, strided_offset(g, i)));
    }
  }
}

template <typename T>
__global__ void scatter_kernel(const T* src, T* dst, Strided g, int64_t n) {
  DTRAIN_GRID_STRIDE(i, n) { dst[strided_offset(g, i)] = src[i]; }
}

template <typename T, typename F>
__global__ void unary_kernel(const T* x, T* y, int64_t n, F f) {
  DTRAIN_GRID_STRIDE(i, n) { y[i] = to_elem<T>(f(load(x, i))); }
}

template <typename T, typename F>
__global__ void activation_bwd_kernel(const T* dy, const T* y, T* dx, int64_t n, F f) {
  DTRAIN_GRID_STRIDE(i, n) { dx[i] = to_elem<T>(f(load(dy, i), load(y, i))); }
}

template <typename T, typename F>
__global__ void binary_kernel(const T* a, Strided ga, const T* b, Strided gb, T* out, int64_t n,
                              F f) {
  DTRAIN_GRID_STRIDE(i, n) {
    out[i] = to_elem<T>(f(load(a, strided_offset(ga, i)), load(b, strided_offset(gb, i))));
  }
}

template <typename T>
__global__ void dropout_kernel(const T* x, T* y, T* mask, int64_t n, fn::DropoutMask m) {
  DTRAIN_GRID_STRIDE(i, n) {
    float k = m(static_cast<uint64_t>(i));
    mask[i] = to_elem<T>(k);
    y[i] = to_elem<T>(load(x, i) * static_cast<compute_t<T>>(k));
  }
}

template <typename T>
__global__ void embedding_fwd_kernel(const T* w, const int64_t* idx, int64_t n, int64_t d,
                                     int64_t v, T* out, int64_t* bad) {
  DTRAIN_GRID_STRIDE(e, n * d) {
    int64_t i = e / d, j = e % d;
    int64_t t = idx[i];
    if (t < 0 || t >= v) {
      *bad = i;  // any offending position will do; the front end reports it
      out[e] = to_elem<T>(0.f);
    } else {
      out[e] = w[t * d + j];
    }
  }
}

template <typename T>
__global__ void embedding_bwd_kernel(const T* dy, const int64_t* idx, int64_t n, int64_t d,
                                     int64_t v, T* dw) {
  DTRAIN_GRID_STRIDE(e, n * d) {
    int64_t t = idx[e / d];
    if (t >= 0 && t < v) atomicAdd(dw + t * d + e % d, dy[e]);
  }
}

template <typename T>
__global__ void sgd_kernel(T* p, const T* g, T* buf, int64_t n, fn::SgdUpdate u) {
  DTRAIN_GRID_STRIDE(i, n) {
    compute_t<T> pv = load(p, i), bv = buf ? load(buf, i) : compute_t<T>(0);
    u(pv, load(g, i), bv);
    p[i] = to_elem<T>(pv);
    if (buf) buf[i] = to_elem<T>(bv);
  }
}

template <typename T>
__global__ void adam_kernel(T* p, const T* g, T* m, T* v, int64_t n, fn::AdamUpdate u) {
  DTRAIN_GRID_STRIDE(i, n) {
    compute_t<T> pv = load(p, i), mv = load(m, i), vv = load(v, i);
    u(pv, load(g, i), mv, vv);
    p[i] = to_elem<T>(pv);
    m[i] = to_elem<T>(mv);
    v[i] = to_elem<T>(vv);
  }
}

template <typename T, typename F>
void launch_unary(const void* x, void* y, int64_t n, F f, void* stream) {
  unary_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(static_cast<const T*>(x),
                                                                 static_cast<T*>(y), n, f);
}

template <typename T, typename F>
void launch_binary(const void* a, const Strided& ga, const void* b, const Strided& gb, void* out,
                   int64_t n, F f, void* stream) {
  binary_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
      static_cast<const T*>(a), ga, static_cast<const T*>(b), gb, static_cast<T*>(out), n, f);
}

}  // namespace

void fill(DType dt, void* p, int64_t n, double value, void* stream) {
  if (n == 0) return;
  dispatch_any(dt, "fill", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    T v;
    if constexpr (std::is_same_v<T, __half>) {
      v = __float2half_rn(static_cast<float>(value));
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      v = __float2bfloat16_rn(static_cast<float>(value));
    } else {
      v = static_cast<T>(value);
    }
    fill_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(static_cast<T*>(p), n, v);
  });
  check_launch("fill");
}

void gather(DType src_dt, const void* src, const Strided& g, DType dst_dt, void* dst, int64_t n,
            void* stream) {
  if (n == 0) return;
  if (src_dt == dst_dt) {
    dispatch_any(src_dt, "copy", [&](auto tag) {
      using T = DTRAIN_ELEM_T(tag);
      gather_kernel<T, T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
          static_cast<const T*>(src), g, static_cast<T*>(dst), n);
    });
  } else {
    dispatch_floating(src_dt, "convert", [&](auto stag) {
      using S = DTRAIN_ELEM_T(stag);
      dispatch_floating(dst_dt, "convert", [&](auto dtag) {
        using D = DTRAIN_ELEM_T(dtag);
        gather_kernel<S, D><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
            static_cast<const S*>(src), g, static_cast<D*>(dst), n);
      });
    });
  }
  check_launch("gather");
}

void scatter(DType dt, const void* src, void* dst, const Strided& g, int64_t n, void* stream) {
  if (n == 0) return;
  dispatch_any(dt, "scatter", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    scatter_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(static_cast<const T*>(src),
                                                                     static_cast<T*>(dst), g, n);
  });
  check_launch("scatter");
}

void unary(UnaryOp op, DType dt, const void* x, void* y, int64_t n, double alpha, double beta,
           void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "unary", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    switch (op) {
      case UnaryOp::kAffine:
        return launch_unary<T>(x, y, n, fn::Affine{alpha, beta}, stream);
      case UnaryOp::kExp:
        return launch_unary<T>(x, y, n, fn::Exp{}, stream);
      case UnaryOp::kLog:
        return launch_unary<T>(x, y, n, fn::Log{}, stream);
      case UnaryOp::kRelu:
        return launch_unary<T>(x, y, n, fn::ReluFwd{}, stream);
      case UnaryOp::kTanh:
        return launch_unary<T>(x, y, n, fn::TanhFwd{}, stream);
      case UnaryOp::kSigmoid:
        return launch_unary<T>(x, y, n, fn::SigmoidFwd{}, stream);
    }
  });
  check_launch("unary");
}

void activation_backward(ActivationBwd op, DType dt, const void* dy, const void* y, void* dx,
                         int64_t n, void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "activation backward", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    auto launch = [&](auto f) {
      activation_bwd_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
          static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), n, f);
    };
    switch (op) {
      case ActivationBwd::kRelu:
        return launch(fn::ReluBwd{});
      case ActivationBwd::kTanh:
        return launch(fn::TanhBwd{});
      case ActivationBwd::kSigmoid:
        return launch(fn::SigmoidBwd{});
    }
  });
  check_launch("activation backward");
}

void binary(BinaryOp op, DType dt, const void* a, const Strided& ga, const void* b,
            const Strided& gb, void* out, int64_t n, void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "binary", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    switch (op) {
      case BinaryOp::kAdd:
        return launch_binary<T>(a, ga, b, gb, out, n, fn::Add{}, stream);
      case BinaryOp::kSub:
        return launch_binary<T>(a, ga, b, gb, out, n, fn::Sub{}, stream);
      case BinaryOp::kMul:
        return launch_binary<T>(a, ga, b, gb, out, n, fn::Mul{}, stream);
      case BinaryOp::kDiv:
        return launch_binary<T>(a, ga, b, gb, out, n, fn::Div{}, stream);
    }
  });
  check_launch("binary");
}

void dropout(DType dt, const void* x, void* y, void* mask, int64_t n, const fn::DropoutMask& m,
             void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "dropout", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    dropout_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), static_cast<T*>(mask), n, m);
  });
  check_launch("dropout");
}

void embedding_forward(DType dt, const void* w, const int64_t* idx, int64_t n, int64_t d, int64_t v,
                       void* out, int64_t* bad, void* stream) {
  if (n * d == 0) return;
  dispatch_floating(dt, "embedding", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    embedding_fwd_kernel<T><<<grid_for(n * d), kBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(w), idx, n, d, v, static_cast<T*>(out), bad);
  });
  check_launch("embedding");
}

void embedding_backward(DType dt, const void* dy, const int64_t* idx, int64_t n, int64_t d,
                        int64_t v, void* dw, void* stream) {
  if (n * d == 0) return;
  auto launch = [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    embedding_bwd_kernel<T><<<grid_for(n * d), kBlock, 0, as_stream(stream)>>>(
        static_cast<const T*>(dy), idx, n, d, v, static_cast<T*>(dw));
  };
  if (dt == DType::f32) {
    launch(static_cast<float*>(nullptr));
  } else if (dt == DType::f64) {
    launch(static_cast<double*>(nullptr));
  } else {
    throw_unsupported_dtype("embedding backward (atomic accumulation)", dt);
  }
  check_launch("embedding backward");
}

void sgd_update(DType dt, void* p, const void* g, void* buf, int64_t n, const fn::SgdUpdate& u,
                void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "sgd", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    sgd_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
        static_cast<T*>(p), static_cast<const T*>(g), static_cast<T*>(buf), n, u);
  });
  check_launch("sgd update");
}

void adam_update(DType dt, void* p, const void* g, void* m, void* v, int64_t n,
                 const fn::AdamUpdate& u, void* stream) {
  if (n == 0) return;
  dispatch_floating(dt, "adam", [&](auto tag) {
    using T = DTRAIN_ELEM_T(tag);
    adam_kernel<T><<<grid_for(n), kBlock, 0, as_stream(stream)>>>(
        static_cast<T*>(p), static_cast<const T*>(g), static_cast<T*>(m), static_cast<T*>(v), n, u);
  });
  check_launch("adam update");
}

}  // namespace dtrain::cuda
