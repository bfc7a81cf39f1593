// Elementwise ops with broadcasting, and their backward.
#include <cmath>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/functors.h"
#include "dtrain/engine/ops.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

namespace {

#ifdef DTRAIN_WITH_CUDA
// The CUDA kernel that runs functor F (the same functor the CPU loop calls).
template <typename F>
constexpr cuda::BinaryOp cuda_binary_op() {
  if constexpr (std::is_same_v<F, fn::Add>) return cuda::BinaryOp::kAdd;
  if constexpr (std::is_same_v<F, fn::Sub>) return cuda::BinaryOp::kSub;
  if constexpr (std::is_same_v<F, fn::Mul>) return cuda::BinaryOp::kMul;
  return cuda::BinaryOp::kDiv;
}
template <typename F>
constexpr cuda::UnaryOp cuda_unary_op() {
  if constexpr (std::is_same_v<F, fn::ReluFwd>) return cuda::UnaryOp::kRelu;
  if constexpr (std::is_same_v<F, fn::TanhFwd>) return cuda::UnaryOp::kTanh;
  return cuda::UnaryOp::kSigmoid;
}
template <typename B>
constexpr cuda::ActivationBwd cuda_activation_bwd() {
  if constexpr (std::is_same_v<B, fn::ReluBwd>) return cuda::ActivationBwd::kRelu;
  if constexpr (std::is_same_v<B, fn::TanhBwd>) return cuda::ActivationBwd::kTanh;
  return cuda::ActivationBwd::kSigmoid;
}
#endif

void check_float_pair(const Tensor& a, const Tensor& b, const char* op) {
  DTRAIN_CHECK(a.defined() && b.defined(), InvalidArgument, "{}: undefined input", op);
  DTRAIN_CHECK(a.dtype() == b.dtype(), DTypeError, "{}: dtypes differ ({} {} vs {} {})", op,
               dtype_name(a.dtype()), shape_str(a.shape()), dtype_name(b.dtype()),
               shape_str(b.shape()));
}

// Strides of `t` seen through the broadcast output shape (0 on broadcast dims).
Shape broadcast_strides(const Tensor& t, const Shape& out) {
  Shape st(out.size(), 0);
  size_t off = out.size() - t.shape().size();
  for (size_t i = 0; i < t.shape().size(); ++i) {
    st[off + i] = t.shape()[i] == 1 ? 0 : t.strides()[i];
  }
  return st;
}

template <typename T, typename F>
void binary_kernel(const Tensor& a, const Tensor& b, Tensor& out, F f) {
  T* o = out.data<T>();
  int64_t n = out.numel();
  if (n == 0) return;
  const T* pa = a.data<T>();
  const T* pb = b.data<T>();
  bool ac = a.is_contiguous(), bc = b.is_contiguous();
  if (ac && bc && a.numel() == n && b.numel() == n) {
    for (int64_t i = 0; i < n; ++i) o[i] = f(pa[i], pb[i]);
    return;
  }
  if (ac && b.numel() == 1 && a.numel() == n) {
    T s = pb[0];
    for (int64_t i = 0; i < n; ++i) o[i] = f(pa[i], s);
    return;
  }
  if (bc && a.numel() == 1 && b.numel() == n) {
    T s = pa[0];
    for (int64_t i = 0; i < n; ++i) o[i] = f(s, pb[i]);
    return;
  }
  // General strided/broadcast walk; the innermost dimension is a tight loop.
  const Shape& shape = out.shape();
  size_t nd = shape.size();
  Shape sa = broadcast_strides(a, shape), sb = broadcast_strides(b, shape);
  int64_t inner = shape[nd - 1], ia = sa[nd - 1], ib = sb[nd - 1];
  std::vector<int64_t> idx(nd, 0);
  int64_t oa = 0, ob = 0;
  for (int64_t base = 0; base < n; base += inner) {
    for (int64_t j = 0; j < inner; ++j) o[base + j] = f(pa[oa + j * ia], pb[ob + j * ib]);
    for (size_t d = nd - 1; d-- > 0;) {
      if (++idx[d] < shape[d]) {
        oa += sa[d];
        ob += sb[d];
        break;
      }
      oa -= sa[d] * (shape[d] - 1);
      ob -= sb[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
}

template <typename F>
Tensor binary_forward(const Tensor& a, const Tensor& b, const char* op, F f) {
  check_float_pair(a, b, op);
  Shape shape = broadcast_shapes(a.shape(), b.shape(), op);
#ifdef DTRAIN_WITH_CUDA
  if (a.device().is_cuda() || b.device().is_cuda()) {
    return cuda::binary(cuda_binary_op<F>(), a, b, shape);
  }
#endif
  Tensor out = empty(shape, a.options());
  DTRAIN_DISPATCH_FLOAT(a.dtype(), op, [&] { binary_kernel<scalar_t>(a, b, out, f); });
  return out;
}

template <typename F>
Tensor unary_map(const Tensor& a, const char* op, F f) {
  Tensor x = a.contiguous();
  Tensor out = empty(x.shape(), x.options());
  DTRAIN_DISPATCH_FLOAT(x.dtype(), op, [&] {
    const scalar_t* p = x.data<scalar_t>();
    scalar_t* o = out.data<scalar_t>();
    int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) o[i] = f(p[i]);
  });
  return out;
}

// dx = bwd(dy, y) elementwise, for activations whose derivative is a function of y.
template <typename B>
Tensor activation_backward(const Tensor& dy, const Tensor& y, const char* op, B bwd) {
#ifdef DTRAIN_WITH_CUDA
  if (y.device().is_cuda()) return cuda::activation_backward(cuda_activation_bwd<B>(), dy, y);
#endif
  Tensor g = dy.contiguous();
  Tensor out = empty(y.shape(), y.options());
  DTRAIN_DISPATCH_FLOAT(y.dtype(), op, [&] {
    const scalar_t* pg = g.data<scalar_t>();
    const scalar_t* py = y.data<scalar_t>();
    scalar_t* o = out.data<scalar_t>();
    int64_t n = y.numel();
    for (int64_t i = 0; i < n; ++i) o[i] = bwd(pg[i], py[i]);
  });
  return out;
}

template <typename Fwd, typename Bwd>
Tensor activation(const Tensor& a, const char* op) {
#ifdef DTRAIN_WITH_CUDA
  Tensor y = a.device().is_cuda() ? cuda::unary(cuda_unary_op<Fwd>(), a) : unary_map(a, op, Fwd{});
#else
  Tensor y = unary_map(a, op, Fwd{});
#endif
  if (!any_requires_grad({a})) return y;
  Tensor saved = y.detach();
  return make_function(op, {a}, {y}, [saved, op](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{activation_backward(g[0], saved, op, Bwd{})};
  })[0];
}

}  // namespace

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    DTRAIN_CHECK(da == db || da == 1 || db == 1, ShapeError,
                 "{}: shapes {} and {} cannot be broadcast together", op, shape_str(a),
                 shape_str(b));
    out[i] = da == 1 ? db : da;
  }
  return out;
}

