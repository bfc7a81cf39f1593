// Reference LSTM in double (see lstm_ref.h). Written for clarity: one (batch, step)
// cell at a time, explicit dot products, no shared code with the fast kernel.
#include "lstm_ref.h"

#include <cmath>
#include <vector>

namespace dtrain::cpu {

namespace {

using Vec = std::vector<double>;

Vec values_or_zeros(const Tensor& t, int64_t n) {
  if (!t.defined()) return Vec(static_cast<size_t>(n), 0.0);
  return t.contiguous().to_vector<double>();
}

double sigmoid_ref(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// The forward pass, keeping everything backpropagation needs.
struct Trace {
  int64_t B = 0, T = 0, I = 0, H = 0;
  Vec x, w_ih, w_hh, bias, h0, c0;
  Vec gates;  // activated i, f, g, o per (b, t): [B,T,4H]
  Vec c, h;   // [B,T,H]

  size_t bt(int64_t b, int64_t t) const { return static_cast<size_t>(b * T + t); }
  const double* h_prev(int64_t b, int64_t t) const {
    return t == 0 ? h0.data() + b * H : h.data() + bt(b, t - 1) * H;
  }
  const double* c_prev(int64_t b, int64_t t) const {
    return t == 0 ? c0.data() + b * H : c.data() + bt(b, t - 1) * H;
  }
};

Trace run_forward(const Tensor& x, const LstmWeights& w, const Tensor& h0, const Tensor& c0) {
  Trace r;
  r.B = x.shape()[0];
  r.T = x.shape()[1];
  r.I = x.shape()[2];
  r.H = w.w_hh.shape()[1];
  const int64_t B = r.B, T = r.T, I = r.I, H = r.H, G = 4 * H;
  r.x = x.contiguous().to_vector<double>();
  r.w_ih = w.w_ih.contiguous().to_vector<double>();
  r.w_hh = w.w_hh.contiguous().to_vector<double>();
  Vec b_ih = values_or_zeros(w.b_ih, G), b_hh = values_or_zeros(w.b_hh, G);
  r.bias.resize(static_cast<size_t>(G));
  for (size_t k = 0; k < r.bias.size(); ++k) r.bias[k] = b_ih[k] + b_hh[k];
  r.h0 = values_or_zeros(h0, B * H);
  r.c0 = values_or_zeros(c0, B * H);
  r.gates.assign(static_cast<size_t>(B * T * G), 0.0);
  r.c.assign(static_cast<size_t>(B * T * H), 0.0);
  r.h.assign(static_cast<size_t>(B * T * H), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      const double* xt = r.x.data() + r.bt(b, t) * I;
      const double* hp = r.h_prev(b, t);
      const double* cp = r.c_prev(b, t);
      double* a = r.gates.data() + r.bt(b, t) * G;
      for (int64_t k = 0; k < G; ++k) {
        double acc = r.bias[static_cast<size_t>(k)];
        for (int64_t i = 0; i < I; ++i) acc += r.w_ih[static_cast<size_t>(k * I + i)] * xt[i];
        for (int64_t j = 0; j < H; ++j) acc += r.w_hh[static_cast<size_t>(k * H + j)] * hp[j];
        a[k] = (k >= 2 * H && k < 3 * H) ? std::tanh(acc) : sigmoid_ref(acc);
      }
      for (int64_t j = 0; j < H; ++j) {
        double ig = a[j], fg = a[H + j], gg = a[2 * H + j], og = a[3 * H + j];
        double cv = fg * cp[j] + ig * gg;
        r.c[r.bt(b, t) * H + j] = cv;
        r.h[r.bt(b, t) * H + j] = og * std::tanh(cv);
      }
    }
  }
  return r;
}

}  // namespace

LstmResult lstm_reference_forward(const Tensor& x, const LstmWeights& w, const Tensor& h0,
                                  const Tensor& c0) {
  Trace r = run_forward(x, w, h0, c0);
  const int64_t B = r.B, T = r.T, H = r.H;
  Vec hn(static_cast<size_t>(B * H)), cn(static_cast<size_t>(B * H));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      hn[static_cast<size_t>(b * H + j)] = T > 0 ? r.h[r.bt(b, T - 1) * H + j] : r.h0[b * H + j];
      cn[static_cast<size_t>(b * H + j)] = T > 0 ? r.c[r.bt(b, T - 1) * H + j] : r.c0[b * H + j];
    }
  }
  return {from_vector<double>(r.h, {B, T, H}), from_vector<double>(hn, {B, H}),
          from_vector<double>(cn, {B, H})};
}

