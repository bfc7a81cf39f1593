// `dtrain generate` for a char-lstm checkpoint (written by `dtrain train --model
// char-lstm --save FILE`: the model with its cell, shape and tokenizer in the
// metadata). The prompt runs through the network once; then each drawn character is
// fed back with the carried recurrent state (no window: the state is the context).
// The next character is drawn from softmax(logits / temperature) restricted to the
// top-k, with a Generator seeded by --seed, so a run repeats.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace dtrain::cli {

struct CharSampleOptions {
  std::string prompt;
  int64_t length = 300;  // characters to draw
  double temperature = 0.8;
  int64_t top_k = 20;
  uint64_t seed = 1;
};

// extra: the checkpoint's "extra" metadata (model "char-lstm"). Prints the prompt and
// the drawn characters; DataFormatError for incomplete metadata, InvalidArgument for a
// prompt byte outside the checkpoint's alphabet.
int run_char_rnn_generate(const std::string& ckpt, const nlohmann::json& extra,
                          const CharSampleOptions& options);

}  // namespace dtrain::cli
