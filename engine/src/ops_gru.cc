// gru (ops_gru.h): one layer, batch_first, PyTorch's gate order (r, z, n).
//
// Layout: row-major buffers with rows in (b, t) order, G = 3H:
//   gates [B,T,G] (the activated r, z, n), ghn [B,T,H] (W_hn h_{t-1} + b_hn),
//   output [B,T,H]. The rows of one step t are a strided matrix (leading dimension
//   T * width), which BLAS takes directly.
//
// Forward:
//   gates = x @ W_ih^T                            one GEMM over all B*T rows
//   for t: gh = h_{t-1} @ W_hh^T                  one GEMM per step into a [B,G] scratch
//          GruCell per (b, j): adds both biases, activates r, z, n in place and
//          writes ghn and output at t
// Backward (saved buffers only read; undefined output gradients are zero):
//   dh = dh_n; for t = T-1 .. 0: dh += d_output[:,t]; per element
//     dn = dh (1 - z), dz = dh (h_prev - n), da_n = dn (1 - n^2),
//     da_r = da_n ghn r (1 - r), da_z = dz z (1 - z)
//     dgi = (da_r, da_z, da_n), dgh = (da_r, da_z, da_n r), dh <- dh z
//   then dh += dgh[:,t] @ W_hh                    one GEMM per step
//   dW_ih = dgi^T x, dW_hh = dgh^T h_prev, dx = dgi W_ih, db_ih / db_hh = column sums.
#include <cstring>
#include <vector>

#include "cpu/blas.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/ops_gru.h"

