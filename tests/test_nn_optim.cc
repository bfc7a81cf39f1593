// nn::Module and layers, reference models, optimizers, LR schedules, the tensor
// archive and checkpoints.
//
// Oracles: layers against the functional ops they wrap (bit-equal); optimizers
// against the torch.optim update formulas re-implemented here in double; schedules
// against their closed forms; archives and checkpoints against the tensors that
// went in (bit-equal) and against deliberately damaged files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "dtrain/engine/autograd.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/nn/module.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/serialize.h"
#include "gradcheck.h"

namespace dtrain {
namespace {

using testing::randn;

// ---------------------------------------------------------------- helpers

bool bit_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.raw_data(), cb.raw_data(), ca.nbytes()) == 0;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::path(::testing::TempDir()) /
          ("dtrain_nn_optim_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// Runs f, expects it to throw E, and returns the message.
template <typename E>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.message();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a different error: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << (haystack)

// ---------------------------------------------------------------- layers

TEST(Layers, LinearEqualsFunctional) {
  Generator gen(1);
  nn::Linear fc(5, 3, gen);
  Tensor x = randn({4, 5}, gen);
  EXPECT_TRUE(bit_equal(fc.forward(x), linear(x, fc.weight, fc.bias)));
  nn::Linear nobias(nn::LinearOptions(5, 3).bias(false), gen);
  EXPECT_FALSE(nobias.bias.defined());
  EXPECT_EQ(nobias.named_parameters().size(), 1u);
  EXPECT_TRUE(bit_equal(nobias.forward(x), linear(x, nobias.weight, Tensor())));
}

TEST(Layers, ConvPoolActivationsEqualFunctional) {
  Generator gen(2);
  nn::Conv2d conv(nn::Conv2dOptions(3, 4, 3).stride(2).padding(1), gen);
  Tensor x = randn({2, 3, 9, 9}, gen);
  EXPECT_TRUE(bit_equal(conv.forward(x), conv2d(x, conv.weight, conv.bias, Conv2dOptions{2, 1})));
  nn::MaxPool2d pool(2);
  EXPECT_TRUE(bit_equal(pool.forward(x), max_pool2d(x, MaxPool2dOptions{2, 2, 0})));
  EXPECT_TRUE(bit_equal(nn::ReLU().forward(x), relu(x)));
  EXPECT_TRUE(bit_equal(nn::Tanh().forward(x), tanh(x)));
  EXPECT_TRUE(bit_equal(nn::Sigmoid().forward(x), sigmoid(x)));
  EXPECT_EQ(nn::Flatten().forward(x).shape(), (Shape{2, 243}));
  EXPECT_EQ(nn::Flatten(2).forward(x).shape(), (Shape{2, 3, 81}));
}

TEST(Layers, EmbeddingLstmDropoutEqualFunctional) {
  Generator gen(3);
  nn::Embedding emb(10, 4, gen);
  Tensor idx = from_vector<int64_t>({1, 9, 0, 3, 3, 7}, {2, 3});
  EXPECT_TRUE(bit_equal(emb.forward(idx), embedding(emb.weight, idx)));

  nn::LSTM lstm_layer(4, 5, gen);
  Tensor x = randn({2, 3, 4}, gen);
  Tensor h0 = randn({2, 5}, gen), c0 = randn({2, 5}, gen);
  LstmResult got = lstm_layer.forward_full(x, h0, c0);
  LstmResult want = lstm(x,
                         LstmWeights{lstm_layer.weight_ih, lstm_layer.weight_hh, lstm_layer.bias_ih,
                                     lstm_layer.bias_hh},
                         h0, c0);
  EXPECT_TRUE(bit_equal(got.output, want.output));
  EXPECT_TRUE(bit_equal(got.h_n, want.h_n));
  EXPECT_TRUE(bit_equal(got.c_n, want.c_n));
  EXPECT_TRUE(bit_equal(lstm_layer.forward(x),
                        lstm(x, LstmWeights{lstm_layer.weight_ih, lstm_layer.weight_hh,
                                            lstm_layer.bias_ih, lstm_layer.bias_hh})
                            .output));
  // PyTorch's state_dict names, so weights can be exchanged.
  std::vector<std::string> names;
  for (auto& [n, t] : lstm_layer.named_parameters()) names.push_back(n);
  EXPECT_EQ(names,
            (std::vector<std::string>{"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"}));
  EXPECT_EQ(lstm_layer.weight_ih.shape(), (Shape{20, 4}));

  nn::Dropout drop(0.5, uint64_t{77});
  Tensor d = randn({4, 8}, gen);
  Generator same(77);
  EXPECT_TRUE(bit_equal(drop.forward(d), dropout(d, 0.5, true, same)));
  drop.eval();
  EXPECT_TRUE(bit_equal(drop.forward(d), d));
  EXPECT_THROW(nn::Dropout(1.0, uint64_t{1}), InvalidArgument);
}

TEST(Layers, InitialisationFollowsPyTorchDefaults) {
  Generator gen(4);
  auto check_uniform = [](const Tensor& t, double bound, const std::string& what) {
    std::vector<float> v = t.to_vector<float>();
    double lo = 1e9, hi = -1e9, mean = 0;
    for (float f : v) {
      lo = std::min<double>(lo, f);
      hi = std::max<double>(hi, f);
      mean += f;
    }
    mean /= static_cast<double>(v.size());
    EXPECT_GE(lo, -bound) << what;
    EXPECT_LE(hi, bound) << what;
    EXPECT_LT(lo, -0.9 * bound) << what;  // actually spans the range
    EXPECT_GT(hi, 0.9 * bound) << what;
    EXPECT_LT(std::abs(mean), 0.1 * bound) << what;
  };
  nn::Linear fc(400, 300, gen);
  check_uniform(fc.weight, 1.0 / std::sqrt(400.0), "linear weight");
  check_uniform(fc.bias, 1.0 / std::sqrt(400.0), "linear bias");
  nn::Conv2d conv(16, 32, 3, gen);
  check_uniform(conv.weight, 1.0 / std::sqrt(16.0 * 9.0), "conv weight");
  check_uniform(conv.bias, 1.0 / std::sqrt(16.0 * 9.0), "conv bias");
  nn::LSTM lstm_layer(10, 64, gen);
  for (const Tensor& p : lstm_layer.parameters()) check_uniform(p, 1.0 / 8.0, "lstm");
  nn::Embedding emb(200, 50, gen);
  std::vector<float> e = emb.weight.to_vector<float>();
  double mean = 0, var = 0;
  for (float f : e) mean += f;
  mean /= static_cast<double>(e.size());
  for (float f : e) var += (f - mean) * (f - mean);
  var /= static_cast<double>(e.size());
  EXPECT_LT(std::abs(mean), 0.05);
  EXPECT_NEAR(var, 1.0, 0.05);
  // Same seed, same weights.
  Generator g1(9), g2(9);
  EXPECT_TRUE(bit_equal(nn::Linear(7, 3, g1).weight, nn::Linear(7, 3, g2).weight));
}

TEST(Layers, ShapeErrorsNameTheLayerAndBothShapes) {
  Generator gen(5);
  nn::Linear fc(576, 64, gen);
  EXPECT_EQ(error_of<ShapeError>([&] {
              fc.forward(zeros({64, 1024}));
            }),
            "Linear (576 -> 64): expected input [N,576], got [64,1024]");
  nn::Conv2d conv(1, 32, 3, gen);
  std::string m = error_of<ShapeError>([&] { conv.forward(zeros({2, 3, 28, 28})); });
  EXPECT_CONTAINS(m, "Conv2d (1 -> 32");
  EXPECT_CONTAINS(m, "[N,1,H,W]");
  EXPECT_CONTAINS(m, "[2,3,28,28]");
  m = error_of<ShapeError>([&] { conv.forward(zeros({2, 1, 2, 28})); });
  EXPECT_CONTAINS(m, "H,W >= 3");
  nn::LSTM lstm_layer(8, 4, gen);
  m = error_of<ShapeError>([&] { lstm_layer.forward(zeros({2, 5, 7})); });
  EXPECT_CONTAINS(m, "LSTM (8 -> 4");
  EXPECT_CONTAINS(m, "[B,T,8]");
  EXPECT_CONTAINS(m, "[2,5,7]");
  m = error_of<ShapeError>([&] { lstm_layer.forward_full(zeros({2, 5, 8}), zeros({3, 4})); });
  EXPECT_CONTAINS(m, "expected h0 [2,4]");
  EXPECT_CONTAINS(m, "[3,4]");
  nn::Embedding emb(10, 4, gen);
  m = error_of<DTypeError>([&] { emb.forward(zeros({2, 3})); });
  EXPECT_CONTAINS(m, "Embedding (10, 4): expected i64 token indices, got f32 [2,3]");
  m = error_of<InvalidArgument>([&] { emb.forward(from_vector<int64_t>({1, 10}, {2})); });
  EXPECT_CONTAINS(m, "index 10");
  EXPECT_CONTAINS(m, "[0,10)");
  m = error_of<ShapeError>([&] { nn::MaxPool2d(2).forward(zeros({2, 3, 4})); });
  EXPECT_CONTAINS(m, "MaxPool2d");
  EXPECT_CONTAINS(m, "[2,3,4]");
}

// A layer that does not name itself in its errors: Sequential names it.
struct Bare : nn::Module {
  Bare() : Module("Bare") { w = register_parameter("w", zeros({3, 4})); }
  Tensor forward(const Tensor& x) override { return linear(x, w, Tensor()); }
  Tensor w;
};

TEST(Layers, SequentialNamesChildrenAndWrapsTheirErrors) {
  Generator gen(6);
  auto inner = std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
      std::make_shared<nn::Linear>(4, 4, gen), std::make_shared<Bare>()});
  nn::Sequential seq{std::make_shared<nn::Linear>(3, 4, gen), std::make_shared<nn::ReLU>(), inner};
  std::vector<std::string> names;
  for (auto& [n, t] : seq.named_parameters()) names.push_back(n);
  EXPECT_EQ(names,
            (std::vector<std::string>{"0.weight", "0.bias", "2.0.weight", "2.0.bias", "2.1.w"}));
  EXPECT_EQ(seq[2]->name(), "2");
  EXPECT_EQ(inner->at<nn::Linear>(0)->name(), "2.0");
  EXPECT_EQ(inner->at<nn::Linear>(0)->describe(), "Linear '2.0' (4 -> 4)");
  EXPECT_EQ(seq.at<nn::ReLU>(0), nullptr);  // child 0 is a Linear
  EXPECT_EQ(seq.num_parameters(), 3 * 4 + 4 + 16 + 4 + 12);
  EXPECT_CONTAINS(seq.str(), "(2): Sequential");
  EXPECT_CONTAINS(seq.str(), "(0): Linear(4 -> 4)");

