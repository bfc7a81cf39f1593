// Multi-layer LSTM / GRU and the character-level language model (nn/recurrent.h).
#include "dtrain/engine/nn/recurrent.h"

#include <fmt/format.h>

#include <cmath>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/ops.h"

namespace dtrain::nn {

namespace {

int64_t gates_of(RnnCell cell) { return cell == RnnCell::kLstm ? 4 : 3; }

void check_state_layers(const std::vector<Tensor>& s, size_t layers, const char* name) {
  DTRAIN_CHECK(s.empty() || s.size() == layers, InvalidArgument,
               "recurrent: state {} has {} layers, the stack has {}", name, s.size(), layers);
}

Tensor layer_state(const std::vector<Tensor>& s, size_t l) { return s.empty() ? Tensor() : s[l]; }

}  // namespace

RnnCell parse_rnn_cell(const std::string& name) {
  if (name == "lstm") return RnnCell::kLstm;
  if (name == "gru") return RnnCell::kGru;
  DTRAIN_THROW(InvalidArgument, "unknown recurrent cell '{}': expected lstm or gru", name);
}

const char* rnn_cell_name(RnnCell cell) { return cell == RnnCell::kLstm ? "lstm" : "gru"; }

RecurrentOutput recurrent_forward(RnnCell cell, const Tensor& x,
                                  const std::vector<RecurrentLayerWeights>& layers,
                                  const RecurrentState& state, double dropout, bool training,
                                  Generator& gen) {
  DTRAIN_CHECK(!layers.empty(), InvalidArgument, "recurrent: no layers");
  check_state_layers(state.h, layers.size(), "h");
  check_state_layers(state.c, layers.size(), "c");
  DTRAIN_CHECK(cell == RnnCell::kLstm || state.c.empty(), InvalidArgument,
               "recurrent: a GRU has no cell state c");
  RecurrentOutput r;
  Tensor seq = x;
  for (size_t l = 0; l < layers.size(); ++l) {
    if (l > 0 && dropout > 0 && training) seq = dtrain::dropout(seq, dropout, true, gen);
    const RecurrentLayerWeights& w = layers[l];
    if (cell == RnnCell::kLstm) {
      LstmResult o = lstm(seq, {w.w_ih, w.w_hh, w.b_ih, w.b_hh}, layer_state(state.h, l),
                          layer_state(state.c, l));
      seq = o.output;
      r.state.h.push_back(o.h_n);
      r.state.c.push_back(o.c_n);
    } else {
      GruResult o = gru(seq, {w.w_ih, w.w_hh, w.b_ih, w.b_hh}, layer_state(state.h, l));
      seq = o.output;
      r.state.h.push_back(o.h_n);
    }
  }
  r.output = seq;
  return r;
}

// ---------------------------------------------------------------- Recurrent

Recurrent::Recurrent(const RecurrentOptions& options, Generator& gen)
    : Module(options.cell == RnnCell::kLstm ? "LSTM" : "GRU"),
      options_(options),
      dropout_gen_(gen.next_u64()) {
  DTRAIN_CHECK(options.input_size > 0 && options.hidden_size > 0 && options.num_layers > 0,
               InvalidArgument, "{}: sizes must be positive, got input {} hidden {} layers {}",
               type_name(), options.input_size, options.hidden_size, options.num_layers);
  DTRAIN_CHECK(options.dropout >= 0 && options.dropout < 1, InvalidArgument,
               "{}: dropout must be in [0, 1), got {}", type_name(), options.dropout);
  const int64_t g = gates_of(options.cell) * options.hidden_size, h = options.hidden_size;
  for (int64_t l = 0; l < options.num_layers; ++l) {
    const int64_t in = l == 0 ? options.input_size : h;
    RecurrentLayerWeights w;
    w.w_ih = register_parameter(fmt::format("weight_ih_l{}", l), empty({g, in}));
    w.w_hh = register_parameter(fmt::format("weight_hh_l{}", l), empty({g, h}));
    w.b_ih = register_parameter(fmt::format("bias_ih_l{}", l), empty({g}));
    w.b_hh = register_parameter(fmt::format("bias_hh_l{}", l), empty({g}));
    layers_.push_back(w);
  }
  reset_parameters(gen);
}

void Recurrent::reset_parameters(Generator& gen) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(options_.hidden_size));
  for (RecurrentLayerWeights& w : layers_) {
    for (Tensor* t : {&w.w_ih, &w.w_hh, &w.b_ih, &w.b_hh}) {
      float* p = t->data<float>();
      for (int64_t i = 0; i < t->numel(); ++i)
        p[i] = static_cast<float>(gen.uniform(-bound, bound));
    }
  }
}

