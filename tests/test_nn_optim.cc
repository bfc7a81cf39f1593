// nn::Module and layers, reference models, the tensor archive and state dicts
// (optimizers and schedules: test_optim.cc).
//
// Oracles: layers against the functional ops they wrap (bit-equal); archives and
// state dicts against the tensors that went in (bit-equal) and against deliberately
// damaged files.
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
#include "nn_test_util.h"

namespace dtrain {
namespace {

using testing::randn;
using namespace nntest;

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

}  // namespace
}  // namespace dtrain
