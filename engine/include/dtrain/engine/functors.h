// Kernel arithmetic shared by the CPU and CUDA backends.
//
// Each functor is a tiny struct with a DTRAIN_HD call operator. The CPU kernels call
// them in their loops; the CUDA kernels (engine/src/cuda/*.cu) call the very same functors,
// so the CPU tests exercise the exact arithmetic the GPU runs. Keep them free of
// anything that does not compile under nvcc (no exceptions, no std:: containers).
#pragma once

#include <cmath>
#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <bit>
#endif

#if defined(__CUDACC__)
#define DTRAIN_HD __host__ __device__ __forceinline__
#else
#define DTRAIN_HD inline
#endif

namespace dtrain::fn {

// ---- activations: forward y = f(x); backward dx = dy * f'(.) from saved x or y ----
struct ReluFwd {
  template <typename T>
  DTRAIN_HD T operator()(T x) const {
    return x > T(0) ? x : T(0);
  }
};
struct ReluBwd {  // uses the forward output y
  template <typename T>
  DTRAIN_HD T operator()(T dy, T y) const {
    return y > T(0) ? dy : T(0);
  }
};
struct TanhFwd {
  template <typename T>
  DTRAIN_HD T operator()(T x) const {
    return std::tanh(x);
  }
};
struct TanhBwd {  // uses y = tanh(x)
  template <typename T>
  DTRAIN_HD T operator()(T dy, T y) const {
    return dy * (T(1) - y * y);
  }
};
struct SigmoidFwd {
  template <typename T>
  DTRAIN_HD T operator()(T x) const {
    // Stable on both sides: never exponentiates a large positive number.
    if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
    T e = std::exp(x);
    return e / (T(1) + e);
  }
};
struct SigmoidBwd {  // uses y = sigmoid(x)
  template <typename T>
  DTRAIN_HD T operator()(T dy, T y) const {
    return dy * y * (T(1) - y);
  }
};

// ---- elementwise unary (the scalar ops and exp/log) ----
struct Affine {  // alpha * x + beta: mul_scalar (beta 0), add_scalar (alpha 1)
  double alpha, beta;
  template <typename T>
  DTRAIN_HD T operator()(T x) const {
    return T(alpha) * x + T(beta);
  }
};
struct Exp {
  template <typename T>
  DTRAIN_HD T operator()(T x) const {
    return std::exp(x);
  }
};
struct Log {
  template <typename T>
  DTRAIN_HD T operator()(T x) const {
    return std::log(x);
  }
};

// ---- elementwise binary ----
struct Add {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const {
    return a + b;
  }
};
struct Sub {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const {
    return a - b;
  }
};
struct Mul {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const {
    return a * b;
  }
};
struct Div {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const {
    return a / b;
  }
};
struct Max {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct Min {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};

// ---- dropout: a counter-based mask, so element i's draw does not depend on order ----
// splitmix64 of (seed, i): the GPU kernel and a CPU check evaluate the same bits.
DTRAIN_HD uint32_t hash_u32(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 32);
}
struct DropoutMask {  // element i is kept (scaled by 1/(1-p)) with probability 1 - p
  uint64_t seed;
  float p;
  float scale;
  DTRAIN_HD float operator()(uint64_t i) const {
    float u = static_cast<float>(hash_u32(seed, i) >> 8) * (1.0f / 16777216.0f);
    return u >= p ? scale : 0.f;
  }
};

// ---- mixed precision: dynamic loss scaling (amp.h) ----
DTRAIN_HD bool is_finite(double x) { return x - x == 0.0; }  // false for NaN and +-inf
// After each step: an inf/NaN gradient multiplies the scale by backoff and restarts
// the count; growth_interval finite steps in a row multiply it by growth.
struct LossScaleUpdate {
  float growth, backoff;
  int growth_interval;
  DTRAIN_HD void operator()(bool found_nonfinite, float& scale, int& good_steps) const {
    if (found_nonfinite) {
      scale *= backoff;
      good_steps = 0;
    } else if (++good_steps >= growth_interval) {
      scale *= growth;
      good_steps = 0;
    }
  }
};

// ---- optimizer updates (one parameter element at a time) ----
// SGD with momentum, nesterov and (coupled) weight decay, as in torch.optim.SGD:
//   g += wd * p;  buf = momentum * buf + (1 - dampening) * g  (buf = g on the first step)
//   d = nesterov ? g + momentum * buf : buf;  p -= lr * d
struct SgdUpdate {
  float lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
  template <typename T>
  DTRAIN_HD void operator()(T& p, T g, T& buf) const {
    if (weight_decay != 0.f) g += T(weight_decay) * p;
    T d = g;
    if (momentum != 0.f) {
      buf = first_step ? g : T(momentum) * buf + T(1.f - dampening) * g;
      d = nesterov ? g + T(momentum) * buf : buf;
    }
    p -= T(lr) * d;
  }
};

// Adam / AdamW as in torch.optim: decoupled = AdamW (p *= 1 - lr*wd), else L2 (g += wd*p).
// bias_c1 = 1 - beta1^t, bias_c2 = 1 - beta2^t, computed once per step by the caller.
struct AdamUpdate {
  float lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2;
  bool decoupled;
  template <typename T>
  DTRAIN_HD void operator()(T& p, T g, T& m, T& v) const {
    if (weight_decay != 0.f) {
      if (decoupled) {
        p *= T(1) - T(lr) * T(weight_decay);
      } else {
        g += T(weight_decay) * p;
      }
    }
    m = T(beta1) * m + T(1.f - beta1) * g;
    v = T(beta2) * v + T(1.f - beta2) * g * g;
    T denom = std::sqrt(v / T(bias_c2)) + T(eps);
    p -= T(lr) / T(bias_c1) * m / denom;
  }
};

// ---- fast transcendental helpers and the fused LSTM cell (softmax, losses, LSTM) ----
// fast_exp(float) is a branch-free Cephes-style polynomial (round-to-nearest range
// reduction by ln 2, degree-5 polynomial, 2^n built in the exponent bits), so the
// compiler vectorises loops that call it; relative error <= 2 ulp on [-87, 88], inputs
// are clamped to that range (exp(-inf) gives ~1e-38, not 0) and NaN propagates.
// fast_exp(double) is std::exp: f64 is the gradient-check dtype and keeps full accuracy.
DTRAIN_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}
DTRAIN_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return std::bit_cast<uint32_t>(f);
#endif
}
DTRAIN_HD float fast_exp(float x) {
  x = x > 88.3f ? 88.3f : x;  // written so that NaN falls through both clamps
  x = x < -87.3f ? -87.3f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + shifter;
  float n = t - shifter;                                // round(x / ln 2)
  uint32_t ni = float_to_bits(t) - 0x4B400000u;         // the same n, as an integer
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2 (two-part ln 2)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((ni + 127u) << 23);
}
DTRAIN_HD double fast_exp(double x) { return std::exp(x); }
// Branch-free sigmoid and tanh on top of fast_exp (absolute error ~1e-7 in f32).
template <typename T>
DTRAIN_HD T fast_sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}
template <typename T>
DTRAIN_HD T fast_tanh(T x) {
  return T(2) / (T(1) + fast_exp(T(-2) * x)) - T(1);
}

