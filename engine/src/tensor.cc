#include "dtrain/engine/tensor.h"

#include <fmt/format.h>

#include <cstring>

#include "dtrain/engine/autograd.h"
#ifdef DTRAIN_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace dtrain {

std::string shape_str(const Shape& s) { return fmt::format("[{}]", fmt::join(s, ",")); }

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& s) {
  Shape st(s.size());
  int64_t acc = 1;
  for (size_t i = s.size(); i-- > 0;) {
    st[i] = acc;
    acc *= s[i];
  }
  return st;
}

Storage::Storage(size_t nbytes, Allocator* allocator)
    : data_(allocator->allocate(nbytes)), nbytes_(nbytes), allocator_(allocator) {}

Storage::~Storage() { allocator_->deallocate(data_, nbytes_); }

int64_t Tensor::size(int64_t d) const {
  int64_t n = dim();
  int64_t i = d < 0 ? d + n : d;
  DTRAIN_CHECK(i >= 0 && i < n, InvalidArgument, "dimension {} out of range for a {}-D tensor {}",
               d, n, shape_str(shape()));
  return impl_->shape[static_cast<size_t>(i)];
}

bool Tensor::is_contiguous() const {
  int64_t acc = 1;
  for (size_t i = impl_->shape.size(); i-- > 0;) {
    if (impl_->shape[i] != 1 && impl_->strides[i] != acc) return false;
    acc *= impl_->shape[i];
  }
  return true;
}

void Tensor::check_dtype(DType want) const {
  DTRAIN_CHECK(dtype() == want, DTypeError, "tensor {} has dtype {}, accessed as {}",
               shape_str(shape()), dtype_name(dtype()), dtype_name(want));
}