  // The Linear names itself: its message is passed through unchanged.
  EXPECT_EQ(error_of<ShapeError>([&] {
              seq.forward(zeros({2, 5}));
            }),
            "Linear '0' (3 -> 4): expected input [N,3], got [2,5]");
  // Bare does not: the Sequential puts its name in front of the op's message.
  nn::Sequential seq2{std::make_shared<nn::ReLU>(), std::make_shared<Bare>()};
  std::string m = error_of<ShapeError>([&] { seq2.forward(zeros({2, 5})); });
  EXPECT_EQ(m.rfind("Bare '1': linear:", 0), 0u) << m;
  EXPECT_CONTAINS(m, "[2,5]");

  // Registration rules.
  EXPECT_THROW(seq.register_parameter("a.b", zeros({1})), InvalidArgument);
  EXPECT_THROW(seq.register_buffer("0", zeros({1})), InvalidArgument);
  EXPECT_THROW(seq.register_parameter("idx", zeros({1}, TensorOptions{}.with_dtype(DType::i64))),
               DTypeError);
}

TEST(Module, ModesGradsAndFreezing) {
  Generator gen(7);
  auto model = nn::make_model("mlp", gen);
  EXPECT_TRUE(model->is_training());
  model->eval();
  for (auto& c : model->children()) EXPECT_FALSE(c->is_training());
  model->train();
  for (auto& c : model->children()) EXPECT_TRUE(c->is_training());

  nn::Batch b = nn::make_random_batch("mlp", 4, gen);
  cross_entropy(model->forward(b.input), b.target).backward();
  for (const Tensor& p : model->parameters()) EXPECT_TRUE(p.grad().defined());
  model->zero_grad();
  for (const Tensor& p : model->parameters()) EXPECT_FALSE(p.grad().defined());

  cross_entropy(model->forward(b.input), b.target).backward();
  auto first = model->at<nn::Linear>(1);
  first->set_requires_grad(false);  // also drops the existing gradient
  EXPECT_FALSE(first->weight.grad().defined());
  EXPECT_FALSE(first->weight.requires_grad());
  model->zero_grad();
  cross_entropy(model->forward(b.input), b.target).backward();
  EXPECT_FALSE(first->weight.grad().defined());
  EXPECT_FALSE(first->bias.grad().defined());
  EXPECT_TRUE(model->at<nn::Linear>(3)->weight.grad().defined());

  // Buffers are saved but not trained.
  nn::Sequential s;
  s.register_buffer("running", full({2}, 3.0));
  EXPECT_EQ(s.parameters().size(), 0u);
  EXPECT_EQ(s.state_dict().count("running"), 1u);
}