Tensor sum_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g;
  std::vector<int64_t> dims;
  size_t lead = g.shape().size() - shape.size();
  for (size_t i = 0; i < g.shape().size(); ++i) {
    if (i < lead || (shape[i - lead] == 1 && g.shape()[i] != 1)) {
      dims.push_back(static_cast<int64_t>(i));
    }
  }
  Tensor s = dims.empty() ? g : sum(g, dims, /*keepdim=*/true);
  return s.reshape(shape);
}

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(a, b, "add", fn::Add{});
  if (!any_requires_grad({a, b})) return out;
  Shape sa = a.shape(), sb = b.shape();
  return make_function("add", {a, b}, {out}, [sa, sb](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{sum_to(g[0], sa), sum_to(g[0], sb)};
  })[0];
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(a, b, "sub", fn::Sub{});
  if (!any_requires_grad({a, b})) return out;
  Shape sa = a.shape(), sb = b.shape();
  return make_function("sub", {a, b}, {out}, [sa, sb](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{sum_to(g[0], sa), neg(sum_to(g[0], sb))};
  })[0];
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(a, b, "mul", fn::Mul{});
  if (!any_requires_grad({a, b})) return out;
  Tensor da = a.detach(), db = b.detach();
  bool ga = a.requires_grad(), gb = b.requires_grad();
  return make_function("mul", {a, b}, {out}, [da, db, ga, gb](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{ga ? sum_to(mul(g[0], db), da.shape()) : Tensor(),
                               gb ? sum_to(mul(g[0], da), db.shape()) : Tensor()};
  })[0];
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(a, b, "div", fn::Div{});
  if (!any_requires_grad({a, b})) return out;
  Tensor da = a.detach(), db = b.detach();
  bool ga = a.requires_grad(), gb = b.requires_grad();
  return make_function("div", {a, b}, {out}, [da, db, ga, gb](const std::vector<Tensor>& g) {
    Tensor gra = ga ? sum_to(div(g[0], db), da.shape()) : Tensor();
    Tensor grb = gb ? sum_to(neg(div(mul(g[0], da), mul(db, db))), db.shape()) : Tensor();
    return std::vector<Tensor>{gra, grb};
  })[0];
}