namespace dtrain {

namespace {

struct GruDims {
  int64_t B, T, I, H;
};

void check_bias(const Tensor& b, const char* name, int64_t g, DType dt) {
  if (!b.defined()) return;
  DTRAIN_CHECK(b.dim() == 1 && b.shape()[0] == g, ShapeError, "gru: expected {} [{}], got {}", name,
               g, shape_str(b.shape()));
  DTRAIN_CHECK(b.dtype() == dt, DTypeError, "gru: {} is {} but x is {}", name,
               dtype_name(b.dtype()), dtype_name(dt));
}

GruDims check_gru(const Tensor& x, const GruWeights& w, const Tensor& h0) {
  DTRAIN_CHECK(x.defined() && w.w_ih.defined() && w.w_hh.defined(), InvalidArgument,
               "gru: x, w_ih and w_hh must be defined");
  DTRAIN_CHECK(x.dim() == 3, ShapeError, "gru: expected x [B,T,I] (batch_first), got {}",
               shape_str(x.shape()));
  DTRAIN_CHECK(w.w_hh.dim() == 2 && w.w_hh.shape()[0] == 3 * w.w_hh.shape()[1], ShapeError,
               "gru: expected w_hh [3H,H], got {}", shape_str(w.w_hh.shape()));
  GruDims d{x.shape()[0], x.shape()[1], x.shape()[2], w.w_hh.shape()[1]};
  DTRAIN_CHECK(d.B > 0 && d.T > 0 && d.H > 0, ShapeError,
               "gru: expected x [B,T,I] with B, T >= 1 and H >= 1, got x {} and w_hh {}",
               shape_str(x.shape()), shape_str(w.w_hh.shape()));
  DTRAIN_CHECK(w.w_ih.dim() == 2 && w.w_ih.shape()[0] == 3 * d.H && w.w_ih.shape()[1] == d.I,
               ShapeError, "gru: expected w_ih [{},{}] for x {} and w_hh {}, got {}", 3 * d.H, d.I,
               shape_str(x.shape()), shape_str(w.w_hh.shape()), shape_str(w.w_ih.shape()));
  const DType dt = x.dtype();
  DTRAIN_CHECK(w.w_ih.dtype() == dt && w.w_hh.dtype() == dt, DTypeError,
               "gru: x is {} but w_ih is {} and w_hh is {}", dtype_name(dt),
               dtype_name(w.w_ih.dtype()), dtype_name(w.w_hh.dtype()));
  check_bias(w.b_ih, "b_ih", 3 * d.H, dt);
  check_bias(w.b_hh, "b_hh", 3 * d.H, dt);
  if (h0.defined()) {
    DTRAIN_CHECK(h0.dim() == 2 && h0.shape()[0] == d.B && h0.shape()[1] == d.H, ShapeError,
                 "gru: expected h0 [{},{}], got {}", d.B, d.H, shape_str(h0.shape()));
    DTRAIN_CHECK(h0.dtype() == dt, DTypeError, "gru: h0 is {} but x is {}", dtype_name(h0.dtype()),
                 dtype_name(dt));
  }
  for (const Tensor* t : {&x, &w.w_ih, &w.w_hh, &w.b_ih, &w.b_hh, &h0}) {
    DTRAIN_CHECK(!t->defined() || t->device().is_cpu(), UnsupportedError,
                 "gru on {}: the GRU op runs on the CPU only", t->device().str());
  }
  return d;
}

template <typename T>
const T* opt_data(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

Tensor opt_contiguous(const Tensor& t) { return t.defined() ? t.detach().contiguous() : t; }

// One (b, t) row. a: x W_ih^T (r, z, n), overwritten with the activated gates;
// gh: h_prev W_hh^T; bias: b_ih then b_hh (zeros when undefined), each [3H].
template <typename T>
void cell_forward_row(int64_t h, T* __restrict a, const T* __restrict gh, const T* __restrict bi,
                      const T* __restrict bh, const T* __restrict h_prev, T* __restrict ghn,
                      T* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const T r = fn::fast_sigmoid(a[j] + bi[j] + gh[j] + bh[j]);
    const T z = fn::fast_sigmoid(a[h + j] + bi[h + j] + gh[h + j] + bh[h + j]);
    const T hn = gh[2 * h + j] + bh[2 * h + j];
    const T n = fn::fast_tanh(a[2 * h + j] + bi[2 * h + j] + r * hn);
    a[j] = r;
    a[h + j] = z;
    a[2 * h + j] = n;
    ghn[j] = hn;
    out[j] = (T(1) - z) * n + z * h_prev[j];
  }
}

template <typename T>
void cell_backward_row(int64_t h, const T* __restrict a, const T* __restrict ghn,
                       const T* __restrict h_prev, T* __restrict dh, T* __restrict dgi,
                       T* __restrict dgh) {
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const T r = a[j], z = a[h + j], n = a[2 * h + j], g = dh[j];
    const T dan = g * (T(1) - z) * (T(1) - n * n);
    const T dar = dan * ghn[j] * r * (T(1) - r);
    const T daz = g * (h_prev[j] - n) * z * (T(1) - z);
    dgi[j] = dgh[j] = dar;
    dgi[h + j] = dgh[h + j] = daz;
    dgi[2 * h + j] = dan;
    dgh[2 * h + j] = dan * r;
    dh[j] = g * z;
  }
}

struct GruBuffers {
  Tensor gates, ghn, output;
};

struct GruSaved {
  GruDims d;
  Tensor x, w_ih, w_hh, h0;  // contiguous; h0 may be undefined
  GruBuffers buf;
  bool need_x = false, need_w_ih = false, need_w_hh = false, need_b_ih = false, need_b_hh = false,
       need_h0 = false;
};

// Row r's previous hidden state: h0 (or zeros) at t = 0, else output row r - 1.
template <typename T>
const T* prev_row(const GruDims& d, const T* out, const T* h0, const T* zeros, int64_t b,
                  int64_t t) {
  if (t > 0) return out + (b * d.T + t - 1) * d.H;
  return h0 ? h0 + b * d.H : zeros;
}

template <typename T>
void gru_forward_kernel(const GruDims& d, const T* x, const T* w_ih, const T* w_hh, const T* b_ih,
                        const T* b_hh, const T* h0, GruBuffers& buf) {
  const int64_t B = d.B, TT = d.T, I = d.I, H = d.H, G = 3 * H, rows = B * TT;
  T* gates = buf.gates.data<T>();
  T* ghn = buf.ghn.data<T>();
  T* out = buf.output.data<T>();
  std::vector<T> bi(static_cast<size_t>(G), T(0)), bh(static_cast<size_t>(G), T(0));
  if (b_ih) std::memcpy(bi.data(), b_ih, G * sizeof(T));
  if (b_hh) std::memcpy(bh.data(), b_hh, G * sizeof(T));
  if (I > 0) {
    cpu::gemm(false, true, rows, G, I, T(1), x, I, w_ih, I, T(0), gates, G);
  } else {
    buf.gates.zero_();
  }
  std::vector<T> zeros(static_cast<size_t>(H), T(0)), gh(static_cast<size_t>(B * G), T(0));
  for (int64_t t = 0; t < TT; ++t) {
    if (t > 0 || h0) {
      const T* hp = t == 0 ? h0 : out + (t - 1) * H;
      cpu::gemm(false, true, B, G, H, T(1), hp, t == 0 ? H : TT * H, w_hh, H, T(0), gh.data(), G);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = b * TT + t;
      cell_forward_row(H, gates + r * G, gh.data() + b * G, bi.data(), bh.data(),
                       prev_row(d, out, h0, zeros.data(), b, t), ghn + r * H, out + r * H);
    }
  }
}

struct GruGrads {
  Tensor dx, dw_ih, dw_hh, db_ih, db_hh, dh0;
};

template <typename T>
Tensor column_sums(const T* m, int64_t rows, int64_t cols, const TensorOptions& opts) {
  std::vector<double> acc(static_cast<size_t>(cols), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) acc[static_cast<size_t>(k)] += m[r * cols + k];
  }
  Tensor s = empty({cols}, opts);
  for (int64_t k = 0; k < cols; ++k) s.data<T>()[k] = static_cast<T>(acc[static_cast<size_t>(k)]);
  return s;
}

