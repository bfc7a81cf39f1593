// `dtrain generate`: samples text from a GPT checkpoint written by
// `dtrain train --model gpt --save FILE` (the gathered, single-device model with its
// shape and tokenizer in the metadata). Autoregressive: the last block_size tokens
// go through the model, the next token is drawn from softmax(logits / temperature)
// restricted to the top-k, until --tokens are drawn. Seeded, so a run repeats.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "char_rnn_generate.h"
#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/data/text.h"
#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/serialize.h"

namespace dtrain::cli {

namespace {

struct GenerateOptions {
  std::string ckpt;
  std::string prompt = "\n";
  int64_t tokens = 300;
  double temperature = 0.8;
  int64_t top_k = 20;
  uint64_t seed = 1;
};

nn::GptConfig config_of(const nlohmann::json& extra, const std::string& path) {
  DTRAIN_CHECK(extra.value("model", "") == "gpt", DataFormatError,
               "{}: not a GPT or char-lstm checkpoint (model '{}'); write one with dtrain train "
               "--model gpt|char-lstm --save",
               path, extra.value("model", ""));
  nn::GptConfig c;
  try {
    c.vocab_size = extra.at("vocab_size");
    c.block_size = extra.at("block_size");
    c.n_layer = extra.at("n_layer");
    c.n_head = extra.at("n_head");
    c.n_embd = extra.at("n_embd");
  } catch (const nlohmann::json::exception& e) {
    throw DataFormatError(fmt::format("{}: GPT metadata incomplete: {}", path, e.what()));
  }
  return c;
}

// Draws the next token from the last position's logits (ids >= real vocab never).
int32_t sample(const Tensor& logits, int64_t real_vocab, const GenerateOptions& o, Generator& gen) {
  const int64_t t = logits.size(1) - 1, v = std::min(real_vocab, logits.size(2));
  const Tensor row = logits.select(0, 0).select(0, t).contiguous();
  std::vector<std::pair<double, int32_t>> cand;
  for (int64_t i = 0; i < v; ++i) {
    cand.push_back({row.data<float>()[i] / o.temperature, static_cast<int32_t>(i)});
  }
  const size_t k = static_cast<size_t>(std::clamp<int64_t>(o.top_k, 1, v));
  std::partial_sort(cand.begin(), cand.begin() + static_cast<long>(k), cand.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  cand.resize(k);
  double total = 0;
  for (auto& c : cand) total += (c.first = std::exp(c.first - cand[0].first));
  double u = gen.uniform() * total;
  for (const auto& c : cand) {
    if ((u -= c.first) <= 0) return c.second;
  }
  return cand.back().second;
}

int run_generate(const GenerateOptions& o) {
  DTRAIN_CHECK(o.temperature > 0, InvalidArgument, "--temperature must be > 0, got {}",
               o.temperature);
  const Archive archive = load_archive(o.ckpt);
  const nlohmann::json extra = archive.metadata.value("extra", nlohmann::json::object());
  if (extra.value("model", "") == "char-lstm") {
    return run_char_rnn_generate(o.ckpt, extra,
                                 {o.prompt, o.tokens, o.temperature, o.top_k, o.seed});
  }
  nn::Gpt model(config_of(extra, o.ckpt));
  load_checkpoint(o.ckpt, model, nullptr);
  model.eval();
  const auto bytes = extra.at("tokenizer_bytes").get<std::vector<uint8_t>>();
  data::CharTokenizer tok(bytes);
  std::vector<int32_t> ids = tok.encode(o.prompt);
  DTRAIN_CHECK(!ids.empty(), InvalidArgument, "--prompt must not be empty");
  Generator gen(o.seed);
  NoGradGuard no_grad;
  const int64_t ctx = model.config().block_size;
  for (int64_t n = 0; n < o.tokens; ++n) {
    const int64_t len = std::min<int64_t>(ctx, static_cast<int64_t>(ids.size()));
    std::vector<int64_t> window(ids.end() - len, ids.end());
    Tensor x = from_vector<int64_t>(window, {1, len});
    ids.push_back(sample(model.forward(x), tok.vocab_size(), o, gen));
  }
  fmt::print("{}\n", tok.decode(ids));
  return 0;
}

}  // namespace

Command add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* g = app.add_subcommand("generate", "Sample text from a GPT or char-lstm checkpoint");
  g->add_option("--ckpt", o->ckpt,
                "Checkpoint written by dtrain train --model gpt|char-lstm --save")
      ->required();
  g->add_option("--prompt", o->prompt, "Text to continue")->capture_default_str();
  g->add_option("--tokens,--length", o->tokens, "Tokens (characters) to draw")
      ->capture_default_str()
      ->check(kPositive);
  g->add_option("--temperature", o->temperature, "Softmax temperature")->capture_default_str();
  g->add_option("--top-k", o->top_k, "Draw among the k likeliest")->capture_default_str();
  g->add_option("--seed", o->seed, "Sampling seed")->capture_default_str();
  return {g, [o] { return run_generate(*o); }};
}

}  // namespace dtrain::cli
