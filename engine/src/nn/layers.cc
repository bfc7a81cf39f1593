// The standard layers: input checks that name the layer, PyTorch-default
// initialisation from an explicit Generator, and a call to the functional op.
#include "dtrain/engine/nn/layers.h"

#include <fmt/format.h>

#include <cmath>
#include <string>

#include "dtrain/engine/autograd.h"

namespace dtrain::nn {

namespace {

// Overwrites t (f32, contiguous) with U(lo, hi) draws, in element order.
void fill_uniform(Tensor& t, double lo, double hi, Generator& gen) {
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(gen.uniform(lo, hi));
}

void fill_normal(Tensor& t, Generator& gen) {
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(gen.normal());
}

// PyTorch's bound for Linear/Conv weights and biases: 1/sqrt(fan_in), 0 when empty.
double fan_in_bound(int64_t fan_in) {
  return fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
}

void check_floating_input(const Module& m, const Tensor& x) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "{}: input is undefined", m.describe());
  DTRAIN_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64, DTypeError,
               "{}: expected a floating (f32 or f64) input, got {} {}", m.describe(),
               dtype_name(x.dtype()), shape_str(x.shape()));
}

// Parameters are f32; the input must match them.
void check_matches_params(const Module& m, const Tensor& x, const Tensor& w) {
  check_floating_input(m, x);
  DTRAIN_CHECK(x.dtype() == w.dtype(), DTypeError, "{}: expected a {} input, got {} {}",
               m.describe(), dtype_name(w.dtype()), dtype_name(x.dtype()), shape_str(x.shape()));
}

// True when a message already names the module at `path` ("'0'" or "'0.3'").
bool names_module(const std::string& message, const std::string& path) {
  return message.find("'" + path + "'") != std::string::npos ||
         message.find("'" + path + ".") != std::string::npos;
}

// Rethrows e (a ShapeError, DTypeError or InvalidArgument) with the child's
// describe() in front, keeping the original source location.
template <typename E>
[[noreturn]] void rethrow_naming(const Module& child, const E& e) {
  if (names_module(e.message(), child.name())) throw e;
  const std::string& where = e.where();
  size_t colon = where.rfind(':');
  if (colon == std::string::npos) throw E(child.describe() + ": " + e.message());
  std::string file = where.substr(0, colon);
  int line = std::stoi(where.substr(colon + 1));
  throw E(child.describe() + ": " + e.message(), file.c_str(), line);
}

}  // namespace

// ---------------------------------------------------------------- Linear

Linear::Linear(const LinearOptions& options, Generator& gen) : Module("Linear"), options_(options) {
  DTRAIN_CHECK(options.in_features() >= 0 && options.out_features() >= 0, InvalidArgument,
               "Linear: features must be non-negative, got {} -> {}", options.in_features(),
               options.out_features());
  weight = register_parameter("weight", empty({options.out_features(), options.in_features()}));
  if (options.bias()) bias = register_parameter("bias", empty({options.out_features()}));
  reset_parameters(gen);
}

void Linear::reset_parameters(Generator& gen) {
  double bound = fan_in_bound(options_.in_features());
  fill_uniform(weight, -bound, bound, gen);
  if (bias.defined()) fill_uniform(bias, -bound, bound, gen);
}

std::string Linear::extra_repr() const {
  return fmt::format("{} -> {}{}", options_.in_features(), options_.out_features(),
                     options_.bias() ? "" : ", no bias");
}

Tensor Linear::forward(const Tensor& x) {
  check_matches_params(*this, x, weight);
  DTRAIN_CHECK(x.dim() >= 1 && x.size(-1) == options_.in_features(), ShapeError,
               "{}: expected input [N,{}], got {}", describe(), options_.in_features(),
               shape_str(x.shape()));
  return linear(x, weight, bias);
}

// ---------------------------------------------------------------- Conv2d

