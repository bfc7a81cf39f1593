// The standard layers: thin Modules over the functional ops in ops.h.
//
// Each layer owns its parameters, initialises them like PyTorch's defaults from an
// explicit Generator& (there is no global RNG), checks its input and throws
// ShapeError/DTypeError naming itself and both shapes ("Linear '9' (576 -> 64):
// expected input [N,576], got [2,1024]"), then calls the functional op, so a layer's
// forward is exactly the op. Layers keep no per-call state except Dropout's
// generator.
//
// Initialisation (as torch.nn):
//   Linear, Conv2d  weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
//                   (kaiming_uniform with a = sqrt(5) reduces to this bound)
//   Embedding       weight ~ N(0, 1)
//   LSTM            every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H))
//   LayerNorm       weight ones, bias zeros
// Parameters are f32. Parameter names follow PyTorch's state_dict keys ("weight",
// "bias", "weight_ih_l0", ...), so weights can be exchanged with PyTorch.
//
// Options follow libtorch: LinearOptions(576, 64).bias(false).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/random.h"

namespace dtrain::nn {

// ---- Linear: y = x W^T + b, x [*, in] ----
class LinearOptions {
 public:
  LinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  LinearOptions& bias(bool on) {
    bias_ = on;
    return *this;
  }
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  bool bias() const { return bias_; }

 private:
  int64_t in_features_, out_features_;
  bool bias_ = true;
};

class Linear : public Module {
 public:
  Linear(const LinearOptions& options, Generator& gen);
  Linear(int64_t in_features, int64_t out_features, Generator& gen)
      : Linear(LinearOptions(in_features, out_features), gen) {}
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  // Draws fresh initial values (PyTorch's defaults, see the file comment).
  void reset_parameters(Generator& gen);
  const LinearOptions& options() const { return options_; }

  Tensor weight;  // [out, in]
  Tensor bias;    // [out] or undefined

 private:
  LinearOptions options_;
};

// ---- Conv2d: x [N, C_in, H, W] -> [N, C_out, H', W'] ----
class Conv2dOptions {
 public:
  Conv2dOptions(int64_t in_channels, int64_t out_channels, int64_t kernel_size)
      : in_(in_channels), out_(out_channels), kernel_(kernel_size) {}
  Conv2dOptions& stride(int64_t s) {
    stride_ = s;
    return *this;
  }
  Conv2dOptions& padding(int64_t p) {
    padding_ = p;
    return *this;
  }
  Conv2dOptions& bias(bool on) {
    bias_ = on;
    return *this;
  }
  // Grouped / depthwise (groups == in_channels): weight [out, in / groups, k, k].
  Conv2dOptions& groups(int64_t g) {
    groups_ = g;
    return *this;
  }
  int64_t groups() const { return groups_; }
  int64_t in_channels() const { return in_; }
  int64_t out_channels() const { return out_; }
  int64_t kernel_size() const { return kernel_; }
  int64_t stride() const { return stride_; }
  int64_t padding() const { return padding_; }
  bool bias() const { return bias_; }

 private:
  int64_t in_, out_, kernel_;
  int64_t stride_ = 1, padding_ = 0;
  bool bias_ = true;
  int64_t groups_ = 1;
};

class Conv2d : public Module {
 public:
  Conv2d(const Conv2dOptions& options, Generator& gen);
  Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel_size, Generator& gen)
      : Conv2d(Conv2dOptions(in_channels, out_channels, kernel_size), gen) {}
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  void reset_parameters(Generator& gen);
  const Conv2dOptions& options() const { return options_; }

  Tensor weight;  // [out, in / groups, k, k]
  Tensor bias;    // [out] or undefined

 private:
  Conv2dOptions options_;
};

// ---- MaxPool2d: x [N, C, H, W]; stride 0 means stride = kernel ----
class MaxPool2d : public Module {
 public:
  explicit MaxPool2d(MaxPool2dOptions options);
  explicit MaxPool2d(int64_t kernel_size) : MaxPool2d(MaxPool2dOptions{kernel_size, 0, 0}) {}
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  const MaxPool2dOptions& options() const { return options_; }

 private:
  MaxPool2dOptions options_;
};

// ---- elementwise activations (any shape) ----
class ReLU : public Module {
 public:
  ReLU() : Module("ReLU") {}
  Tensor forward(const Tensor& x) override;
};