// The weight gradients after the recurrence: one GEMM each over all B*T rows.
template <typename T>
void gru_weight_grads(const GruSaved& s, const T* dgi, const T* dgh, GruGrads& g) {
  const GruDims& d = s.d;
  const int64_t TT = d.T, I = d.I, H = d.H, G = 3 * H, rows = d.B * TT;
  const TensorOptions opts = s.x.options();
  const T* out = s.buf.output.data<T>();
  const T* h0 = opt_data<T>(s.h0);
  if (s.need_w_ih) {
    g.dw_ih = empty({G, I}, opts);
    cpu::gemm(true, false, G, I, rows, T(1), dgi, G, s.x.data<T>(), I, T(0), g.dw_ih.data<T>(), I);
  }
  if (s.need_w_hh) {
    Tensor hp_t = zeros({rows, H}, opts);
    T* hp = hp_t.data<T>();
    for (int64_t b = 0; b < d.B; ++b) {
      if (h0) std::memcpy(hp + b * TT * H, h0 + b * H, H * sizeof(T));
      std::memcpy(hp + (b * TT + 1) * H, out + b * TT * H, (TT - 1) * H * sizeof(T));
    }
    g.dw_hh = empty({G, H}, opts);
    cpu::gemm(true, false, G, H, rows, T(1), dgh, G, hp, H, T(0), g.dw_hh.data<T>(), H);
  }
  if (s.need_x) {
    g.dx = empty({d.B, TT, I}, opts);
    cpu::gemm(false, false, rows, I, G, T(1), dgi, G, s.w_ih.data<T>(), I, T(0), g.dx.data<T>(), I);
  }
  if (s.need_b_ih) g.db_ih = column_sums(dgi, rows, G, opts);
  if (s.need_b_hh) g.db_hh = column_sums(dgh, rows, G, opts);
}

