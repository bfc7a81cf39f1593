// lstm: one layer, batch_first, PyTorch's gate order (i, f, g, o) and equations, so
// weights exported from torch.nn.LSTM give the same numbers.
//
// Layout: every buffer is row-major with rows in (b, t) order, G = 4H:
//   gates [B,T,G], cell [B,T,H], tanh_c [B,T,H], output [B,T,H].
// The rows of one time step t are a strided matrix (row b at (b*T + t) * width), which
// BLAS takes directly through its leading dimension: no transposes, no copies.
//
// Forward:
//   gates = x[B*T,I] @ W_ih^T                     one GEMM for all time steps
//   for t: gates[:,t] += h_{t-1} @ W_hh^T         one GEMM per step (lda/ldc = T*width,
//                                                 beta = 1; h_{t-1} is output[:,t-1])
//          gates[:,t] += b_ih + b_hh, then        one vectorised pass per row: adds the
//          fn::LstmCellFwd on gates[:,t]          bias, activates the gates in place and
//                                                 writes cell, tanh_c and output at t
//   h_n = output[:,T-1], c_n = cell[:,T-1]        (copies)
//
// Backward (the saved buffers are only read, so a second backward gives the same
// result); undefined output gradients count as zero:
//   dh = dh_n, dc = dc_n
//   for t = T-1 .. 0: fn::LstmCellBwd with dh + d_output[:,t] -> dgates[:,t], dc -> dc_{t-1}
//                     dh = dgates[:,t] @ W_hh     one GEMM per step
//   dW_ih = dgates^T @ x,  dW_hh = dgates^T @ h_prev,  dx = dgates @ W_ih   (one GEMM each,
//   over all B*T rows; h_prev [B*T,H] stacks h0 and output shifted by one step)
//   db_ih = db_hh = column sums of dgates;  dh0 = dh, dc0 = dc.
// Only the gradients of inputs that require grad are computed. The plain reference in
// cpu/lstm_ref.h is the test oracle. f32 and f64 (f64 for gradient checks).
#include <cstring>
#include <vector>

#include "cpu/blas.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

struct LstmDims {
  int64_t B, T, I, H;
};

void check_state(const Tensor& s, const char* name, const LstmDims& d, DType dt) {
  if (!s.defined()) return;
  DTRAIN_CHECK(s.dim() == 2 && s.shape()[0] == d.B && s.shape()[1] == d.H, ShapeError,
               "lstm: expected {} [{},{}], got {}", name, d.B, d.H, shape_str(s.shape()));
  DTRAIN_CHECK(s.dtype() == dt, DTypeError, "lstm: {} is {} but x is {}", name,
               dtype_name(s.dtype()), dtype_name(dt));
}

LstmDims check_lstm(const Tensor& x, const LstmWeights& w, const Tensor& h0, const Tensor& c0) {
  DTRAIN_CHECK(x.defined() && w.w_ih.defined() && w.w_hh.defined(), InvalidArgument,
               "lstm: x, w_ih and w_hh must be defined");
  DTRAIN_CHECK(x.dim() == 3, ShapeError, "lstm: expected x [B,T,I] (batch_first), got {}",
               shape_str(x.shape()));
  DTRAIN_CHECK(w.w_hh.dim() == 2 && w.w_hh.shape()[0] == 4 * w.w_hh.shape()[1], ShapeError,
               "lstm: expected w_hh [4H,H], got {}", shape_str(w.w_hh.shape()));
  LstmDims d{x.shape()[0], x.shape()[1], x.shape()[2], w.w_hh.shape()[1]};
  DTRAIN_CHECK(d.B > 0 && d.T > 0, ShapeError,
               "lstm: expected x [B,T,I] with B >= 1 and T >= 1, got {}", shape_str(x.shape()));
  DTRAIN_CHECK(w.w_ih.dim() == 2 && w.w_ih.shape()[0] == 4 * d.H && w.w_ih.shape()[1] == d.I,
               ShapeError, "lstm: expected w_ih [{},{}] for x {} and w_hh {}, got {}", 4 * d.H, d.I,
               shape_str(x.shape()), shape_str(w.w_hh.shape()), shape_str(w.w_ih.shape()));
  const DType dt = x.dtype();
  DTRAIN_CHECK(w.w_ih.dtype() == dt && w.w_hh.dtype() == dt, DTypeError,
               "lstm: x is {} but w_ih is {} and w_hh is {}", dtype_name(dt),
               dtype_name(w.w_ih.dtype()), dtype_name(w.w_hh.dtype()));
  for (const auto& [b, name] : {std::pair{&w.b_ih, "b_ih"}, std::pair{&w.b_hh, "b_hh"}}) {
    if (!b->defined()) continue;
    DTRAIN_CHECK(b->dim() == 1 && b->shape()[0] == 4 * d.H, ShapeError,
                 "lstm: expected {} [{}], got {}", name, 4 * d.H, shape_str(b->shape()));
    DTRAIN_CHECK(b->dtype() == dt, DTypeError, "lstm: {} is {} but x is {}", name,
                 dtype_name(b->dtype()), dtype_name(dt));
  }
  check_state(h0, "h0", d, dt);
  check_state(c0, "c0", d, dt);
  return d;
}