class Tanh : public Module {
 public:
  Tanh() : Module("Tanh") {}
  Tensor forward(const Tensor& x) override;
};

class Sigmoid : public Module {
 public:
  Sigmoid() : Module("Sigmoid") {}
  Tensor forward(const Tensor& x) override;
};

// GELU, tanh approximation (GPT-2; torch.nn.GELU(approximate="tanh")).
class GELU : public Module {
 public:
  GELU() : Module("GELU") {}
  Tensor forward(const Tensor& x) override;
};

// ---- LayerNorm: normalises the last dimension of x [*, dim] (layer_norm in ops.h) ----
// Parameters "weight" (ones) and "bias" (zeros), [dim], as torch.nn.LayerNorm.
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5);
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  void reset_parameters();
  int64_t dim() const { return dim_; }
  double eps() const { return eps_; }

  Tensor weight;  // [dim]
  Tensor bias;    // [dim]

 private:
  int64_t dim_;
  double eps_;
};

// ---- Flatten: merges dims start_dim..end_dim (default: all but the batch dim) ----
class Flatten : public Module {
 public:
  explicit Flatten(int64_t start_dim = 1, int64_t end_dim = -1);
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;

 private:
  int64_t start_dim_, end_dim_;
};

// ---- Dropout: inverted dropout in training mode, identity in eval mode ----
// Owns its Generator, seeded at construction (from a seed, or from the next draw of
// the model's init Generator), so a run is reproducible and the state can be saved
// with generator().get_state().
class Dropout : public Module {
 public:
  Dropout(double p, uint64_t seed);
  Dropout(double p, Generator& gen) : Dropout(p, gen.next_u64()) {}
  Tensor forward(const Tensor& x) override;
  std::string extra_repr() const override;
  double p() const { return p_; }
  Generator& generator() { return gen_; }

 private:
  double p_;
  Generator gen_;
};

// ---- Embedding: indices i64 [*] -> [*, D] ----
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t embedding_dim, Generator& gen);
  Tensor forward(const Tensor& indices) override;
  std::string extra_repr() const override;
  void reset_parameters(Generator& gen);

  Tensor weight;  // [V, D]

 private:
  int64_t num_, dim_;
};

// ---- LSTM: one layer, batch_first, x [B, T, I] ----
class LSTM : public Module {
 public:
  LSTM(int64_t input_size, int64_t hidden_size, Generator& gen);
  // The output sequence [B, T, H] (zero initial state).
  Tensor forward(const Tensor& x) override;
  // Output sequence and final state; h0/c0 [B, H] or undefined (zeros).
  LstmResult forward_full(const Tensor& x, const Tensor& h0 = Tensor(),
                          const Tensor& c0 = Tensor());
  std::string extra_repr() const override;
  void reset_parameters(Generator& gen);
  int64_t input_size() const { return input_; }
  int64_t hidden_size() const { return hidden_; }

  Tensor weight_ih;  // [4H, I], gates i, f, g, o
  Tensor weight_hh;  // [4H, H]
  Tensor bias_ih;    // [4H]
  Tensor bias_hh;    // [4H]

 private:
  int64_t input_, hidden_;
};

// ---- LastTimeStep: [B, T, H] -> [B, H], the last step of a sequence ----
class LastTimeStep : public Module {
 public:
  LastTimeStep() : Module("LastTimeStep") {}
  Tensor forward(const Tensor& x) override;
};

// ---- Sequential: children "0", "1", ... applied in order ----
// A ShapeError/DTypeError from a child that does not name itself (its message lacks
// the child's quoted path) is rethrown with the child's describe() prepended, so
// every shape error from a Sequential says which layer failed.
class Sequential : public Module {
 public:
  Sequential() : Module("Sequential") {}
  Sequential(std::initializer_list<std::shared_ptr<Module>> modules);
  // Appends a child named by its index.
  void push_back(std::shared_ptr<Module> module);
  Tensor forward(const Tensor& x) override;
  size_t size() const { return layers_.size(); }
  const std::shared_ptr<Module>& operator[](size_t i) const;
  template <typename M>
  std::shared_ptr<M> at(size_t i) const {
    return std::dynamic_pointer_cast<M>((*this)[i]);
  }

 protected:
  explicit Sequential(std::string type_name) : Module(std::move(type_name)) {}

 private:
  std::vector<std::shared_ptr<Module>> layers_;
};

}  // namespace dtrain::nn