Conv2d::Conv2d(const Conv2dOptions& options, Generator& gen) : Module("Conv2d"), options_(options) {
  DTRAIN_CHECK(options.in_channels() > 0 && options.out_channels() > 0 &&
                   options.kernel_size() > 0 && options.stride() > 0 && options.padding() >= 0,
               InvalidArgument,
               "Conv2d: invalid options (in {}, out {}, kernel {}, stride {}, padding {})",
               options.in_channels(), options.out_channels(), options.kernel_size(),
               options.stride(), options.padding());
  DTRAIN_CHECK(options.groups() >= 1 && options.in_channels() % options.groups() == 0 &&
                   options.out_channels() % options.groups() == 0,
               InvalidArgument, "Conv2d: groups {} must divide in channels {} and out channels {}",
               options.groups(), options.in_channels(), options.out_channels());
  int64_t k = options.kernel_size();
  weight = register_parameter(
      "weight", empty({options.out_channels(), options.in_channels() / options.groups(), k, k}));
  if (options.bias()) bias = register_parameter("bias", empty({options.out_channels()}));
  reset_parameters(gen);
}

void Conv2d::reset_parameters(Generator& gen) {
  int64_t k = options_.kernel_size();
  double bound = fan_in_bound(options_.in_channels() / options_.groups() * k * k);
  fill_uniform(weight, -bound, bound, gen);
  if (bias.defined()) fill_uniform(bias, -bound, bound, gen);
}

std::string Conv2d::extra_repr() const {
  return fmt::format("{} -> {}, kernel {}, stride {}, padding {}{}", options_.in_channels(),
                     options_.out_channels(), options_.kernel_size(), options_.stride(),
                     options_.padding(), options_.bias() ? "" : ", no bias") +
         (options_.groups() == 1 ? "" : fmt::format(", groups {}", options_.groups()));
}

Tensor Conv2d::forward(const Tensor& x) {
  check_matches_params(*this, x, weight);
  DTRAIN_CHECK(x.dim() == 4 && x.shape()[1] == options_.in_channels(), ShapeError,
               "{}: expected input [N,{},H,W], got {}", describe(), options_.in_channels(),
               shape_str(x.shape()));
  int64_t min_hw = options_.kernel_size() - 2 * options_.padding();
  DTRAIN_CHECK(x.shape()[2] >= min_hw && x.shape()[3] >= min_hw, ShapeError,
               "{}: expected input [N,{},H,W] with H,W >= {}, got {}", describe(),
               options_.in_channels(), min_hw, shape_str(x.shape()));
  return conv2d(x, weight, bias,
                dtrain::Conv2dOptions{options_.stride(), options_.padding(), options_.groups()});
}

// ---------------------------------------------------------------- MaxPool2d

MaxPool2d::MaxPool2d(MaxPool2dOptions options) : Module("MaxPool2d"), options_(options) {
  if (options_.stride == 0) options_.stride = options_.kernel;
  DTRAIN_CHECK(options_.kernel > 0 && options_.stride > 0 && options_.padding >= 0 &&
                   2 * options_.padding <= options_.kernel,
               InvalidArgument,
               "MaxPool2d: invalid options (kernel {}, stride {}, padding {}; padding must be "
               "at most half the kernel)",
               options_.kernel, options_.stride, options_.padding);
}

std::string MaxPool2d::extra_repr() const {
  return fmt::format("kernel {}, stride {}, padding {}", options_.kernel, options_.stride,
                     options_.padding);
}

Tensor MaxPool2d::forward(const Tensor& x) {
  check_floating_input(*this, x);
  int64_t min_hw = options_.kernel - 2 * options_.padding;
  DTRAIN_CHECK(x.dim() == 4 && x.shape()[2] >= min_hw && x.shape()[3] >= min_hw, ShapeError,
               "{}: expected input [N,C,H,W] with H,W >= {}, got {}", describe(), min_hw,
               shape_str(x.shape()));
  return max_pool2d(x, options_);
}

// ---------------------------------------------------------------- activations

Tensor ReLU::forward(const Tensor& x) {
  check_floating_input(*this, x);
  return relu(x);
}

Tensor Tanh::forward(const Tensor& x) {
  check_floating_input(*this, x);
  return tanh(x);
}

Tensor Sigmoid::forward(const Tensor& x) {
  check_floating_input(*this, x);
  return sigmoid(x);
}