namespace {

// Calls f(T*) style visitors for every element in logical (row-major) order of a
// strided tensor: visit(linear_index, element_offset).
template <typename F>
void for_each_offset(const Shape& shape, const Shape& strides, int64_t base, F&& visit) {
  int64_t n = shape_numel(shape);
  if (n == 0) return;
  size_t nd = shape.size();
  std::vector<int64_t> idx(nd, 0);
  int64_t off = base;
  for (int64_t i = 0; i < n; ++i) {
    visit(i, off);
    for (size_t d = nd; d-- > 0;) {
      if (++idx[d] < shape[d]) {
        off += strides[d];
        break;
      }
      off -= strides[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
}

template <typename Dst, typename Src>
Dst convert(Src v) {
  if constexpr (std::is_same_v<Src, Half> || std::is_same_v<Src, BFloat16>) {
    return convert<Dst>(static_cast<float>(v));
  } else if constexpr (std::is_same_v<Dst, Half> || std::is_same_v<Dst, BFloat16>) {
    return Dst(static_cast<float>(v));
  } else {
    return static_cast<Dst>(v);
  }
}

template <typename F>
void dispatch_all(DType t, F&& f) {
  switch (t) {
    case DType::f32:
      return f(float{});
    case DType::f64:
      return f(double{});
    case DType::f16:
      return f(Half{});
    case DType::bf16:
      return f(BFloat16{});
    case DType::i32:
      return f(int32_t{});
    case DType::i64:
      return f(int64_t{});
    case DType::u8:
      return f(uint8_t{});
  }
}

// Copies src (any strides) into contiguous dst of dtype `dst_type`.
void strided_convert(const Tensor& src, void* dst, DType dst_type) {
  const char* base = static_cast<const char*>(src.impl()->storage->data());
  dispatch_all(src.dtype(), [&](auto s0) {
    using S = decltype(s0);
    const S* sp = reinterpret_cast<const S*>(base);
    dispatch_all(dst_type, [&](auto d0) {
      using D = decltype(d0);
      D* dp = static_cast<D*>(dst);
      if (src.is_contiguous()) {
        const S* s = sp + src.impl()->offset;
        int64_t n = src.numel();
        if constexpr (std::is_same_v<S, D>) {
          if (n > 0) std::memcpy(dp, s, static_cast<size_t>(n) * sizeof(D));
        } else {
          for (int64_t i = 0; i < n; ++i) dp[i] = convert<D>(s[i]);
        }
        return;
      }
      for_each_offset(src.shape(), src.strides(), src.impl()->offset,
                      [&](int64_t i, int64_t off) { dp[i] = convert<D>(sp[off]); });
    });
  });
}

}  // namespace

double Tensor::item() const {
  DTRAIN_CHECK(numel() == 1, ShapeError, "item() needs a one-element tensor, got {}",
               shape_str(shape()));
  if (device().is_cuda()) return to(Device::cpu()).item();
  double out = 0;
  strided_convert(*this, &out, DType::f64);
  return out;
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  if (device().is_cuda()) return to(Device::cpu()).to_vector<T>();
  std::vector<T> out(static_cast<size_t>(numel()));
  strided_convert(*this, out.data(), dtype_of<T>::value);
  return out;
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<uint8_t> Tensor::to_vector<uint8_t>() const;

Tensor empty(const Shape& shape, TensorOptions options) {
  for (int64_t d : shape) {
    DTRAIN_CHECK(d >= 0, ShapeError, "negative dimension in shape {}", shape_str(shape));
  }
  auto impl = std::make_shared<TensorImpl>();
  size_t nbytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(options.dtype);
  impl->storage = std::make_shared<Storage>(nbytes, default_allocator(options.device));
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = options.dtype;
  return Tensor(std::move(impl));
}

Tensor full(const Shape& shape, double value, TensorOptions options) {
  Tensor t = empty(shape, options);
  t.fill_(value);
  return t;
}
Tensor zeros(const Shape& shape, TensorOptions options) { return full(shape, 0.0, options); }
Tensor ones(const Shape& shape, TensorOptions options) { return full(shape, 1.0, options); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape(), t.options()); }
Tensor empty_like(const Tensor& t) { return empty(t.shape(), t.options()); }
Tensor scalar_tensor(double value, TensorOptions options) { return full({}, value, options); }

Tensor arange(int64_t n, TensorOptions options) {
  if (options.device.is_cuda()) {
    return arange(n, TensorOptions{options.dtype, Device::cpu()}).to(options.device);
  }
  Tensor t = empty({n}, options);
  dispatch_all(options.dtype, [&](auto z) {
    using T = decltype(z);
    T* p = static_cast<T*>(t.raw_data());
    for (int64_t i = 0; i < n; ++i) p[i] = convert<T>(static_cast<double>(i));
  });
  return t;
}

template <typename T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape) {
  DTRAIN_CHECK(shape_numel(shape) == static_cast<int64_t>(values.size()), ShapeError,
               "from_vector: {} values do not fill shape {}", values.size(), shape_str(shape));
  Tensor t = empty(shape, TensorOptions{}.with_dtype(dtype_of<T>::value));
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(T));
  return t;
}
template Tensor from_vector<float>(const std::vector<float>&, const Shape&);
template Tensor from_vector<double>(const std::vector<double>&, const Shape&);
template Tensor from_vector<int64_t>(const std::vector<int64_t>&, const Shape&);
template Tensor from_vector<int32_t>(const std::vector<int32_t>&, const Shape&);
template Tensor from_vector<uint8_t>(const std::vector<uint8_t>&, const Shape&);

Tensor make_view(const Tensor& base, Shape shape, Shape strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.impl()->storage;
  impl->offset = offset;
  impl->shape = std::move(shape);
  impl->strides = std::move(strides);
  impl->dtype = base.dtype();
  return Tensor(std::move(impl));
}

void Tensor::fill_(double value) {
#ifdef DTRAIN_WITH_CUDA
  if (device().is_cuda()) return cuda::fill(*this, value);
#endif
  dispatch_all(dtype(), [&](auto z) {
    using T = decltype(z);
    T v = convert<T>(value);
    T* p = static_cast<T*>(impl_->storage->data());
    if (is_contiguous()) {
      T* q = p + impl_->offset;
      int64_t n = numel();
      for (int64_t i = 0; i < n; ++i) q[i] = v;
      return;
    }
    for_each_offset(shape(), strides(), impl_->offset, [&](int64_t, int64_t off) { p[off] = v; });
  });
}

void Tensor::copy_(const Tensor& src) {
  DTRAIN_CHECK(src.numel() == numel(), ShapeError, "copy_: source {} does not match destination {}",
               shape_str(src.shape()), shape_str(shape()));
#ifdef DTRAIN_WITH_CUDA
  if (device().is_cuda() || src.device().is_cuda()) return cuda::copy(*this, src);
#endif
  if (is_contiguous()) {
    strided_convert(src, raw_data(), dtype());
    return;
  }
  Tensor tmp = src.to(dtype());
  dispatch_all(dtype(), [&](auto z) {
    using T = decltype(z);
    const T* s = static_cast<const T*>(tmp.raw_data());
    T* p = static_cast<T*>(impl_->storage->data());
    for_each_offset(shape(), strides(), impl_->offset,
                    [&](int64_t i, int64_t off) { p[off] = s[i]; });
  });
}

Tensor Tensor::to(DType dt) const {
  Tensor out = empty(shape(), TensorOptions{dt, device()});
#ifdef DTRAIN_WITH_CUDA
  if (device().is_cuda()) {
    cuda::copy(out, *this);
    return out;
  }
#endif
  strided_convert(*this, out.raw_data(), dt);
  return out;
}

Tensor Tensor::to(Device d) const {
  if (d == device()) return *this;
  Tensor out = empty(shape(), TensorOptions{dtype(), d});  // checks that d exists
#ifdef DTRAIN_WITH_CUDA
  cuda::copy(out, *this);
#endif
  return out;
}

Tensor Tensor::clone() const { return to(dtype()); }

Tensor Tensor::detach() const { return make_view(*this, shape(), strides(), impl_->offset); }

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  Tensor out = clone();
  if (requires_grad() && GradMode::is_enabled()) {
    return make_function("contiguous", {*this}, {out},
                         [](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0]}; })[0];
  }
  return out;
}