// ---------------------------------------------------------------- models

TEST(Models, EveryModelRunsForwardAndBackward) {
  EXPECT_EQ(nn::model_names(),
            (std::vector<std::string>{"seed-cnn", "mlp", "seed-lstm", "mobilenet"}));
  for (const std::string& name : nn::model_names()) {
    Generator gen(8);
    auto model = nn::make_model(name, gen);
    const nn::ModelInfo& info = nn::model_info(name);
    nn::Batch b = nn::make_random_batch(name, 3, gen);
    EXPECT_EQ(b.input.dtype(), info.input_dtype) << name;
    EXPECT_EQ(b.target.shape(), (Shape{3})) << name;
    Tensor out = model->forward(b.input);
    EXPECT_EQ(out.shape(), (Shape{3, info.num_classes})) << name;
    cross_entropy(out, b.target).backward();
    for (auto& [pname, p] : model->named_parameters()) {
      ASSERT_TRUE(p.grad().defined()) << name << " " << pname;
      EXPECT_EQ(p.grad().shape(), p.shape()) << name << " " << pname;
    }
  }
  Generator gen(8);
  EXPECT_EQ(
      nn::make_model("seed-cnn", gen)->num_parameters(),
      (32 * 9 + 32) + (64 * 32 * 9 + 64) + (64 * 64 * 9 + 64) + (576 * 64 + 64) + (64 * 10 + 10));
  // mlp also takes images.
  auto mlp = nn::make_model("mlp", gen);
  EXPECT_EQ(mlp->forward(zeros({2, 1, 28, 28})).shape(), (Shape{2, 10}));
  std::string m = error_of<InvalidArgument>([&] { nn::make_model("resnet", gen); });
  EXPECT_CONTAINS(m, "unknown model 'resnet'");
  EXPECT_CONTAINS(m, "seed-cnn, mlp, seed-lstm");
}

TEST(Models, ShapeErrorsNameTheLayerBothShapesAndTheModelInput) {
  Generator gen(9);
  auto cnn = nn::make_model("seed-cnn", gen);
  std::string m = error_of<ShapeError>([&] { cnn->forward(zeros({2, 1, 30, 30})); });
  EXPECT_CONTAINS(m, "Linear '9' (576 -> 64): expected input [N,576], got [2,1024]");
  EXPECT_CONTAINS(m, "seed-cnn expects input f32 [B,1,28,28], got f32 [2,1,30,30]");
  m = error_of<ShapeError>([&] { cnn->forward(zeros({2, 3, 28, 28})); });
  EXPECT_CONTAINS(m, "Conv2d '0' (1 -> 32, kernel 3, stride 1, padding 0)");
  EXPECT_CONTAINS(m, "[2,3,28,28]");
  m = error_of<ShapeError>([&] { cnn->forward(zeros({2, 28, 28})); });
  EXPECT_CONTAINS(m, "Conv2d '0'");
  EXPECT_CONTAINS(m, "[2,28,28]");
  auto mlp = nn::make_model("mlp", gen);
  m = error_of<ShapeError>([&] { mlp->forward(zeros({2, 100})); });
  EXPECT_CONTAINS(m, "Linear '1' (784 -> 256): expected input [N,784], got [2,100]");
  auto rnn = nn::make_model("seed-lstm", gen);
  m = error_of<DTypeError>([&] { rnn->forward(zeros({2, 20})); });
  EXPECT_CONTAINS(m, "Embedding '0'");
  EXPECT_CONTAINS(m, "seed-lstm expects input i64 tokens [B,20]");
}