Tensor GELU::forward(const Tensor& x) {
  check_floating_input(*this, x);
  return gelu(x);
}

// ---------------------------------------------------------------- LayerNorm

LayerNorm::LayerNorm(int64_t dim, double eps) : Module("LayerNorm"), dim_(dim), eps_(eps) {
  DTRAIN_CHECK(dim > 0 && eps >= 0, InvalidArgument,
               "LayerNorm: expected dim > 0 and eps >= 0, got dim {} eps {}", dim, eps);
  weight = register_parameter("weight", empty({dim}));
  bias = register_parameter("bias", empty({dim}));
  reset_parameters();
}

void LayerNorm::reset_parameters() {
  weight.detach().fill_(1.0);
  bias.detach().fill_(0.0);
}

std::string LayerNorm::extra_repr() const { return fmt::format("{}, eps {}", dim_, eps_); }

Tensor LayerNorm::forward(const Tensor& x) {
  check_matches_params(*this, x, weight);
  DTRAIN_CHECK(x.dim() >= 1 && x.size(-1) == dim_, ShapeError, "{}: expected input [*,{}], got {}",
               describe(), dim_, shape_str(x.shape()));
  return layer_norm(x, weight, bias, eps_);
}

// ---------------------------------------------------------------- Flatten

Flatten::Flatten(int64_t start_dim, int64_t end_dim)
    : Module("Flatten"), start_dim_(start_dim), end_dim_(end_dim) {}

std::string Flatten::extra_repr() const {
  return fmt::format("start_dim {}, end_dim {}", start_dim_, end_dim_);
}

Tensor Flatten::forward(const Tensor& x) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "{}: input is undefined", describe());
  int64_t n = x.dim();
  int64_t s = start_dim_ < 0 ? start_dim_ + n : start_dim_;
  int64_t e = end_dim_ < 0 ? end_dim_ + n : end_dim_;
  DTRAIN_CHECK(s >= 0 && e < n && s <= e, ShapeError,
               "{}: cannot flatten dims {}..{} of an input with shape {}", describe(), start_dim_,
               end_dim_, shape_str(x.shape()));
  return x.flatten(s, e);
}

// ---------------------------------------------------------------- Dropout

Dropout::Dropout(double p, uint64_t seed) : Module("Dropout"), p_(p), gen_(seed) {
  DTRAIN_CHECK(p >= 0.0 && p < 1.0, InvalidArgument, "Dropout: p must be in [0, 1), got {}", p);
}

std::string Dropout::extra_repr() const { return fmt::format("p={}", p_); }

Tensor Dropout::forward(const Tensor& x) {
  check_floating_input(*this, x);
  return dropout(x, p_, is_training(), gen_);
}

// ---------------------------------------------------------------- Embedding

Embedding::Embedding(int64_t num_embeddings, int64_t embedding_dim, Generator& gen)
    : Module("Embedding"), num_(num_embeddings), dim_(embedding_dim) {
  DTRAIN_CHECK(num_embeddings > 0 && embedding_dim > 0, InvalidArgument,
               "Embedding: sizes must be positive, got {} x {}", num_embeddings, embedding_dim);
  weight = register_parameter("weight", empty({num_embeddings, embedding_dim}));
  reset_parameters(gen);
}

void Embedding::reset_parameters(Generator& gen) { fill_normal(weight, gen); }

std::string Embedding::extra_repr() const { return fmt::format("{}, {}", num_, dim_); }

Tensor Embedding::forward(const Tensor& indices) {
  DTRAIN_CHECK(indices.defined(), InvalidArgument, "{}: input is undefined", describe());
  DTRAIN_CHECK(indices.dtype() == DType::i64, DTypeError,
               "{}: expected i64 token indices, got {} {}", describe(), dtype_name(indices.dtype()),
               shape_str(indices.shape()));
  Tensor idx = indices.contiguous();
  const int64_t* p = idx.data<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    DTRAIN_CHECK(p[i] >= 0 && p[i] < num_, InvalidArgument,
                 "{}: index {} at position {} of input {} is out of range [0,{})", describe(), p[i],
                 i, shape_str(indices.shape()), num_);
  }
  return embedding(weight, idx);
}