Tensor& Tensor::set_requires_grad(bool value) {
  DTRAIN_CHECK(!value || is_floating(dtype()), DTypeError,
               "only floating tensors can require grad (got {})", dtype_name(dtype()));
  DTRAIN_CHECK(is_leaf(), InvalidArgument,
               "requires_grad can only be changed on leaf tensors (this one comes from {})",
               impl_->grad_fn->name());
  impl_->requires_grad = value;
  return *this;
}

namespace {
// A differentiable view: same storage, new geometry; backward maps the gradient
// back to the input's shape with `back`.
Tensor view_op(const Tensor& self, const char* name, Shape shape, Shape strides, int64_t offset,
               BackwardFn back) {
  Tensor out = make_view(self, std::move(shape), std::move(strides), offset);
  if (self.requires_grad() && GradMode::is_enabled()) {
    return make_function(name, {self}, {out}, std::move(back))[0];
  }
  return out;
}
}  // namespace

Tensor Tensor::reshape(Shape new_shape) const {
  int64_t infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < new_shape.size(); ++i) {
    if (new_shape[i] == -1) {
      DTRAIN_CHECK(infer < 0, ShapeError, "reshape {} -> {}: only one dimension can be -1",
                   shape_str(shape()), shape_str(new_shape));
      infer = static_cast<int64_t>(i);
    } else {
      known *= new_shape[i];
    }
  }
  if (infer >= 0) {
    DTRAIN_CHECK(known != 0 && numel() % known == 0, ShapeError,
                 "reshape {} -> {}: cannot infer -1", shape_str(shape()), shape_str(new_shape));
    new_shape[static_cast<size_t>(infer)] = numel() / known;
  }
  DTRAIN_CHECK(shape_numel(new_shape) == numel(), ShapeError,
               "reshape {} -> {}: element counts differ ({} vs {})", shape_str(shape()),
               shape_str(new_shape), numel(), shape_numel(new_shape));
  Tensor src = contiguous();
  Shape in_shape = shape();
  return view_op(src, "reshape", new_shape, contiguous_strides(new_shape), src.impl()->offset,
                 [in_shape](const std::vector<Tensor>& g) {
                   return std::vector<Tensor>{g[0].reshape(in_shape)};
                 });
}