// Contiguous data of an optional tensor (nullptr when undefined).
template <typename T>
const T* opt_data(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

Tensor opt_contiguous(const Tensor& t) { return t.defined() ? t.detach().contiguous() : t; }

// One (b, t) row: adds the summed bias to the pre-activations, then the cell.
template <typename T>
void cell_forward_row(int64_t h, T* __restrict a, const T* __restrict bias,
                      const T* __restrict c_prev, T* __restrict c, T* __restrict tc,
                      T* __restrict out) {
  T* __restrict ai = a;
  T* __restrict af = a + h;
  T* __restrict ag = a + 2 * h;
  T* __restrict ao = a + 3 * h;
  const fn::LstmCellFwd cell;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    ai[j] += bias[j];
    af[j] += bias[h + j];
    ag[j] += bias[2 * h + j];
    ao[j] += bias[3 * h + j];
    cell(ai[j], af[j], ag[j], ao[j], c_prev[j], c[j], tc[j], out[j]);
  }
}

template <typename T>
void cell_backward_row(int64_t h, const T* __restrict a, const T* __restrict c_prev,
                       const T* __restrict tc, const T* __restrict dh, T* __restrict dc,
                       T* __restrict da) {
  const T* __restrict ai = a;
  const T* __restrict af = a + h;
  const T* __restrict ag = a + 2 * h;
  const T* __restrict ao = a + 3 * h;
  T* __restrict dai = da;
  T* __restrict daf = da + h;
  T* __restrict dag = da + 2 * h;
  T* __restrict dao = da + 3 * h;
  const fn::LstmCellBwd cell;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    cell(ai[j], af[j], ag[j], ao[j], c_prev[j], tc[j], dh[j], dc[j], dai[j], daf[j], dag[j],
         dao[j]);
  }
}

// Buffers of one forward pass (all contiguous, same dtype).
struct LstmBuffers {
  Tensor gates, cell, tanh_c, output;
};

template <typename T>
void lstm_forward_kernel(const LstmDims& d, const T* x, const T* w_ih, const T* w_hh, const T* b_ih,
                         const T* b_hh, const T* h0, const T* c0, LstmBuffers& buf) {
  const int64_t B = d.B, TT = d.T, I = d.I, H = d.H, G = 4 * H, rows = B * TT;
  T* gates = buf.gates.data<T>();
  T* cell = buf.cell.data<T>();
  T* tanh_c = buf.tanh_c.data<T>();
  T* out = buf.output.data<T>();
  std::vector<T> bias(static_cast<size_t>(G), T(0));
  for (int64_t k = 0; k < G; ++k) bias[k] = (b_ih ? b_ih[k] : T(0)) + (b_hh ? b_hh[k] : T(0));
  if (I > 0) {
    cpu::gemm(false, true, rows, G, I, T(1), x, I, w_ih, I, T(0), gates, G);
  } else {
    buf.gates.zero_();
  }
  std::vector<T> zeros(static_cast<size_t>(H), T(0));
  for (int64_t t = 0; t < TT; ++t) {
    const T* h_prev = t == 0 ? h0 : out + (t - 1) * H;
    if (h_prev != nullptr && H > 0) {
      cpu::gemm(false, true, B, G, H, T(1), h_prev, t == 0 ? H : TT * H, w_hh, H, T(1),
                gates + t * G, TT * G);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = b * TT + t;
      const T* c_prev = t > 0 ? cell + (r - 1) * H : (c0 ? c0 + b * H : zeros.data());
      cell_forward_row(H, gates + r * G, bias.data(), c_prev, cell + r * H, tanh_c + r * H,
                       out + r * H);
    }
  }
}

// What backward needs, captured by the autograd node.
struct LstmSaved {
  LstmDims d;
  Tensor x, w_ih, w_hh, h0, c0;  // contiguous; h0/c0 may be undefined
  LstmBuffers buf;
  bool need_x, need_w_ih, need_w_hh, need_b_ih, need_b_hh, need_h0, need_c0;
};

struct LstmGrads {
  Tensor dx, dw_ih, dw_hh, db_ih, db_hh, dh0, dc0;
};