// ---------------------------------------------------------------- archive

TEST(Archive, Crc32KnownValues) {
  EXPECT_EQ(crc32("123456789", 9), 0xCBF43926u);
  EXPECT_EQ(crc32("", 0), 0u);
  // Incremental over pieces equals one pass (exercises the 8-byte and tail paths).
  std::string s = "The quick brown fox jumps over the lazy dog";
  EXPECT_EQ(crc32(s.data(), s.size()), 0x414FA339u);
  EXPECT_EQ(crc32(s.data() + 13, s.size() - 13, crc32(s.data(), 13)), 0x414FA339u);
}

TEST(Archive, RoundTripIsBitExact) {
  Generator gen(10);
  TensorMap in;
  in["a.f32"] = randn({3, 5}, gen);
  in["b.f64"] = randn({2, 2, 2}, gen, DType::f64);
  in["c.i64"] = from_vector<int64_t>({-1, 0, 1LL << 40}, {3});
  in["d.i32"] = from_vector<int32_t>({7, -7}, {2, 1});
  in["e.u8"] = from_vector<uint8_t>({0, 255, 3}, {3});
  in["f.f16"] = randn({5}, gen).to(DType::f16);
  in["g.bf16"] = randn({5}, gen).to(DType::bf16);
  in["h.scalar"] = scalar_tensor(2.5);
  in["i.empty"] = zeros({0, 4});
  in["j.transposed"] = randn({3, 4}, gen).t();  // saved contiguous
  nlohmann::json meta = {{"step", 42}, {"note", "hello"}};
  std::string path = temp_path("roundtrip.dtrn");
  save_archive(path, in, meta);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  Archive out = load_archive(path);
  EXPECT_EQ(out.metadata, meta);
  ASSERT_EQ(out.tensors.size(), in.size());
  for (const auto& [name, t] : in) {
    ASSERT_EQ(out.tensors.count(name), 1u) << name;
    EXPECT_TRUE(bit_equal(out.tensors.at(name), t)) << name;
  }
  std::filesystem::remove(path);
}

TEST(Archive, DamagedFilesAreRejectedWithTheReason) {
  Generator gen(11);
  TensorMap in{{"w", randn({16, 16}, gen)}, {"b", randn({16}, gen)}};
  std::string path = temp_path("good.dtrn");
  save_archive(path, in);
  const std::vector<unsigned char> good = read_bytes(path);
  std::string bad = temp_path("bad.dtrn");

  // A flipped bit in the payload, and one in the header.
  std::vector<unsigned char> bytes = good;
  bytes[bytes.size() - 5] ^= 0x10;
  write_bytes(bad, bytes);
  std::string m = error_of<DataFormatError>([&] { load_archive(bad); });
  EXPECT_CONTAINS(m, "checksum mismatch");
  EXPECT_CONTAINS(m, bad);
  bytes = good;
  bytes[40] ^= 0x01;
  write_bytes(bad, bytes);
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { load_archive(bad); }), "checksum mismatch");

  // Truncated: in the data, and inside the prefix.
  write_bytes(bad, std::vector<unsigned char>(good.begin(), good.end() - 100));
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { load_archive(bad); }), "truncated");
  write_bytes(bad, std::vector<unsigned char>(good.begin(), good.begin() + 20));
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { load_archive(bad); }), "truncated");
  bytes = good;
  bytes.push_back(0);
  write_bytes(bad, bytes);
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { load_archive(bad); }), "trailing");

  // Not an archive at all.
  bytes = good;
  bytes[0] = 'X';
  write_bytes(bad, bytes);
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { load_archive(bad); }), "bad magic");
  // A newer format version.
  bytes = good;
  bytes[4] = 99;
  write_bytes(bad, bytes);
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { load_archive(bad); }), "format version 99");

  // An unknown dtype with a valid checksum: edit the header, re-sign it.
  bytes = good;
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(bytes[8 + i]) << (8 * i);
  std::string header(bytes.begin() + 32, bytes.begin() + 32 + static_cast<long>(header_len));
  size_t at = header.find("\"dtype\":\"f32\"");
  ASSERT_NE(at, std::string::npos) << header;
  header.replace(at, 13, "\"dtype\":\"q32\"");
  std::copy(header.begin(), header.end(), bytes.begin() + 32);
  uint32_t crc = crc32(bytes.data() + 32, bytes.size() - 32);
  for (int i = 0; i < 4; ++i) bytes[24 + i] = static_cast<unsigned char>(crc >> (8 * i));
  write_bytes(bad, bytes);
  m = error_of<DataFormatError>([&] { load_archive(bad); });
  EXPECT_CONTAINS(m, "unknown dtype \"q32\"");

  EXPECT_THROW(load_archive(temp_path("does-not-exist.dtrn")), IoError);
  EXPECT_THROW(save_archive(temp_path("no-such-dir/x.dtrn"), in), IoError);
  std::filesystem::remove(path);
  std::filesystem::remove(bad);
}

