// Tensor: a strided view of typed storage, with autograd metadata.
//
// A Tensor is a cheap handle (shared_ptr to TensorImpl). Copies alias the same data;
// use clone() for a deep copy. Storage comes from the device's caching allocator.
// Views (reshape of a contiguous tensor, transpose, narrow) share storage and have
// their own shape/strides/offset. Kernels take contiguous inputs; call contiguous()
// (a no-op when already contiguous) before handing raw pointers to a kernel.
//
// Autograd: a tensor that requires_grad and was produced by a differentiable op has
// a grad_fn (the Node that made it). Leaves (parameters) accumulate gradients into
// grad(). See autograd.h.
//
// Thread-safety: a Tensor may be read from several threads; mutation (writing data,
// set_grad) needs external synchronisation.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/dtype.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/allocator.h"
#include "dtrain/engine/device.h"

namespace dtrain {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[64,1,28,28]"
int64_t shape_numel(const Shape& s);
Shape contiguous_strides(const Shape& s);

class Node;
class Tensor;

// Owns one allocation. Returned to its allocator when the last view goes away.
class Storage {
 public:
  Storage(size_t nbytes, Allocator* allocator);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return allocator_->device(); }

 private:
  void* data_;
  size_t nbytes_;
  Allocator* allocator_;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  Shape shape;
  Shape strides;  // in elements
  DType dtype = DType::f32;
  // autograd
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;  // set for non-leaf results of differentiable ops
  uint32_t output_nr = 0;         // which output of grad_fn this is
  std::shared_ptr<TensorImpl> grad;
  std::shared_ptr<Node> grad_accumulator;  // leaves only; created lazily
  // Leaves only: called after backward has accumulated a gradient into grad()
  // (DDP starts a bucket's all-reduce from here).
  std::vector<std::function<void(const Tensor&)>> post_accumulate_grad_hooks;
  std::string name;  // optional, for messages
};

struct TensorOptions {
  DType dtype = DType::f32;
  Device device = Device::cpu();
  TensorOptions& with_dtype(DType d) {
    dtype = d;
    return *this;
  }
  TensorOptions& with_device(Device d) {
    device = d;
    return *this;
  }
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl_->shape; }
  const Shape& strides() const { return impl_->strides; }
  int64_t dim() const { return static_cast<int64_t>(impl_->shape.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return shape_numel(impl_->shape); }
  DType dtype() const { return impl_->dtype; }
  Device device() const { return impl_->storage->device(); }
  TensorOptions options() const { return {dtype(), device()}; }
  bool is_contiguous() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype()); }

  // Typed access. Throws DTypeError when T does not match dtype(). For a CUDA tensor
  // the pointer is device memory: hand it to kernels, never dereference it on the host.
  template <typename T>
  T* data() const {
    check_dtype(dtype_of<T>::value);
    return static_cast<T*>(raw_data());
  }
  void* raw_data() const {
    return static_cast<char*>(impl_->storage->data()) + impl_->offset * dtype_size(dtype());
  }
  // The single value of a one-element tensor, converted to double.
  double item() const;
  // Copies the (contiguous) values out, converted to T.
  template <typename T>
  std::vector<T> to_vector() const;

  Tensor contiguous() const;
  Tensor clone() const;          // deep copy, no autograd history
  Tensor detach() const;         // same data, no autograd history
  Tensor to(DType dtype) const;  // converts (not differentiable)
  // Copies to another device (cpu <-> cuda:N); *this when already there. Not
  // differentiable: move parameters before building the graph. A CUDA device that does
  // not exist throws UnsupportedError "no CUDA device: <driver's error>".
  Tensor to(Device device) const;
  void copy_(const Tensor& src);  // same numel; not recorded by autograd
  void fill_(double value);       // not recorded by autograd
  void zero_() { fill_(0.0); }

  // Differentiable views and shape ops.
  Tensor reshape(Shape shape) const;  // one dim may be -1
  Tensor flatten(int64_t start_dim = 1, int64_t end_dim = -1) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor t() const { return transpose(0, 1); }
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor select(int64_t dim, int64_t index) const;

  // Autograd.
  bool requires_grad() const { return impl_->requires_grad; }
  Tensor& set_requires_grad(bool value);
  bool is_leaf() const { return impl_->grad_fn == nullptr; }
  const std::shared_ptr<Node>& grad_fn() const { return impl_->grad_fn; }
  uint32_t output_nr() const { return impl_->output_nr; }
  Tensor grad() const { return Tensor(impl_->grad); }
  void set_grad(const Tensor& g) { impl_->grad = g.impl_; }
  // Computes gradients of this tensor w.r.t. the leaves that require grad. A
  // non-scalar tensor needs an explicit gradient.
  void backward(const Tensor& gradient = Tensor()) const;
  // Leaves: `hook(param)` runs each time backward has accumulated into grad().
  void register_post_accumulate_grad_hook(std::function<void(const Tensor&)> hook);

  const std::string& name() const { return impl_->name; }
  Tensor& set_name(std::string n) {
    impl_->name = std::move(n);
    return *this;
  }
  std::string str() const;  // "Tensor f32 [2,3] cpu" plus up to 8 values

  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool is_same(const Tensor& o) const { return impl_ == o.impl_; }

 private:
  void check_dtype(DType want) const;
  std::shared_ptr<TensorImpl> impl_;
};

// Factories. New tensors do not require grad.
Tensor empty(const Shape& shape, TensorOptions options = {});
Tensor zeros(const Shape& shape, TensorOptions options = {});
Tensor ones(const Shape& shape, TensorOptions options = {});
Tensor full(const Shape& shape, double value, TensorOptions options = {});
Tensor zeros_like(const Tensor& t);
Tensor empty_like(const Tensor& t);
Tensor scalar_tensor(double value, TensorOptions options = {});
template <typename T>
Tensor from_vector(const std::vector<T>& values, const Shape& shape);
Tensor arange(int64_t n, TensorOptions options = {});
// Makes a view on an existing storage (used by views and the data pipeline).
Tensor make_view(const Tensor& base, Shape shape, Shape strides, int64_t offset);

// Calls f.template operator()<T>() with T the C++ type of a floating dtype the CPU
// engine computes in (f32, f64); throws DTypeError otherwise.
#define DTRAIN_DISPATCH_FLOAT(DTYPE, OPNAME, ...)                                        \
  [&] {                                                                                  \
    switch (DTYPE) {                                                                     \
      case ::dtrain::DType::f32: {                                                       \
        using scalar_t = float;                                                          \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      case ::dtrain::DType::f64: {                                                       \
        using scalar_t = double;                                                         \
        return __VA_ARGS__();                                                            \
      }                                                                                  \
      default:                                                                           \
        DTRAIN_THROW(DTypeError, "{}: unsupported dtype {}", OPNAME, dtype_name(DTYPE)); \
    }                                                                                    \
  }()

}  // namespace dtrain