template <typename T>
void lstm_backward_kernel(const LstmSaved& s, const T* d_out, const T* d_hn, const T* d_cn,
                          LstmGrads& g) {
  const LstmDims& d = s.d;
  const int64_t B = d.B, TT = d.T, I = d.I, H = d.H, G = 4 * H, rows = B * TT;
  const TensorOptions opts = s.x.options();
  const T* gates = s.buf.gates.data<T>();
  const T* cell = s.buf.cell.data<T>();
  const T* tanh_c = s.buf.tanh_c.data<T>();
  const T* out = s.buf.output.data<T>();
  const T* x = s.x.data<T>();
  const T* w_ih = s.w_ih.data<T>();
  const T* w_hh = s.w_hh.data<T>();
  const T* h0 = opt_data<T>(s.h0);
  const T* c0 = opt_data<T>(s.c0);

  Tensor dgates_t = empty({B, TT, G}, opts);
  T* dgates = dgates_t.data<T>();
  const size_t bh = static_cast<size_t>(B * H);
  std::vector<T> dh(bh, T(0)), dc(bh, T(0)), zeros(static_cast<size_t>(H), T(0));
  if (d_hn) std::memcpy(dh.data(), d_hn, bh * sizeof(T));
  if (d_cn) std::memcpy(dc.data(), d_cn, bh * sizeof(T));
  for (int64_t t = TT; t-- > 0;) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r = b * TT + t;
      T* dhb = dh.data() + b * H;
      if (d_out) {
        const T* __restrict src = d_out + r * H;
        for (int64_t j = 0; j < H; ++j) dhb[j] += src[j];
      }
      const T* c_prev = t > 0 ? cell + (r - 1) * H : (c0 ? c0 + b * H : zeros.data());
      cell_backward_row(H, gates + r * G, c_prev, tanh_c + r * H, dhb, dc.data() + b * H,
                        dgates + r * G);
    }
    if ((t > 0 || s.need_h0) && H > 0) {
      cpu::gemm(false, false, B, H, G, T(1), dgates + t * G, TT * G, w_hh, H, T(0), dh.data(), H);
    }
  }
  if (s.need_h0) {
    g.dh0 = empty({B, H}, opts);
    std::memcpy(g.dh0.data<T>(), dh.data(), bh * sizeof(T));
  }
  if (s.need_c0) {
    g.dc0 = empty({B, H}, opts);
    std::memcpy(g.dc0.data<T>(), dc.data(), bh * sizeof(T));
  }
  if (s.need_w_ih) {
    g.dw_ih = empty({G, I}, opts);
    cpu::gemm(true, false, G, I, rows, T(1), dgates, G, x, I, T(0), g.dw_ih.data<T>(), I);
  }
  if (s.need_w_hh) {
    // h_prev rows: (b, 0) <- h0[b] (or zeros), (b, t>0) <- output[b, t-1].
    Tensor h_prev_t = empty({rows, H}, opts);
    T* h_prev = h_prev_t.data<T>();
    for (int64_t b = 0; b < B; ++b) {
      T* dst = h_prev + b * TT * H;
      std::memcpy(dst, h0 ? h0 + b * H : zeros.data(), H * sizeof(T));
      std::memcpy(dst + H, out + b * TT * H, (TT - 1) * H * sizeof(T));
    }
    g.dw_hh = empty({G, H}, opts);
    cpu::gemm(true, false, G, H, rows, T(1), dgates, G, h_prev, H, T(0), g.dw_hh.data<T>(), H);
  }
  if (s.need_x) {
    g.dx = empty({B, TT, I}, opts);
    cpu::gemm(false, false, rows, I, G, T(1), dgates, G, w_ih, I, T(0), g.dx.data<T>(), I);
  }
  if (s.need_b_ih || s.need_b_hh) {
    std::vector<double> acc(static_cast<size_t>(G), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict src = dgates + r * G;
      double* __restrict dst = acc.data();
      for (int64_t k = 0; k < G; ++k) dst[k] += static_cast<double>(src[k]);
    }
    Tensor db = empty({G}, opts);
    T* pdb = db.data<T>();
    for (int64_t k = 0; k < G; ++k) pdb[k] = static_cast<T>(acc[static_cast<size_t>(k)]);
    if (s.need_b_ih) g.db_ih = db;
    if (s.need_b_hh) g.db_hh = s.need_b_ih ? db.clone() : db;
  }
}

