// The char-lstm rows of train_throughput: the language model `dtrain train --model
// char-lstm` trains (nn::CharRnnLM: Embedding(V,H) -> 2 x H LSTM or GRU -> Linear(H,V),
// cross-entropy over every position, Adam lr 3e-3), dtrain against PyTorch CPU's same
// model (bench/pytorch_char_lstm.py) in the same run, in tokens/s (B*T per step).
// Random tokens, the peers' protocol: 5 warm-up steps, median of reps x steps.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dtrain/engine/nn/recurrent.h"
#include "dtrain/engine/optim/adam.h"
#include "peer_process.h"

namespace dtrain::bench {

struct CharLstmShape {
  std::string cell = "lstm";
  int64_t vocab = 114, hidden = 128, layers = 2, batch = 32, seq_len = 64;
  std::string str() const {
    return fmt::format("char-{} {}x{}, vocab {}, {} x {} tokens, Adam", cell, layers, hidden, vocab,
                       batch, seq_len);
  }
};

// ms per step and tokens/s, median of reps.
inline std::pair<double, double> bench_char_lstm(const CharLstmShape& s, int steps, int reps) {
  nn::CharRnnConfig c;
  c.vocab_size = s.vocab;
  c.cell = nn::parse_rnn_cell(s.cell);
  c.num_layers = s.layers;
  c.hidden_size = s.hidden;
  nn::CharRnnLM model(c);
  Generator gen(0);
  std::vector<int64_t> xs, ys;
  for (int64_t i = 0; i < s.batch * s.seq_len; ++i) {
    xs.push_back(static_cast<int64_t>(gen.below(static_cast<uint64_t>(s.vocab))));
    ys.push_back(static_cast<int64_t>(gen.below(static_cast<uint64_t>(s.vocab))));
  }
  const Tensor x = from_vector<int64_t>(xs, {s.batch, s.seq_len});
  const Tensor y = from_vector<int64_t>(ys, {s.batch, s.seq_len});
  optim::Adam opt(model.parameters(), optim::AdamOptions(3e-3));
  auto step = [&] {
    opt.zero_grad();
    model.loss(x, y).backward();
    opt.step();
  };
  for (int i = 0; i < 5; ++i) step();
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) step();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                    steps);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  return {med * 1e3, static_cast<double>(s.batch * s.seq_len) / med};
}

// The peer's JSON line (null when python has no torch or the script fails).
inline nlohmann::json run_char_lstm_peer(const std::string& python, const std::string& script,
                                         const CharLstmShape& s, int threads, int steps, int reps) {
  if (python.empty()) return nullptr;
  const std::string cmd = fmt::format(
      "{} {} --cell {} --vocab {} --hidden {} --layers {} --batch {} --seq-len {} --threads {} "
      "--steps {} --reps {} 2>/dev/null",
      python, script, s.cell, s.vocab, s.hidden, s.layers, s.batch, s.seq_len, threads, steps,
      reps);
  int status = 0;
  const std::string out = run_capture(cmd, &status);
  if (status != 0) return nullptr;
  auto j = nlohmann::json::parse(out.substr(0, out.find('\n')), nullptr, false);
  return j.is_discarded() ? nlohmann::json(nullptr) : j;
}

// Times both sides and prints the table's rows with the ratio dtrain / PyTorch.
inline void print_char_lstm_rows(const std::string& python, int threads, int steps, int reps,
                                 bool no_peer) {
  const std::string script = std::string(DTRAIN_SOURCE_DIR) + "/bench/pytorch_char_lstm.py";
  fmt::print("{:<10} {:>14} {:>16} {:>16} {:>18} {:>8}\n", "LM", "dtrain ms/step",
             "dtrain tokens/s", "torch ms/step", "torch tokens/s", "ratio");
  for (const char* cell : {"lstm", "gru"}) {
    CharLstmShape s;
    s.cell = cell;
    const auto [ms, tps] = bench_char_lstm(s, steps, reps);
    const nlohmann::json peer = no_peer
                                    ? nlohmann::json(nullptr)
                                    : run_char_lstm_peer(python, script, s, threads, steps, reps);
    const std::string name = "char-" + s.cell;
    if (peer.is_object()) {
      const double ptps = peer["tokens_per_s"].get<double>();
      fmt::print("{:<10} {:>14.3f} {:>16.1f} {:>16.3f} {:>18.1f} {:>8.2f}\n", name, ms, tps,
                 peer["ms_per_step"].get<double>(), ptps, tps / ptps);
    } else {
      fmt::print("{:<10} {:>14.3f} {:>16.1f} {:>16} {:>18} {:>8}\n", name, ms, tps, "-", "-", "-");
    }
  }
  fmt::print("LM rows: {} (GRU likewise); peer bench/pytorch_char_lstm.py\n",
             CharLstmShape{}.str());
}

}  // namespace dtrain::bench