// ---- softmax, log_softmax and cross-entropy backward (per element) ----
// s is the row's combine result: sum(dy * y) for softmax, sum(dy) for log_softmax.
struct SoftmaxBwd {
  template <typename T>
  DTRAIN_HD T operator()(T dy, T y, T s) const {
    return y * (dy - s);
  }
};
struct LogSoftmaxBwd {  // y = log p
  template <typename T>
  DTRAIN_HD T operator()(T dy, T y, T s) const {
    return dy - fast_exp(y) * s;
  }
};
// dx = (p - onehot) * scale for one logit, rounded as p * scale - (target ? scale : 0);
// is_target says whether it is the row's class.
struct CrossEntropyBwd {
  template <typename T>
  DTRAIN_HD T operator()(T p, bool is_target, T scale) const {
    T d = p * scale;
    return is_target ? d - scale : d;
  }
};

// ---- transformer ops: GELU, layer norm, attention ----
// GELU, tanh approximation (GPT-2, torch gelu(approximate="tanh")):
//   y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
// tanh is fast_tanh (vectorisable in f32, std::exp-exact in f64).
struct GeluFwd {
  template <typename T>
  DTRAIN_HD T operator()(T x) const {
    T u = T(0.7978845608028654) * (x + T(0.044715) * x * x * x);
    return T(0.5) * x * (T(1) + fast_tanh(u));
  }
};
struct GeluBwd {  // uses the forward input x (not y)
  template <typename T>
  DTRAIN_HD T operator()(T dy, T x) const {
    const T c = T(0.7978845608028654);
    T x2 = x * x;
    T t = fast_tanh(c * (x + T(0.044715) * x2 * x));
    T du = c * (T(1) + T(3 * 0.044715) * x2);
    return dy * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du);
  }
};
// 1 / sqrt(var + eps), the layer-norm row scale (var is the biased variance).
template <typename T>
DTRAIN_HD T layer_norm_rstd(T var, T eps) {
  return T(1) / std::sqrt(var + eps);
}
// One element of layer norm: (x - mean) * rstd * w + b.
struct LayerNormFwd {
  template <typename T>
  DTRAIN_HD T operator()(T x, T mean, T rstd, T w, T b) const {
    return (x - mean) * rstd * w + b;
  }
};
// dx of one element from g = dy * w, xhat = (x - mean) * rstd and the row means
// mean_g = mean(g), mean_gx = mean(g * xhat):  dx = rstd (g - mean_g - xhat mean_gx).
struct LayerNormBwd {
  template <typename T>
  DTRAIN_HD T operator()(T g, T xhat, T mean_g, T mean_gx, T rstd) const {
    return rstd * (g - mean_g - xhat * mean_gx);
  }
};
// Attention probability recomputed from a (scaled) score and its row's log-sum-exp;
// masked scores (visible false) give 0. The score gradient is fn::SoftmaxBwd:
// dS = P (dP - D), D = sum(dO * O) over the row.
struct AttentionProb {
  template <typename T>
  DTRAIN_HD T operator()(T score, T lse, bool visible) const {
    return visible ? fast_exp(score - lse) : T(0);
  }
};
// Whether query i sees key j: everything, or j <= i when causal.
DTRAIN_HD bool attention_visible(int64_t i, int64_t j, bool causal) { return !causal || j <= i; }