Tensor Tensor::flatten(int64_t start_dim, int64_t end_dim) const {
  int64_t n = dim();
  if (n == 0) return reshape({1});
  int64_t s = start_dim < 0 ? start_dim + n : start_dim;
  int64_t e = end_dim < 0 ? end_dim + n : end_dim;
  DTRAIN_CHECK(s >= 0 && e < n && s <= e, InvalidArgument, "flatten({}, {}) of a {}-D tensor",
               start_dim, end_dim, n);
  Shape ns;
  for (int64_t i = 0; i < s; ++i) ns.push_back(shape()[i]);
  int64_t m = 1;
  for (int64_t i = s; i <= e; ++i) m *= shape()[i];
  ns.push_back(m);
  for (int64_t i = e + 1; i < n; ++i) ns.push_back(shape()[i]);
  return reshape(ns);
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  int64_t n = dim();
  int64_t a = d0 < 0 ? d0 + n : d0;
  int64_t b = d1 < 0 ? d1 + n : d1;
  DTRAIN_CHECK(a >= 0 && a < n && b >= 0 && b < n, InvalidArgument,
               "transpose({}, {}) of a {}-D tensor", d0, d1, n);
  Shape s = shape(), st = strides();
  std::swap(s[a], s[b]);
  std::swap(st[a], st[b]);
  return view_op(*this, "transpose", s, st, impl_->offset, [a, b](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{g[0].transpose(a, b)};
  });
}

Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  int64_t n = dim();
  int64_t a = d < 0 ? d + n : d;
  DTRAIN_CHECK(a >= 0 && a < n, InvalidArgument, "narrow: dimension {} of a {}-D tensor", d, n);
  DTRAIN_CHECK(start >= 0 && length >= 0 && start + length <= shape()[a], InvalidArgument,
               "narrow: [{}, {}) out of range for dimension {} of size {}", start, start + length,
               d, shape()[a]);
  Shape s = shape();
  s[a] = length;
  Shape in_shape = shape();
  TensorOptions opts = options();
  return view_op(*this, "narrow", s, strides(), impl_->offset + start * strides()[a],
                 [in_shape, opts, a, start, length](const std::vector<Tensor>& g) {
                   Tensor gi = zeros(in_shape, opts);
                   gi.narrow(a, start, length).copy_(g[0]);
                   return std::vector<Tensor>{gi};
                 });
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  int64_t n = dim();
  int64_t a = d < 0 ? d + n : d;
  DTRAIN_CHECK(a >= 0 && a < n, InvalidArgument, "select: dimension {} of a {}-D tensor", d, n);
  int64_t i = index < 0 ? index + shape()[a] : index;
  Tensor nar = narrow(a, i, 1);
  Shape s = shape();
  s.erase(s.begin() + a);
  return nar.reshape(s);
}

void Tensor::backward(const Tensor& gradient) const {
  Tensor g = gradient;
  if (!g.defined()) {
    DTRAIN_CHECK(numel() == 1, ShapeError,
                 "backward() without a gradient needs a scalar output, got {}", shape_str(shape()));
    g = ones(shape(), options());
  }
  run_backward({*this}, {g});
}

void Tensor::register_post_accumulate_grad_hook(std::function<void(const Tensor&)> hook) {
  DTRAIN_CHECK(is_leaf() && requires_grad(), InvalidArgument,
               "post-accumulate-grad hooks go on leaves that require grad");
  impl_->post_accumulate_grad_hooks.push_back(std::move(hook));
}

std::string Tensor::str() const {
  if (!defined()) return "Tensor(undefined)";
  std::string s =
      fmt::format("Tensor {} {} {}", dtype_name(dtype()), shape_str(shape()), device().str());
  if (is_floating(dtype()) || dtype() == DType::i64 || dtype() == DType::i32) {
    std::vector<double> v = to_vector<double>();
    size_t k = std::min<size_t>(v.size(), 8);
    s += fmt::format(" {{{}{}}}", fmt::join(v.begin(), v.begin() + k, ", "),
                     v.size() > k ? ", ..." : "");
  }
  return s;
}

}  // namespace dtrain