// ---------------------------------------------------------------- state dicts

TEST(StateDict, RoundTripThroughArchiveIsBitExact) {
  Generator g1(12), g2(13);
  auto a = nn::make_model("seed-cnn", g1);
  auto b = nn::make_model("seed-cnn", g2);
  ASSERT_FALSE(bit_equal(a->parameters()[0], b->parameters()[0]));
  std::string path = temp_path("cnn.dtrn");
  save_archive(path, a->state_dict());
  Tensor handle = b->at<nn::Linear>(9)->weight;  // handles stay valid across a load
  nn::LoadReport r = b->load_state_dict(load_archive(path).tensors);
  EXPECT_TRUE(r.missing_keys.empty() && r.unexpected_keys.empty());
  auto pa = a->named_parameters(), pb = b->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, pb[i].first);
    EXPECT_TRUE(bit_equal(pa[i].second, pb[i].second)) << pa[i].first;
  }
  EXPECT_TRUE(bit_equal(handle, a->at<nn::Linear>(9)->weight));
  Tensor x = nn::make_random_batch("seed-cnn", 2, g1).input;
  EXPECT_TRUE(bit_equal(a->forward(x), b->forward(x)));
  std::filesystem::remove(path);
}

TEST(StateDict, LoadErrorsAreClearAndChangeNothing) {
  Generator gen(14);
  auto model = nn::make_model("seed-cnn", gen);
  nn::StateDict good = model->state_dict();
  for (auto& [k, v] : good) v = v.clone();  // a snapshot, not aliases
  Tensor before = model->at<nn::Conv2d>(0)->weight.clone();

  nn::StateDict d = good;
  d["9.weight"] = zeros({64, 1024});
  d["0.weight"] = zeros({32, 1, 3, 3});  // valid, must not be applied
  EXPECT_EQ(error_of<ShapeError>([&] { model->load_state_dict(d); }),
            "load_state_dict: '9.weight' has shape [64,1024] in the checkpoint but [64,576] in "
            "the model");
  EXPECT_TRUE(bit_equal(model->at<nn::Conv2d>(0)->weight, before));

  d = good;
  d.erase("11.bias");
  std::string m = error_of<InvalidArgument>([&] { model->load_state_dict(d); });
  EXPECT_CONTAINS(m, "missing key(s) '11.bias'");
  d = good;
  d["12.weight"] = zeros({1});
  m = error_of<InvalidArgument>([&] { model->load_state_dict(d); });
  EXPECT_CONTAINS(m, "unexpected key(s) '12.weight'");
  d.erase("11.bias");
  nn::LoadReport r = model->load_state_dict(d, /*strict=*/false);
  EXPECT_EQ(r.missing_keys, (std::vector<std::string>{"11.bias"}));
  EXPECT_EQ(r.unexpected_keys, (std::vector<std::string>{"12.weight"}));
  d = good;
  d["0.bias"] = zeros({32}, TensorOptions{}.with_dtype(DType::f64));
  EXPECT_CONTAINS(error_of<DTypeError>([&] { model->load_state_dict(d); }),
                  "'0.bias' has dtype f64 in the checkpoint but f32 in the model");
}

// ---------------------------------------------------------------- optimizers

// Gradient for parameter element j at step t: fixed, varied in sign and size.
double grad_at(int t, int j) { return std::sin(1.7 * t + 0.9 * j + 0.3) * (1.0 + 0.5 * j); }

const std::vector<double> kInit = {0.5, -1.25, 2.0, 0.0, -0.3};

// Runs `steps` optimizer steps on a [5] f32 parameter with grad_at() gradients.
template <typename MakeOpt>
std::vector<double> run_optimizer(MakeOpt make, int steps) {
  std::vector<float> init(kInit.begin(), kInit.end());
  Tensor p = from_vector<float>(init, {5});
  p.set_requires_grad(true);
  auto opt = make(std::vector<Tensor>{p});
  for (int t = 0; t < steps; ++t) {
    std::vector<float> g(5);
    for (int j = 0; j < 5; ++j) g[static_cast<size_t>(j)] = static_cast<float>(grad_at(t, j));
    p.set_grad(from_vector<float>(g, {5}));
    opt->step();
  }
  return p.to_vector<double>();
}

// torch.optim.SGD, as documented, in double.
std::vector<double> sgd_reference(double lr, double mu, double damp, double wd, bool nesterov,
                                  int steps) {
  std::vector<double> p = kInit, buf(5, 0.0);
  for (int t = 0; t < steps; ++t) {
    for (int j = 0; j < 5; ++j) {
      double g = grad_at(t, j) + wd * p[j];
      if (mu != 0.0) {
        buf[j] = t == 0 ? g : mu * buf[j] + (1.0 - damp) * g;
        g = nesterov ? g + mu * buf[j] : buf[j];
      }
      p[j] -= lr * g;
    }
  }
  return p;
}