template <typename T>
void gru_backward_kernel(const GruSaved& s, const T* d_out, const T* d_hn, GruGrads& g) {
  const GruDims& d = s.d;
  const int64_t B = d.B, TT = d.T, H = d.H, G = 3 * H;
  const TensorOptions opts = s.x.options();
  const T* gates = s.buf.gates.data<T>();
  const T* ghn = s.buf.ghn.data<T>();
  const T* out = s.buf.output.data<T>();
  const T* h0 = opt_data<T>(s.h0);
  Tensor dgi_t = empty({B, TT, G}, opts), dgh_t = empty({B, TT, G}, opts);
  T* dgi = dgi_t.data<T>();
  T* dgh = dgh_t.data<T>();
  const size_t bh = static_cast<size_t>(B * H);
  std::vector<T> dh(bh, T(0)), zeros(static_cast<size_t>(H), T(0));
  if (d_hn) std::memcpy(dh.data(), d_hn, bh * sizeof(T));
  for (int64_t t = TT; t-- > 0;) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = b * TT + t;
      T* dhb = dh.data() + b * H;
      if (d_out) {
        for (int64_t j = 0; j < H; ++j) dhb[j] += d_out[r * H + j];
      }
      cell_backward_row(H, gates + r * G, ghn + r * H, prev_row(d, out, h0, zeros.data(), b, t),
                        dhb, dgi + r * G, dgh + r * G);
    }
    if (t > 0 || s.need_h0) {
      cpu::gemm(false, false, B, H, G, T(1), dgh + t * G, TT * G, s.w_hh.data<T>(), H, T(1),
                dh.data(), H);
    }
  }
  if (s.need_h0) {
    g.dh0 = empty({B, H}, opts);
    std::memcpy(g.dh0.data<T>(), dh.data(), bh * sizeof(T));
  }
  gru_weight_grads(s, dgi, dgh, g);
}

Tensor last_step(const Tensor& seq, const GruDims& d) {
  const Tensor v = seq.select(1, d.T - 1);
  return v.is_contiguous() ? v.clone() : v.contiguous();  // never a view of the output
}

std::vector<Tensor> gru_backward(const GruSaved& s, const std::vector<Tensor>& g) {
  if (!g[0].defined() && !g[1].defined()) return std::vector<Tensor>(6);
  Tensor d_out = g[0].defined() ? g[0].contiguous() : Tensor();
  Tensor d_hn = g[1].defined() ? g[1].contiguous() : Tensor();
  GruGrads gr;
  DTRAIN_DISPATCH_FLOAT(s.x.dtype(), "gru backward", [&] {
    gru_backward_kernel<scalar_t>(s, opt_data<scalar_t>(d_out), opt_data<scalar_t>(d_hn), gr);
  });
  return {gr.dx, gr.dw_ih, gr.dw_hh, gr.db_ih, gr.db_hh, gr.dh0};
}

}  // namespace

GruResult gru(const Tensor& x, const GruWeights& w, const Tensor& h0) {
  const GruDims d = check_gru(x, w, h0);
  auto s = std::make_shared<GruSaved>();
  s->d = d;
  s->x = x.detach().contiguous();
  s->w_ih = w.w_ih.detach().contiguous();
  s->w_hh = w.w_hh.detach().contiguous();
  s->h0 = opt_contiguous(h0);
  const Tensor b_ih = opt_contiguous(w.b_ih), b_hh = opt_contiguous(w.b_hh);
  const TensorOptions opts = x.options();
  s->buf = {empty({d.B, d.T, 3 * d.H}, opts), empty({d.B, d.T, d.H}, opts),
            empty({d.B, d.T, d.H}, opts)};
  DTRAIN_DISPATCH_FLOAT(x.dtype(), "gru", [&] {
    gru_forward_kernel<scalar_t>(d, s->x.data<scalar_t>(), s->w_ih.data<scalar_t>(),
                                 s->w_hh.data<scalar_t>(), opt_data<scalar_t>(b_ih),
                                 opt_data<scalar_t>(b_hh), opt_data<scalar_t>(s->h0), s->buf);
  });
  GruResult result{s->buf.output, last_step(s->buf.output, d)};
  const std::vector<Tensor> inputs{x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, h0};
  if (!any_requires_grad(inputs)) return result;
  auto needs = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
  s->need_x = needs(x);
  s->need_w_ih = needs(w.w_ih);
  s->need_w_hh = needs(w.w_hh);
  s->need_b_ih = needs(w.b_ih);
  s->need_b_hh = needs(w.b_hh);
  s->need_h0 = needs(h0);
  std::vector<Tensor> outs =
      make_function("gru", inputs, {result.output, result.h_n},
                    [s](const std::vector<Tensor>& g) { return gru_backward(*s, g); });
  return {outs[0], outs[1]};
}

}  // namespace dtrain
