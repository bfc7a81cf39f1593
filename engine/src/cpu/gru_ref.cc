// Reference GRU in double (see gru_ref.h): one (batch, step) cell at a time.
#include "gru_ref.h"

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

// Row k of W [rows, n] dotted with v [n].
double dot_row(const Vec& w, int64_t k, const double* v, int64_t n) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += w[static_cast<size_t>(k * n + j)] * v[j];
  return s;
}

}  // namespace

GruResult gru_reference_forward(const Tensor& x, const GruWeights& w, const Tensor& h0) {
  const int64_t B = x.shape()[0], T = x.shape()[1], I = x.shape()[2], H = w.w_hh.shape()[1];
  const Vec xv = x.contiguous().to_vector<double>();
  const Vec wi = w.w_ih.contiguous().to_vector<double>();
  const Vec wh = w.w_hh.contiguous().to_vector<double>();
  const Vec bi = values_or_zeros(w.b_ih, 3 * H), bh = values_or_zeros(w.b_hh, 3 * H);
  Vec h = values_or_zeros(h0, B * H);
  Vec out(static_cast<size_t>(B * T * H), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    double* hb = h.data() + b * H;
    for (int64_t t = 0; t < T; ++t) {
      const double* xt = xv.data() + (b * T + t) * I;
      Vec next(static_cast<size_t>(H));
      for (int64_t j = 0; j < H; ++j) {
        auto pre = [&](int64_t gate, bool input) {
          const int64_t k = gate * H + j;
          return input ? dot_row(wi, k, xt, I) + bi[static_cast<size_t>(k)]
                       : dot_row(wh, k, hb, H) + bh[static_cast<size_t>(k)];
        };
        const double r = sigmoid_ref(pre(0, true) + pre(0, false));
        const double z = sigmoid_ref(pre(1, true) + pre(1, false));
        const double n = std::tanh(pre(2, true) + r * pre(2, false));
        next[static_cast<size_t>(j)] = (1 - z) * n + z * hb[j];
      }
      for (int64_t j = 0; j < H; ++j) {
        hb[j] = next[static_cast<size_t>(j)];
        out[static_cast<size_t>((b * T + t) * H + j)] = hb[j];
      }
    }
  }
  return {from_vector<double>(out, {B, T, H}), from_vector<double>(h, {B, H})};
}

}  // namespace dtrain::cpu