// torch.optim.Adam / AdamW, as documented, in double.
std::vector<double> adam_reference(double lr, double b1, double b2, double eps, double wd,
                                   bool decoupled, int steps) {
  std::vector<double> p = kInit, m(5, 0.0), v(5, 0.0);
  for (int t = 1; t <= steps; ++t) {
    for (int j = 0; j < 5; ++j) {
      double g = grad_at(t - 1, j);
      if (decoupled) {
        p[j] *= 1.0 - lr * wd;
      } else {
        g += wd * p[j];
      }
      m[j] = b1 * m[j] + (1.0 - b1) * g;
      v[j] = b2 * v[j] + (1.0 - b2) * g * g;
      double m_hat = m[j] / (1.0 - std::pow(b1, t));
      double v_hat = v[j] / (1.0 - std::pow(b2, t));
      p[j] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
  return p;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t j = 0; j < got.size(); ++j) {
    EXPECT_NEAR(got[j], want[j], 2e-5 * std::max(1.0, std::abs(want[j])))
        << what << " [" << j << "]";
  }
  // The update must have moved the parameter (the comparison is not vacuous).
  double moved = 0;
  for (size_t j = 0; j < got.size(); ++j) moved += std::abs(got[j] - kInit[j]);
  EXPECT_GT(moved, 1e-2) << what;
}

TEST(Optim, SgdMatchesTorchFormulas) {
  struct Case {
    const char* name;
    double lr, mu, damp, wd;
    bool nesterov;
  };
  for (const Case& c :
       {Case{"plain", 0.1, 0.0, 0.0, 0.0, false}, Case{"momentum", 0.1, 0.9, 0.0, 0.0, false},
        Case{"dampening", 0.05, 0.8, 0.3, 0.0, false}, Case{"nesterov", 0.1, 0.9, 0.0, 0.0, true},
        Case{"weight_decay", 0.1, 0.9, 0.0, 0.05, false},
        Case{"nesterov+wd", 0.07, 0.5, 0.0, 0.1, true}}) {
    auto got = run_optimizer(
        [&](std::vector<Tensor> ps) {
          return std::make_unique<optim::SGD>(
              ps,
              optim::SGDOptions(c.lr).momentum(c.mu).dampening(c.damp).weight_decay(c.wd).nesterov(
                  c.nesterov));
        },
        6);
    expect_close(got, sgd_reference(c.lr, c.mu, c.damp, c.wd, c.nesterov, 6), c.name);
  }
  Tensor p = zeros({2});
  EXPECT_THROW(optim::SGD({p}, optim::SGDOptions(0.1).nesterov(true)), InvalidArgument);
  EXPECT_THROW(optim::SGD({p}, optim::SGDOptions(-0.1)), InvalidArgument);
  EXPECT_THROW(optim::SGD({p, p}, optim::SGDOptions(0.1)), InvalidArgument);
}

TEST(Optim, AdamAndAdamWMatchTorchFormulas) {
  auto adam = [](double lr, double b1, double b2, double eps, double wd) {
    return [=](std::vector<Tensor> ps) {
      return std::make_unique<optim::Adam>(
          ps, optim::AdamOptions(lr).betas(b1, b2).eps(eps).weight_decay(wd));
    };
  };
  auto adamw = [](double lr, double b1, double b2, double eps, double wd) {
    return [=](std::vector<Tensor> ps) {
      return std::make_unique<optim::AdamW>(
          ps, optim::AdamWOptions(lr).betas(b1, b2).eps(eps).weight_decay(wd));
    };
  };
  expect_close(run_optimizer(adam(0.1, 0.9, 0.999, 1e-8, 0.0), 7),
               adam_reference(0.1, 0.9, 0.999, 1e-8, 0.0, false, 7), "adam");
  expect_close(run_optimizer(adam(0.05, 0.8, 0.99, 1e-3, 0.2), 7),
               adam_reference(0.05, 0.8, 0.99, 1e-3, 0.2, false, 7), "adam+l2");
  expect_close(run_optimizer(adamw(0.1, 0.9, 0.999, 1e-8, 0.1), 7),
               adam_reference(0.1, 0.9, 0.999, 1e-8, 0.1, true, 7), "adamw");
  // AdamW's default weight decay is PyTorch's 0.01; Adam's is 0.
  EXPECT_EQ(optim::AdamWOptions().weight_decay(), 1e-2);
  EXPECT_EQ(optim::AdamOptions().weight_decay(), 0.0);
  // Decoupled and coupled decay really differ.
  EXPECT_GT(std::abs(adam_reference(0.1, 0.9, 0.999, 1e-8, 0.1, true, 7)[0] -
                     adam_reference(0.1, 0.9, 0.999, 1e-8, 0.1, false, 7)[0]),
            1e-4);
  Tensor p = zeros({2});
  EXPECT_THROW(optim::Adam({p}, optim::AdamOptions().betas(1.0, 0.9)), InvalidArgument);
}

TEST(Optim, FrozenParametersStayBitIdentical) {
  for (int which = 0; which < 2; ++which) {
    Generator gen(15);
    auto model = nn::make_model("mlp", gen);
    auto frozen = model->at<nn::Linear>(1);
    frozen->set_requires_grad(false);
    std::vector<Tensor> before;
    for (const Tensor& p : model->parameters()) before.push_back(p.clone());
    std::unique_ptr<optim::Optimizer> opt;
    if (which == 0) {
      opt = std::make_unique<optim::SGD>(model->parameters(),
                                         optim::SGDOptions(0.05).momentum(0.9).weight_decay(0.1));
    } else {
      opt = std::make_unique<optim::AdamW>(model->parameters(), optim::AdamWOptions(1e-3));
    }
    for (int step = 0; step < 4; ++step) {
      nn::Batch b = nn::make_random_batch("mlp", 8, gen);
      opt->zero_grad();
      cross_entropy(model->forward(b.input), b.target).backward();
      opt->step();
    }
    auto params = model->named_parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      bool is_frozen = params[i].first.rfind("1.", 0) == 0;
      EXPECT_EQ(bit_equal(params[i].second, before[i]), is_frozen)
          << opt->name() << " " << params[i].first;
    }
    // The frozen parameters have no optimizer state either.
    optim::StateDict st = opt->state_dict();
    EXPECT_EQ(st.count("state.0.step"), 0u) << opt->name();
    EXPECT_EQ(st.at("state.2.step").item(), 4.0) << opt->name();
  }
}