// One LSTM cell element, PyTorch's gate order and equations:
//   i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o)
//   c = f * c_prev + i * g,  h = o * tanh(c)
// The four pre-activations are overwritten with the activated gates (saved for
// backward), tc = tanh(c) is saved too.
struct LstmCellFwd {
  template <typename T>
  DTRAIN_HD void operator()(T& i, T& f, T& g, T& o, T c_prev, T& c, T& tc, T& h) const {
    i = fast_sigmoid(i);
    f = fast_sigmoid(f);
    g = fast_tanh(g);
    o = fast_sigmoid(o);
    c = f * c_prev + i * g;
    tc = fast_tanh(c);
    h = o * tc;
  }
};
// Backward of LstmCellFwd from the saved activated gates, c_prev and tc = tanh(c).
// dh: gradient reaching h (from the output and from the next step); dc: on entry the
// gradient reaching c from the next step, on exit the gradient for c_prev. Writes
// the gradients of the four pre-activations.
struct LstmCellBwd {
  template <typename T>
  DTRAIN_HD void operator()(T i, T f, T g, T o, T c_prev, T tc, T dh, T& dc, T& da_i, T& da_f,
                            T& da_g, T& da_o) const {
    T dct = dc + dh * o * (T(1) - tc * tc);
    da_i = dct * g * i * (T(1) - i);
    da_f = dct * c_prev * f * (T(1) - f);
    da_g = dct * i * (T(1) - g * g);
    da_o = dh * tc * o * (T(1) - o);
    dc = dct * f;
  }
};

}  // namespace dtrain::fn
