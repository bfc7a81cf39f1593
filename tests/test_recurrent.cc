// The GRU op and the multi-layer LSTM / GRU stack (nn/recurrent.h).
// Oracles: the plain double-precision reference GRU (cpu/gru_ref.h) for the fast
// kernel; central differences (gradcheck.h) for every gradient; and PyTorch's own
// numbers for torch.nn.LSTM / torch.nn.GRU with num_layers=2 and the same weights
// (fixtures/recurrent_torch.json, written by fixtures/make_recurrent_fixture.py).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cpu/gru_ref.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/recurrent.h"
#include "dtrain/engine/ops_gru.h"
#include "gradcheck.h"

namespace dtrain {
namespace {

using testing::gradcheck;
using testing::max_rel_error;
using testing::randn;

struct GruCase {
  Tensor x, h0;
  GruWeights w;
  std::vector<Tensor> inputs() const { return {x, w.w_ih, w.w_hh, w.b_ih, w.b_hh, h0}; }
};

GruCase make_gru(int64_t b, int64_t t, int64_t i, int64_t h, Generator& gen, DType dt,
                 bool biases = true, bool state = true) {
  const double k = 1.0 / std::sqrt(static_cast<double>(h));
  GruCase c;
  c.x = randn({b, t, i}, gen, dt).set_requires_grad(true);
  c.w.w_ih = testing::uniform({3 * h, i}, gen, -k, k, dt).set_requires_grad(true);
  c.w.w_hh = testing::uniform({3 * h, h}, gen, -k, k, dt).set_requires_grad(true);
  if (biases) {
    c.w.b_ih = testing::uniform({3 * h}, gen, -k, k, dt).set_requires_grad(true);
    c.w.b_hh = testing::uniform({3 * h}, gen, -k, k, dt).set_requires_grad(true);
  }
  if (state) c.h0 = randn({b, h}, gen, dt, 0.5).set_requires_grad(true);
  return c;
}

GruResult run_gru(const std::vector<Tensor>& in) {
  return gru(in[0], {in[1], in[2], in[3], in[4]}, in[5]);
}

TEST(Gru, MatchesReferenceOnOddShapes) {
  Generator gen(3);
  for (DType dt : {DType::f32, DType::f64}) {
    for (bool extras : {true, false}) {
      GruCase c = make_gru(3, 7, 5, 6, gen, dt, extras, extras);
      GruResult r = run_gru(c.inputs());
      GruResult ref = cpu::gru_reference_forward(c.x, c.w, c.h0);
      const double tol = dt == DType::f32 ? 1e-5 : 1e-12;
      EXPECT_LT(max_rel_error(r.output, ref.output), tol) << dtype_name(dt) << " " << extras;
      EXPECT_LT(max_rel_error(r.h_n, ref.h_n), tol) << dtype_name(dt) << " " << extras;
    }
  }
}

TEST(Gradcheck, GruEveryInputThroughEachOutput) {
  Generator gen(4);
  GruCase c = make_gru(3, 4, 3, 5, gen, DType::f64);
  gradcheck(
      "gru through output", [](auto& in) { return run_gru(in).output; }, c.inputs());
  gradcheck(
      "gru through h_n", [](auto& in) { return run_gru(in).h_n; }, c.inputs());
  GruCase bare = make_gru(2, 3, 4, 3, gen, DType::f64, false, false);
  gradcheck(
      "gru, no bias, no h0", [](auto& in) { return run_gru(in).output; }, bare.inputs());
}

TEST(Gru, BadShapesNameTheTensor) {
  Generator gen(5);
  GruCase c = make_gru(2, 3, 4, 3, gen, DType::f32);
  try {
    gru(c.x, {c.w.w_hh, c.w.w_hh, c.w.b_ih, c.w.b_hh}, c.h0);
    FAIL() << "expected a ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("w_ih [9,4]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(gru(c.x, c.w, randn({3, 3}, gen)), ShapeError);
  EXPECT_THROW(gru(c.x.to(DType::f64), c.w, c.h0), DTypeError);
}

// ---------------------------------------------------------------- the stack

// Two layers of random weights in dtype dt (inputs: x, then 4 per layer, then states).
std::vector<Tensor> stack_inputs(nn::RnnCell cell, Generator& gen, int64_t layers) {
  const int64_t B = 2, T = 3, I = 3, H = 4, G = (cell == nn::RnnCell::kLstm ? 4 : 3) * H;
  std::vector<Tensor> in{randn({B, T, I}, gen, DType::f64).set_requires_grad(true)};
  for (int64_t l = 0; l < layers; ++l) {
    for (const Shape& s : {Shape{G, l == 0 ? I : H}, Shape{G, H}, Shape{G}, Shape{G}}) {
      in.push_back(testing::uniform(s, gen, -0.5, 0.5, DType::f64).set_requires_grad(true));
    }
  }
  const int states = cell == nn::RnnCell::kLstm ? 2 : 1;
  for (int64_t k = 0; k < states * layers; ++k) {
    in.push_back(randn({B, H}, gen, DType::f64, 0.5).set_requires_grad(true));
  }
  return in;
}

nn::RecurrentOutput run_stack(nn::RnnCell cell, const std::vector<Tensor>& in, size_t layers) {
  std::vector<nn::RecurrentLayerWeights> w;
  for (size_t l = 0; l < layers; ++l) {
    w.push_back({in[1 + 4 * l], in[2 + 4 * l], in[3 + 4 * l], in[4 + 4 * l]});
  }
  nn::RecurrentState s;
  const size_t first = 1 + 4 * layers;
  for (size_t l = 0; l < layers; ++l) s.h.push_back(in[first + l]);
  if (cell == nn::RnnCell::kLstm) {
    for (size_t l = 0; l < layers; ++l) s.c.push_back(in[first + layers + l]);
  }
  Generator unused(0);
  return nn::recurrent_forward(cell, in[0], w, s, 0.0, true, unused);
}

TEST(Gradcheck, TwoLayerStackEveryInput) {
  for (nn::RnnCell cell : {nn::RnnCell::kLstm, nn::RnnCell::kGru}) {
    Generator gen(6);
    const std::vector<Tensor> in = stack_inputs(cell, gen, 2);
    const std::string name = nn::rnn_cell_name(cell);
    gradcheck(
        name + " x2 through output", [cell](auto& v) { return run_stack(cell, v, 2).output; }, in);
    gradcheck(
        name + " x2 through h_n of layer 0",
        [cell](auto& v) { return run_stack(cell, v, 2).state.h[0]; }, in);
    if (cell == nn::RnnCell::kLstm) {
      gradcheck(
          name + " x2 through c_n of layer 1",
          [cell](auto& v) { return run_stack(cell, v, 2).state.c[1]; }, in);
    }
  }
}

// ---------------------------------------------------------------- PyTorch's numbers

nlohmann::json load_fixture() {
  std::ifstream f(std::string(DTRAIN_TESTS_DIR) + "/fixtures/recurrent_torch.json");
  EXPECT_TRUE(f.good()) << "missing tests/fixtures/recurrent_torch.json";
  return nlohmann::json::parse(f);
}

Tensor tensor_of(const nlohmann::json& j, DType dt = DType::f64) {
  const Tensor t = from_vector<double>(j.at("data").get<std::vector<double>>(),
                                       j.at("shape").get<std::vector<int64_t>>());
  return dt == DType::f64 ? t : t.to(dt);
}

// The [L,B,H] tensor's layer l.
Tensor layer(const nlohmann::json& j, int64_t l) { return tensor_of(j).select(0, l).contiguous(); }

void expect_near(const Tensor& got, const nlohmann::json& want, double tol,
                 const std::string& what) {
  EXPECT_LT(max_rel_error(got, tensor_of(want)), tol) << what;
}

TEST(RecurrentTorch, TwoLayersForwardAndGradientsMatchPyTorch) {
  const nlohmann::json fx = load_fixture();
  for (nn::RnnCell cell : {nn::RnnCell::kLstm, nn::RnnCell::kGru}) {
    const std::string name = nn::rnn_cell_name(cell);
    const nlohmann::json& c = fx.at(name);
    const bool is_lstm = cell == nn::RnnCell::kLstm;
    std::vector<Tensor> in{tensor_of(c["x"]).set_requires_grad(true)};
    for (int l = 0; l < 2; ++l) {
      for (const char* p : {"weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l"}) {
        in.push_back(
            tensor_of(c["param." + std::string(p) + std::to_string(l)]).set_requires_grad(true));
      }
    }
    for (const char* s : {"h0", "c0"}) {
      if (!is_lstm && std::string(s) == "c0") continue;
      for (int l = 0; l < 2; ++l) in.push_back(layer(c[s], l).set_requires_grad(true));
    }
    nn::RecurrentOutput r = run_stack(cell, in, 2);
    expect_near(r.output, c["output"], 1e-12, name + " output");
    Tensor loss = sum(mul(r.output, tensor_of(c["R"])));
    for (int l = 0; l < 2; ++l) {
      EXPECT_LT(max_rel_error(r.state.h[l], layer(c["h_n"], l)), 1e-12) << name << " h_n " << l;
      loss = add(loss, sum(mul(r.state.h[l], layer(c["S"], l))));
      if (is_lstm) {
        EXPECT_LT(max_rel_error(r.state.c[l], layer(c["c_n"], l)), 1e-12) << name << " c_n " << l;
        loss = add(loss, sum(mul(r.state.c[l], layer(c["U"], l))));
      }
    }
    loss.backward();
    expect_near(in[0].grad(), c["grad.x"], 1e-12, name + " grad x");
    int k = 1;
    for (int l = 0; l < 2; ++l) {
      for (const char* p : {"weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l"}) {
        const std::string key = std::string(p) + std::to_string(l);
        expect_near(in[k++].grad(), c["grad." + key], 1e-12, name + " grad " + key);
      }
    }
    for (int l = 0; l < 2; ++l) {
      EXPECT_LT(max_rel_error(in[k++].grad(), layer(c["grad.h0"], l)), 1e-12) << name << " dh0";
    }
    if (is_lstm) {
      for (int l = 0; l < 2; ++l) {
        EXPECT_LT(max_rel_error(in[k++].grad(), layer(c["grad.c0"], l)), 1e-12) << name << " dc0";
      }
    }
  }
}

// The f32 module has torch's state_dict keys and, with torch's weights, its numbers.
TEST(RecurrentTorch, ModuleLoadsTorchStateDict) {
  const nlohmann::json fx = load_fixture();
  for (nn::RnnCell cell : {nn::RnnCell::kLstm, nn::RnnCell::kGru}) {
    const nlohmann::json& c = fx.at(nn::rnn_cell_name(cell));
    Generator gen(7);
    nn::Recurrent m({cell, 4, 3, 2, 0.0}, gen);
    nn::StateDict dict;
    std::vector<std::string> keys;
    for (const auto& [k, v] : m.named_parameters()) keys.push_back(k);
    EXPECT_EQ(keys, c["params"].get<std::vector<std::string>>());
    for (const std::string& k : keys) dict[k] = tensor_of(c["param." + k], DType::f32);
    m.load_state_dict(dict);
    nn::RecurrentState s;
    for (int l = 0; l < 2; ++l) s.h.push_back(layer(c["h0"], l).to(DType::f32));
    if (cell == nn::RnnCell::kLstm) {
      for (int l = 0; l < 2; ++l) s.c.push_back(layer(c["c0"], l).to(DType::f32));
    }
    NoGradGuard no_grad;
    nn::RecurrentOutput r = m.forward_full(tensor_of(c["x"], DType::f32), s);
    EXPECT_LT(max_rel_error(r.output, tensor_of(c["output"])), 1e-5) << nn::rnn_cell_name(cell);
  }
}

TEST(Recurrent, DropoutOnlyBetweenLayersAndOnlyWhenTraining) {
  Generator g1(8), g2(8);
  nn::Recurrent plain({nn::RnnCell::kGru, 3, 4, 2, 0.0}, g1);
  nn::Recurrent dropped({nn::RnnCell::kGru, 3, 4, 2, 0.5}, g2);
  Generator gx(9);
  const Tensor x = randn({2, 5, 3}, gx);
  NoGradGuard no_grad;
  dropped.eval();
  EXPECT_EQ(max_rel_error(dropped.forward(x), plain.forward(x)), 0.0);
  dropped.train();
  EXPECT_GT(max_rel_error(dropped.forward(x), plain.forward(x)), 1e-3);
  nn::Recurrent one({nn::RnnCell::kGru, 3, 4, 1, 0.5}, g1);  // nothing between layers
  Generator g3(10);
  nn::Recurrent one_plain({nn::RnnCell::kGru, 3, 4, 1, 0.0}, g3);
  one_plain.load_state_dict(one.state_dict());
  EXPECT_EQ(max_rel_error(one.forward(x), one_plain.forward(x)), 0.0);
}

TEST(Recurrent, BadInput) {
  EXPECT_THROW(nn::parse_rnn_cell("rnn"), InvalidArgument);
  Generator gen(11);
  nn::Recurrent m({nn::RnnCell::kLstm, 3, 4, 2, 0.0}, gen);
  EXPECT_THROW(m.forward(randn({2, 5, 4}, gen)), ShapeError);
  nn::RecurrentState one_layer{{zeros({2, 4})}, {}};
  EXPECT_THROW(m.forward_full(randn({2, 5, 3}, gen), one_layer), InvalidArgument);
  EXPECT_THROW(nn::Recurrent({nn::RnnCell::kLstm, 3, 4, 2, 1.0}, gen), InvalidArgument);
}

}  // namespace
}  // namespace dtrain