// Trains `model` for `steps` full-batch steps on (x, y).
void train_steps(nn::Module& model, optim::Optimizer& opt, const Tensor& x, const Tensor& y,
                 int steps) {
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    cross_entropy(model.forward(x), y).backward();
    opt.step();
  }
}

std::shared_ptr<nn::Sequential> small_net(Generator& gen) {
  return std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
      std::make_shared<nn::Linear>(6, 16, gen), std::make_shared<nn::Tanh>(),
      std::make_shared<nn::Linear>(16, 3, gen)});
}

TEST(Optim, CheckpointResumeIsBitIdentical) {
  using MakeOpt = std::function<std::unique_ptr<optim::Optimizer>(std::vector<Tensor>)>;
  std::vector<std::pair<std::string, MakeOpt>> cases = {
      {"sgd-nesterov",
       [](std::vector<Tensor> p) {
         return std::make_unique<optim::SGD>(
             p, optim::SGDOptions(0.1).momentum(0.9).nesterov(true).weight_decay(1e-3));
       }},
      {"adam",
       [](std::vector<Tensor> p) {
         return std::make_unique<optim::Adam>(p, optim::AdamOptions(0.01).weight_decay(1e-3));
       }},
      {"adamw",
       [](std::vector<Tensor> p) {
         return std::make_unique<optim::AdamW>(p, optim::AdamWOptions(0.01));
       }},
  };
  Generator data_gen(16);
  Tensor x = randn({12, 6}, data_gen);
  Tensor y = from_vector<int64_t>({0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0}, {12});
  for (const auto& [label, make] : cases) {
    std::string path = temp_path(label + ".ckpt");
    Generator g1(17);
    auto a = small_net(g1);
    auto opt_a = make(a->parameters());
    train_steps(*a, *opt_a, x, y, 3);
    save_checkpoint(path, *a, opt_a.get(), {{"step", 3}});
    train_steps(*a, *opt_a, x, y, 3);

    Generator g2(99);  // different init: everything must come from the checkpoint
    auto b = small_net(g2);
    auto opt_b = make(b->parameters());
    nlohmann::json extra = load_checkpoint(path, *b, opt_b.get());
    EXPECT_EQ(extra, (nlohmann::json{{"step", 3}})) << label;
    train_steps(*b, *opt_b, x, y, 3);
    auto pa = a->parameters(), pb = b->parameters();
    for (size_t i = 0; i < pa.size(); ++i) {
      EXPECT_TRUE(bit_equal(pa[i], pb[i])) << label << " parameter " << i;
    }
    // And without the optimizer state the continuation differs (the test can fail).
    Generator g3(99);
    auto c = small_net(g3);
    auto opt_c = make(c->parameters());
    load_checkpoint(path, *c, nullptr);
    train_steps(*c, *opt_c, x, y, 3);
    EXPECT_FALSE(bit_equal(pa[0], c->parameters()[0])) << label;
    std::filesystem::remove(path);
  }
}

TEST(Optim, StateDictValidation) {
  Generator gen(18);
  auto net = small_net(gen);
  Tensor x = randn({4, 6}, gen);
  Tensor y = from_vector<int64_t>({0, 1, 2, 1}, {4});
  optim::Adam adam(net->parameters(), optim::AdamOptions(0.01));
  train_steps(*net, adam, x, y, 2);
  optim::StateDict st = adam.state_dict();
  EXPECT_EQ(st.at("state.3.step").item(), 2.0);
  EXPECT_EQ(st.at("state.0.exp_avg").shape(), (Shape{16, 6}));
  EXPECT_EQ(st.at("num_params").item(), 4.0);

  optim::SGD sgd(net->parameters(), optim::SGDOptions(0.1).momentum(0.9));
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { sgd.load_state_dict(st); }),
                  "SGD keeps no 'exp_avg' state");
  optim::Adam other(net->at<nn::Linear>(0)->parameters(), optim::AdamOptions(0.01));
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { other.load_state_dict(st); }),
                  "the state is for 4 parameters, this optimizer has 2");
  optim::StateDict bad = st;
  bad["state.1.exp_avg"] = zeros({3});
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { adam.load_state_dict(bad); }),
                  "'state.1.exp_avg' is f32 [3] but parameter 1 is f32 [16]");
  bad = st;
  bad.erase("state.1.step");
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { adam.load_state_dict(bad); }),
                  "'state.1.step' is not");
  bad = st;
  bad["state.9.step"] = from_vector<int64_t>({1}, {});
  EXPECT_CONTAINS(error_of<DataFormatError>([&] { adam.load_state_dict(bad); }),
                  "unexpected key 'state.9.step'");
  // A failed load changed nothing.
  optim::StateDict after = adam.state_dict();
  ASSERT_EQ(after.size(), st.size());
  for (const auto& [k, v] : st) EXPECT_TRUE(bit_equal(after.at(k), v)) << k;

  // Checkpoint with the wrong optimizer type, or a different model.
  std::string path = temp_path("adam.ckpt");
  save_checkpoint(path, *net, &adam);
  EXPECT_CONTAINS(error_of<InvalidArgument>([&] { load_checkpoint(path, *net, &sgd); }),
                  "holds Adam state, but the optimizer is SGD");
  auto mlp = nn::make_model("mlp", gen);
  std::string m = error_of<InvalidArgument>([&] { load_checkpoint(path, *mlp, nullptr); });
  EXPECT_CONTAINS(m, path);
  EXPECT_CONTAINS(m, "missing key(s)");
  save_checkpoint(path, *net, nullptr);
  EXPECT_CONTAINS(error_of<InvalidArgument>([&] { load_checkpoint(path, *net, &adam); }),
                  "holds no optimizer state");
  std::filesystem::remove(path);
}