// Copies row t = T-1 of a [B,T,H] buffer into a new [B,H] tensor.
Tensor last_step(const Tensor& seq, const LstmDims& d) {
  Tensor r = empty({d.B, d.H}, seq.options());
  const size_t row = static_cast<size_t>(d.H) * dtype_size(seq.dtype());
  const char* src = static_cast<const char*>(seq.raw_data());
  char* dst = static_cast<char*>(r.raw_data());
  for (int64_t b = 0; b < d.B; ++b) {
    std::memcpy(dst + static_cast<size_t>(b) * row,
                src + static_cast<size_t>(b * d.T + d.T - 1) * row, row);
  }
  return r;
}

}  // namespace

LstmResult lstm(const Tensor& x, const LstmWeights& w, const Tensor& h0, const Tensor& c0) {
  const LstmDims d = check_lstm(x, w, h0, c0);
#ifdef DTRAIN_WITH_CUDA
  if (x.device().is_cuda() || w.w_ih.device().is_cuda()) {  // cuDNN (cuda/cudnn_ops.cc)
    cuda::LstmForward f = cuda::lstm_forward(x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, h0, c0);
    const std::vector<Tensor> inputs{x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, h0, c0};
    if (!any_requires_grad(inputs)) return {f.output, f.h_n, f.c_n};
    std::shared_ptr<cuda::LstmState> state = f.state;
    std::vector<Tensor> outs = make_function(
        "lstm", inputs, {f.output, f.h_n, f.c_n}, [state](const std::vector<Tensor>& g) {
          if (!g[0].defined() && !g[1].defined() && !g[2].defined()) {
            return std::vector<Tensor>(7);
          }
          return cuda::lstm_backward(*state, g[0], g[1], g[2]);
        });
    return {outs[0], outs[1], outs[2]};
  }
#else
  DTRAIN_CHECK(x.device().is_cpu(), UnsupportedError, "lstm on {}: no CUDA backend",
               x.device().str());
#endif
  auto s = std::make_shared<LstmSaved>();
  s->d = d;
  s->x = x.detach().contiguous();
  s->w_ih = w.w_ih.detach().contiguous();
  s->w_hh = w.w_hh.detach().contiguous();
  s->h0 = opt_contiguous(h0);
  s->c0 = opt_contiguous(c0);
  Tensor b_ih = opt_contiguous(w.b_ih), b_hh = opt_contiguous(w.b_hh);
  const TensorOptions opts = x.options();
  s->buf = {empty({d.B, d.T, 4 * d.H}, opts), empty({d.B, d.T, d.H}, opts),
            empty({d.B, d.T, d.H}, opts), empty({d.B, d.T, d.H}, opts)};
  DTRAIN_DISPATCH_FLOAT(x.dtype(), "lstm", [&] {
    lstm_forward_kernel<scalar_t>(d, s->x.data<scalar_t>(), s->w_ih.data<scalar_t>(),
                                  s->w_hh.data<scalar_t>(), opt_data<scalar_t>(b_ih),
                                  opt_data<scalar_t>(b_hh), opt_data<scalar_t>(s->h0),
                                  opt_data<scalar_t>(s->c0), s->buf);
  });
  LstmResult result{s->buf.output, last_step(s->buf.output, d), last_step(s->buf.cell, d)};
  const std::vector<Tensor> inputs{x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, h0, c0};
  if (!any_requires_grad(inputs)) return result;
  auto needs = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
  s->need_x = needs(x);
  s->need_w_ih = needs(w.w_ih);
  s->need_w_hh = needs(w.w_hh);
  s->need_b_ih = needs(w.b_ih);
  s->need_b_hh = needs(w.b_hh);
  s->need_h0 = needs(h0);
  s->need_c0 = needs(c0);
  std::vector<Tensor> outs = make_function(
      "lstm", inputs, {result.output, result.h_n, result.c_n}, [s](const std::vector<Tensor>& g) {
        if (!g[0].defined() && !g[1].defined() && !g[2].defined()) {
          return std::vector<Tensor>(7);
        }
        Tensor d_out = g[0].defined() ? g[0].contiguous() : Tensor();
        Tensor d_hn = g[1].defined() ? g[1].contiguous() : Tensor();
        Tensor d_cn = g[2].defined() ? g[2].contiguous() : Tensor();
        LstmGrads gr;
        DTRAIN_DISPATCH_FLOAT(s->x.dtype(), "lstm backward", [&] {
          lstm_backward_kernel<scalar_t>(*s, opt_data<scalar_t>(d_out), opt_data<scalar_t>(d_hn),
                                         opt_data<scalar_t>(d_cn), gr);
        });
        return std::vector<Tensor>{gr.dx, gr.dw_ih, gr.dw_hh, gr.db_ih, gr.db_hh, gr.dh0, gr.dc0};
      });
  return {outs[0], outs[1], outs[2]};
}

}  // namespace dtrain