// ---------------------------------------------------------------- LSTM

LSTM::LSTM(int64_t input_size, int64_t hidden_size, Generator& gen)
    : Module("LSTM"), input_(input_size), hidden_(hidden_size) {
  DTRAIN_CHECK(input_size > 0 && hidden_size > 0, InvalidArgument,
               "LSTM: sizes must be positive, got input {} hidden {}", input_size, hidden_size);
  weight_ih = register_parameter("weight_ih_l0", empty({4 * hidden_size, input_size}));
  weight_hh = register_parameter("weight_hh_l0", empty({4 * hidden_size, hidden_size}));
  bias_ih = register_parameter("bias_ih_l0", empty({4 * hidden_size}));
  bias_hh = register_parameter("bias_hh_l0", empty({4 * hidden_size}));
  reset_parameters(gen);
}

void LSTM::reset_parameters(Generator& gen) {
  double bound = 1.0 / std::sqrt(static_cast<double>(hidden_));
  for (Tensor* t : {&weight_ih, &weight_hh, &bias_ih, &bias_hh})
    fill_uniform(*t, -bound, bound, gen);
}

std::string LSTM::extra_repr() const {
  return fmt::format("{} -> {}, batch_first", input_, hidden_);
}

LstmResult LSTM::forward_full(const Tensor& x, const Tensor& h0, const Tensor& c0) {
  check_matches_params(*this, x, weight_ih);
  DTRAIN_CHECK(x.dim() == 3 && x.shape()[2] == input_ && x.shape()[0] > 0 && x.shape()[1] > 0,
               ShapeError, "{}: expected input [B,T,{}] with B,T >= 1, got {}", describe(), input_,
               shape_str(x.shape()));
  int64_t batch = x.shape()[0];
  auto check_state = [&](const char* label, const Tensor& s) {
    if (!s.defined()) return;
    DTRAIN_CHECK(s.dim() == 2 && s.shape()[0] == batch && s.shape()[1] == hidden_, ShapeError,
                 "{}: expected {} [{},{}] for input {}, got {}", describe(), label, batch, hidden_,
                 shape_str(x.shape()), shape_str(s.shape()));
    check_matches_params(*this, s, weight_ih);
  };
  check_state("h0", h0);
  check_state("c0", c0);
  return lstm(x, LstmWeights{weight_ih, weight_hh, bias_ih, bias_hh}, h0, c0);
}

Tensor LSTM::forward(const Tensor& x) { return forward_full(x).output; }

// ---------------------------------------------------------------- LastTimeStep

Tensor LastTimeStep::forward(const Tensor& x) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "{}: input is undefined", describe());
  DTRAIN_CHECK(x.dim() == 3 && x.shape()[1] > 0, ShapeError,
               "{}: expected input [B,T,H] with T >= 1, got {}", describe(), shape_str(x.shape()));
  return x.select(1, x.shape()[1] - 1);
}

// ---------------------------------------------------------------- Sequential

Sequential::Sequential(std::initializer_list<std::shared_ptr<Module>> modules)
    : Module("Sequential") {
  for (const auto& m : modules) push_back(m);
}

void Sequential::push_back(std::shared_ptr<Module> module) {
  register_module(std::to_string(layers_.size()), module);
  layers_.push_back(std::move(module));
}

const std::shared_ptr<Module>& Sequential::operator[](size_t i) const {
  DTRAIN_CHECK(i < layers_.size(), InvalidArgument, "{}: index {} out of range (size {})",
               describe(), i, layers_.size());
  return layers_[i];
}

Tensor Sequential::forward(const Tensor& x) {
  Tensor h = x;
  for (const auto& layer : layers_) {
    try {
      h = layer->forward(h);
    } catch (const ShapeError& e) {
      rethrow_naming(*layer, e);
    } catch (const DTypeError& e) {
      rethrow_naming(*layer, e);
    } catch (const InvalidArgument& e) {
      rethrow_naming(*layer, e);
    }
  }
  return h;
}

}  // namespace dtrain::nn
