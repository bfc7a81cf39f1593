// Multi-layer recurrent networks, as torch.nn.LSTM / torch.nn.GRU with num_layers,
// batch_first=True, bias=True, and a character-level language model on top.
//
// Recurrent stacks `num_layers` one-layer ops (lstm in ops.h, gru in ops_gru.h):
// layer l reads layer l-1's output sequence; with dropout p > 0 that sequence goes
// through inverted dropout first, in training mode only, on every layer but the last
// (torch's `dropout` argument). Parameters per layer, with torch's state_dict names
// and order: weight_ih_l{l} [G*H, I_l], weight_hh_l{l} [G*H, H], bias_ih_l{l},
// bias_hh_l{l} [G*H] (G = 4 for LSTM gates i,f,g,o; 3 for GRU gates r,z,n), all
// ~ U(-1/sqrt(H), 1/sqrt(H)) in that order, so weights load from torch directly.
//
// State: one [B,H] tensor per layer (h; and c for an LSTM); an empty state means zeros.
// recurrent_forward() is the functional form (any float dtype, used by gradient checks);
// the module calls it with its f32 parameters.
//
// CharRnnLM: Embedding(V, H) -> Recurrent(H, H, layers) -> Linear(H, V); forward maps
// tokens [B,T] (i64) to logits [B,T,V]; step() carries the state for sampling.
// Dropout draws from the module's own Generator (seeded at construction): a data-
// parallel run with dropout > 0 is not bit-equal to one process, and the generator's
// position is not in checkpoints.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/ops_gru.h"
#include "dtrain/engine/random.h"

namespace dtrain::nn {

enum class RnnCell { kLstm, kGru };
// "lstm" | "gru"; anything else is InvalidArgument naming it and the choices.
RnnCell parse_rnn_cell(const std::string& name);
const char* rnn_cell_name(RnnCell cell);

struct RecurrentState {
  std::vector<Tensor> h;  // per layer [B,H]; empty: zeros
  std::vector<Tensor> c;  // LSTM only, per layer [B,H]; empty: zeros
};
struct RecurrentOutput {
  Tensor output;  // last layer's sequence [B,T,H]
  RecurrentState state;
};
struct RecurrentLayerWeights {
  Tensor w_ih, w_hh, b_ih, b_hh;
};

// The stack over `layers` (at least one). gen is only drawn from when dropout > 0 and
// training. Throws InvalidArgument for a state whose layer count does not match.
RecurrentOutput recurrent_forward(RnnCell cell, const Tensor& x,
                                  const std::vector<RecurrentLayerWeights>& layers,
                                  const RecurrentState& state, double dropout, bool training,
                                  Generator& gen);

struct RecurrentOptions {
  RnnCell cell = RnnCell::kLstm;
  int64_t input_size = 0, hidden_size = 0, num_layers = 1;
  double dropout = 0.0;  // between layers, in [0, 1)
};

class Recurrent : public Module {
 public:
  Recurrent(const RecurrentOptions& options, Generator& gen);
  Tensor forward(const Tensor& x) override;  // the output sequence, zero initial state
  RecurrentOutput forward_full(const Tensor& x, const RecurrentState& state = {});
  std::string extra_repr() const override;
  void reset_parameters(Generator& gen);
  const RecurrentOptions& options() const { return options_; }
  const std::vector<RecurrentLayerWeights>& layers() const { return layers_; }

 private:
  RecurrentOptions options_;
  std::vector<RecurrentLayerWeights> layers_;
  Generator dropout_gen_;
};

struct CharRnnConfig {
  int64_t vocab_size = 0;
  RnnCell cell = RnnCell::kLstm;
  int64_t num_layers = 2, hidden_size = 256;
  double dropout = 0.0;
  uint64_t seed = 1;
  std::string str() const;  // "char-lstm 2x256 (vocab 96)"
};

class CharRnnLM : public Module {
 public:
  explicit CharRnnLM(const CharRnnConfig& config);
  // tokens [B,T] i64 -> logits [B,T,V].
  Tensor forward(const Tensor& tokens) override;
  // Logits [B,T,V] and the state after the last token, from `state` (empty: zeros).
  std::pair<Tensor, RecurrentState> step(const Tensor& tokens, const RecurrentState& state);
  // Mean cross-entropy (nats per token) of predicting targets [B,T] from tokens [B,T].
  Tensor loss(const Tensor& tokens, const Tensor& targets);
  const CharRnnConfig& config() const { return config_; }

 private:
  CharRnnConfig config_;
  std::shared_ptr<Embedding> embedding_;
  std::shared_ptr<Recurrent> rnn_;
  std::shared_ptr<Linear> head_;
};

}  // namespace dtrain::nn
