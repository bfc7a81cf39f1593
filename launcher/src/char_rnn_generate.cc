// `dtrain generate` for a char-lstm checkpoint (see char_rnn_generate.h).
#include "char_rnn_generate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/data/text.h"
#include "dtrain/engine/nn/recurrent.h"
#include "dtrain/engine/serialize.h"

namespace dtrain::cli {

namespace {

nn::CharRnnConfig config_of(const nlohmann::json& extra, const std::string& path) {
  nn::CharRnnConfig c;
  try {
    c.cell = nn::parse_rnn_cell(extra.at("cell").get<std::string>());
    c.vocab_size = extra.at("vocab_size");
    c.num_layers = extra.at("num_layers");
    c.hidden_size = extra.at("hidden_size");
    c.dropout = extra.at("dropout");
  } catch (const nlohmann::json::exception& e) {
    throw DataFormatError(fmt::format("{}: char-lstm metadata incomplete: {}", path, e.what()));
  }
  return c;
}

// Draws from the last position of logits [1,T,V].
int32_t sample_last(const Tensor& logits, const CharSampleOptions& o, Generator& gen) {
  const Tensor row = logits.select(0, 0).select(0, logits.size(1) - 1).contiguous();
  const int64_t v = row.numel();
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

}  // namespace

int run_char_rnn_generate(const std::string& ckpt, const nlohmann::json& extra,
                          const CharSampleOptions& o) {
  nn::CharRnnLM model(config_of(extra, ckpt));
  load_checkpoint(ckpt, model, nullptr);
  model.eval();
  const auto bytes = extra.at("tokenizer_bytes").get<std::vector<uint8_t>>();
  const data::CharTokenizer tok(bytes);
  std::vector<int32_t> ids = tok.encode(o.prompt);
  DTRAIN_CHECK(!ids.empty(), InvalidArgument, "--prompt must not be empty");
  Generator gen(o.seed);
  NoGradGuard no_grad;
  std::vector<int64_t> feed(ids.begin(), ids.end());
  nn::RecurrentState state;
  for (int64_t n = 0; n < o.length; ++n) {
    auto [logits, next] =
        model.step(from_vector<int64_t>(feed, {1, static_cast<int64_t>(feed.size())}), state);
    state = std::move(next);
    ids.push_back(sample_last(logits, o, gen));
    feed = {ids.back()};
  }
  fmt::print("{}\n", tok.decode(ids));
  return 0;
}

}  // namespace dtrain::cli