LstmReferenceGrads lstm_reference_backward(const Tensor& x, const LstmWeights& w, const Tensor& h0,
                                           const Tensor& c0, const Tensor& d_output,
                                           const Tensor& d_hn, const Tensor& d_cn) {
  Trace r = run_forward(x, w, h0, c0);
  const int64_t B = r.B, T = r.T, I = r.I, H = r.H, G = 4 * H;
  Vec dout = values_or_zeros(d_output, B * T * H);
  Vec dh = values_or_zeros(d_hn, B * H), dc = values_or_zeros(d_cn, B * H);
  Vec dx(static_cast<size_t>(B * T * I), 0.0), dw_ih(static_cast<size_t>(G * I), 0.0),
      dw_hh(static_cast<size_t>(G * H), 0.0), db(static_cast<size_t>(G), 0.0);
  Vec da(static_cast<size_t>(G));
  for (int64_t t = T; t-- > 0;) {
    for (int64_t b = 0; b < B; ++b) {
      const double* a = r.gates.data() + r.bt(b, t) * G;
      const double* cp = r.c_prev(b, t);
      const double* hp = r.h_prev(b, t);
      const double* xt = r.x.data() + r.bt(b, t) * I;
      double* dhb = dh.data() + static_cast<size_t>(b * H);
      double* dcb = dc.data() + static_cast<size_t>(b * H);
      for (int64_t j = 0; j < H; ++j) {
        double ig = a[j], fg = a[H + j], gg = a[2 * H + j], og = a[3 * H + j];
        double tc = std::tanh(r.c[r.bt(b, t) * H + j]);
        double dht = dhb[j] + dout[r.bt(b, t) * H + j];
        double dct = dcb[j] + dht * og * (1.0 - tc * tc);
        da[static_cast<size_t>(j)] = dct * gg * ig * (1.0 - ig);
        da[static_cast<size_t>(H + j)] = dct * cp[j] * fg * (1.0 - fg);
        da[static_cast<size_t>(2 * H + j)] = dct * ig * (1.0 - gg * gg);
        da[static_cast<size_t>(3 * H + j)] = dht * tc * og * (1.0 - og);
        dcb[j] = dct * fg;
      }
      for (int64_t k = 0; k < G; ++k) {
        double dk = da[static_cast<size_t>(k)];
        db[static_cast<size_t>(k)] += dk;
        for (int64_t i = 0; i < I; ++i) dw_ih[static_cast<size_t>(k * I + i)] += dk * xt[i];
        for (int64_t j = 0; j < H; ++j) dw_hh[static_cast<size_t>(k * H + j)] += dk * hp[j];
      }
      for (int64_t i = 0; i < I; ++i) {
        double acc = 0;
        for (int64_t k = 0; k < G; ++k) {
          acc += da[static_cast<size_t>(k)] * r.w_ih[static_cast<size_t>(k * I + i)];
        }
        dx[r.bt(b, t) * I + i] = acc;
      }
      for (int64_t j = 0; j < H; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < G; ++k) {
          acc += da[static_cast<size_t>(k)] * r.w_hh[static_cast<size_t>(k * H + j)];
        }
        dhb[j] = acc;  // the gradient reaching h_{t-1} of this row
      }
    }
  }
  LstmReferenceGrads g;
  g.dx = from_vector<double>(dx, {B, T, I});
  g.dh0 = from_vector<double>(dh, {B, H});
  g.dc0 = from_vector<double>(dc, {B, H});
  g.dw_ih = from_vector<double>(dw_ih, {G, I});
  g.dw_hh = from_vector<double>(dw_hh, {G, H});
  g.db_ih = from_vector<double>(db, {G});
  g.db_hh = from_vector<double>(db, {G});
  return g;
}

}  // namespace dtrain::cpu