// ---------------------------------------------------------------- schedulers

TEST(Scheduler, StepLRFollowsClosedForm) {
  Tensor p = zeros({1});
  optim::SGD opt({p}, optim::SGDOptions(0.05));
  optim::StepLR sched(opt, optim::StepLROptions(30).gamma(0.1));
  // torch docs: lr = 0.05 for epoch < 30, 0.005 for 30 <= epoch < 60, 0.0005 ...
  for (int t = 0; t < 95; ++t) {
    double want = 0.05 * std::pow(0.1, t / 30);
    EXPECT_NEAR(opt.lr(), want, 1e-15) << t;
    EXPECT_EQ(sched.get_lr(), opt.lr());
    sched.step();
  }
  sched.set_last_epoch(61);
  EXPECT_NEAR(opt.lr(), 0.0005, 1e-15);
}

TEST(Scheduler, CosineAnnealingFollowsClosedForm) {
  Tensor p = zeros({1});
  optim::SGD opt({p}, optim::SGDOptions(1.0));
  optim::CosineAnnealingLR sched(opt, optim::CosineAnnealingOptions(10).eta_min(0.1));
  const double pi = std::acos(-1.0);
  for (int t = 0; t <= 20; ++t) {
    double want = 0.1 + 0.9 * (1 + std::cos(pi * t / 10)) / 2;
    EXPECT_NEAR(opt.lr(), want, 1e-12) << t;
    sched.step();
  }
  EXPECT_NEAR(sched.lr_at(0), 1.0, 1e-15);
  EXPECT_NEAR(sched.lr_at(5), 0.55, 1e-12);
  EXPECT_NEAR(sched.lr_at(10), 0.1, 1e-12);

  Tensor q = zeros({1});
  optim::Adam adam({q}, optim::AdamOptions(0.3));
  optim::CosineAnnealingLR warm(adam, optim::CosineAnnealingOptions(13).warmup_steps(3));
  EXPECT_NEAR(adam.lr(), 0.1, 1e-15);  // (0 + 1) / 3 of the base
  std::vector<double> want = {0.1, 0.2, 0.3};
  for (int t = 3; t <= 13; ++t) want.push_back(0.3 * (1 + std::cos(pi * (t - 3) / 10)) / 2);
  for (size_t t = 0; t < want.size(); ++t) {
    EXPECT_NEAR(adam.lr(), want[t], 1e-12) << t;
    warm.step();
  }
  EXPECT_THROW(optim::CosineAnnealingLR(adam, optim::CosineAnnealingOptions(5).warmup_steps(5)),
               InvalidArgument);
}

// ---------------------------------------------------------------- training

TEST(Training, MlpLossFallsOnSeparableData) {
  // 10 classes, each a Gaussian blob around its own random centre in 784-d.
  Generator gen(19);
  const int64_t n = 200, d = 784, classes = 10;
  Tensor centres = randn({classes, d}, gen);
  Tensor x = empty({n, d});
  Tensor y = empty({n}, TensorOptions{}.with_dtype(DType::i64));
  const float* c = centres.data<float>();
  float* px = x.data<float>();
  int64_t* py = y.data<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t k = static_cast<int64_t>(gen.below(classes));
    py[i] = k;
    for (int64_t j = 0; j < d; ++j) {
      px[i * d + j] = c[k * d + j] + static_cast<float>(gen.normal());
    }
  }
  auto model = nn::make_model("mlp", gen);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.01).momentum(0.9));
  optim::CosineAnnealingLR sched(opt, optim::CosineAnnealingOptions(50).warmup_steps(5));
  double first = 0, last = 0;
  for (int step = 0; step < 50; ++step) {
    Tensor xb = x.narrow(0, (step % 4) * 50, 50), yb = y.narrow(0, (step % 4) * 50, 50);
    opt.zero_grad();
    Tensor loss = cross_entropy(model->forward(xb), yb);
    if (step == 0) first = loss.item();
    loss.backward();
    opt.step();
    sched.step();
  }
  {
    NoGradGuard ng;
    last = cross_entropy(model->forward(x), y).item();
  }
  EXPECT_GT(first, 1.5);  // about ln(10) at the start
  EXPECT_LT(last, 0.5 * first) << "first " << first << " last " << last;
}

}  // namespace
}  // namespace dtrain