std::string Recurrent::extra_repr() const {
  return fmt::format("{} -> {}, {} layers, dropout {}, batch_first", options_.input_size,
                     options_.hidden_size, options_.num_layers, options_.dropout);
}

RecurrentOutput Recurrent::forward_full(const Tensor& x, const RecurrentState& state) {
  DTRAIN_CHECK(x.defined(), InvalidArgument, "{}: input is undefined", describe());
  DTRAIN_CHECK(
      x.dim() == 3 && x.shape()[2] == options_.input_size && x.shape()[0] > 0 && x.shape()[1] > 0,
      ShapeError, "{}: expected input [B,T,{}] with B,T >= 1, got {}", describe(),
      options_.input_size, shape_str(x.shape()));
  DTRAIN_CHECK(x.dtype() == DType::f32, DTypeError, "{}: expected an f32 input, got {}", describe(),
               dtype_name(x.dtype()));
  return recurrent_forward(options_.cell, x, layers_, state, options_.dropout, is_training(),
                           dropout_gen_);
}

Tensor Recurrent::forward(const Tensor& x) { return forward_full(x).output; }

// ---------------------------------------------------------------- CharRnnLM

std::string CharRnnConfig::str() const {
  return fmt::format("char-{} {}x{} (vocab {}{})", rnn_cell_name(cell), num_layers, hidden_size,
                     vocab_size, dropout > 0 ? fmt::format(", dropout {}", dropout) : "");
}

CharRnnLM::CharRnnLM(const CharRnnConfig& config) : Module("char-rnn"), config_(config) {
  DTRAIN_CHECK(config.vocab_size > 0, InvalidArgument, "char-rnn: vocab_size must be > 0, got {}",
               config.vocab_size);
  Generator gen(config.seed);
  const int64_t h = config.hidden_size;
  embedding_ = register_module("embedding", std::make_shared<Embedding>(config.vocab_size, h, gen));
  RecurrentOptions o{config.cell, h, h, config.num_layers, config.dropout};
  rnn_ = register_module("rnn", std::make_shared<Recurrent>(o, gen));
  head_ = register_module("head", std::make_shared<Linear>(h, config.vocab_size, gen));
}

std::pair<Tensor, RecurrentState> CharRnnLM::step(const Tensor& tokens,
                                                  const RecurrentState& state) {
  DTRAIN_CHECK(tokens.defined() && tokens.dim() == 2 && tokens.dtype() == DType::i64, ShapeError,
               "{}: expected tokens [B,T] i64, got {}", describe(),
               tokens.defined() ? shape_str(tokens.shape()) : "undefined");
  RecurrentOutput r = rnn_->forward_full(embedding_->forward(tokens), state);
  return {head_->forward(r.output), r.state};
}

Tensor CharRnnLM::forward(const Tensor& tokens) { return step(tokens, {}).first; }

Tensor CharRnnLM::loss(const Tensor& tokens, const Tensor& targets) {
  const Tensor logits = forward(tokens);
  return cross_entropy(logits.reshape({-1, config_.vocab_size}), targets.reshape({-1}));
}

}  // namespace dtrain::nn