namespace {
// The scalar ops, exp and log on a CUDA tensor (an undefined result on the CPU).
Tensor device_unary(const Tensor& a, int op, double alpha, double beta) {
#ifdef DTRAIN_WITH_CUDA
  if (a.defined() && a.device().is_cuda()) {
    return cuda::unary(static_cast<cuda::UnaryOp>(op), a, alpha, beta);
  }
#endif
  return Tensor();
}
constexpr int kAffineOp = 0, kExpOp = 1, kLogOp = 2;  // cuda::UnaryOp's values
#ifdef DTRAIN_WITH_CUDA
static_assert(static_cast<int>(cuda::UnaryOp::kAffine) == kAffineOp &&
              static_cast<int>(cuda::UnaryOp::kExp) == kExpOp &&
              static_cast<int>(cuda::UnaryOp::kLog) == kLogOp);
#endif
}  // namespace

Tensor mul_scalar(const Tensor& a, double s) {
  Tensor out = device_unary(a, kAffineOp, s, 0.0);
  if (!out.defined())
    out = DTRAIN_DISPATCH_FLOAT(a.dtype(), "mul_scalar", [&] {
      scalar_t k = static_cast<scalar_t>(s);
      return unary_map(a, "mul_scalar", [k](scalar_t v) { return v * k; });
    });
  if (!any_requires_grad({a})) return out;
  return make_function("mul_scalar", {a}, {out}, [s](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{mul_scalar(g[0], s)};
  })[0];
}

Tensor add_scalar(const Tensor& a, double s) {
  Tensor out = device_unary(a, kAffineOp, 1.0, s);
  if (!out.defined())
    out = DTRAIN_DISPATCH_FLOAT(a.dtype(), "add_scalar", [&] {
      scalar_t k = static_cast<scalar_t>(s);
      return unary_map(a, "add_scalar", [k](scalar_t v) { return v + k; });
    });
  if (!any_requires_grad({a})) return out;
  return make_function("add_scalar", {a}, {out},
                       [](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0]}; })[0];
}

Tensor neg(const Tensor& a) { return mul_scalar(a, -1.0); }

Tensor exp(const Tensor& a) {
  Tensor y = device_unary(a, kExpOp, 1.0, 0.0);
  if (!y.defined())
    y = DTRAIN_DISPATCH_FLOAT(a.dtype(), "exp", [&] {
      return unary_map(a, "exp", [](scalar_t v) { return std::exp(v); });
    });
  if (!any_requires_grad({a})) return y;
  Tensor saved = y.detach();
  return make_function("exp", {a}, {y}, [saved](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{mul(g[0], saved)};
  })[0];
}

Tensor log(const Tensor& a) {
  Tensor y = device_unary(a, kLogOp, 1.0, 0.0);
  if (!y.defined())
    y = DTRAIN_DISPATCH_FLOAT(a.dtype(), "log", [&] {
      return unary_map(a, "log", [](scalar_t v) { return std::log(v); });
    });
  if (!any_requires_grad({a})) return y;
  Tensor saved = a.detach();
  return make_function("log", {a}, {y}, [saved](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{div(g[0], saved)};
  })[0];
}

Tensor relu(const Tensor& a) { return activation<fn::ReluFwd, fn::ReluBwd>(a, "relu"); }
Tensor tanh(const Tensor& a) { return activation<fn::TanhFwd, fn::TanhBwd>(a, "tanh"); }
Tensor sigmoid(const Tensor& a) { return activation<fn::SigmoidFwd, fn::SigmoidBwd>(a, "sigmoid"); }

}  // namespace dtrain
