// Kernel arithmetic shared by the CPU and CUDA backends.
//
// Each functor is a tiny struct with a DTRAIN_HD call operator. The CPU kernels call
// them in their loops; the CUDA kernels (a later issue) call the very same functors,
// so the CPU tests exercise the exact arithmetic the GPU runs. Keep them free of
// anything that does not compile under nvcc (no exceptions, no std:: containers).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DTRAIN_HD __host__ __device__ __forceinline__
#else
#define DTRAIN_HD inline
#endif

namespace dtrain::fn {

// ---- activations: forward y = f(x); backward dx = dy * f'(.) from saved x or y ----
struct ReluFwd {
  template <typename T>
  DTRAIN_HD T operator()(T x) const { return x > T(0) ? x : T(0); }
};
struct ReluBwd {  // uses the forward output y
  template <typename T>
  DTRAIN_HD T operator()(T dy, T y) const { return y > T(0) ? dy : T(0); }
};
struct TanhFwd {
  template <typename T>
  DTRAIN_HD T operator()(T x) const { return std::tanh(x); }
};
struct TanhBwd {  // uses y = tanh(x)
  template <typename T>
  DTRAIN_HD T operator()(T dy, T y) const { return dy * (T(1) - y * y); }
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
  DTRAIN_HD T operator()(T dy, T y) const { return dy * y * (T(1) - y); }
};

// ---- elementwise binary ----
struct Add {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const { return a + b; }
};
struct Sub {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const { return a - b; }
};
struct Mul {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const { return a * b; }
};
struct Div {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const { return a / b; }
};
struct Max {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <typename T>
  DTRAIN_HD T operator()(T a, T b) const { return a < b ? a : b; }
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

}  // namespace dtrain::fn
