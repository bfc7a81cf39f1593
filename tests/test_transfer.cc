// Transfer learning and inference: safetensors import (against PyTorch's logits and
// its f16/bf16 conversions), every mismatch in one error with nothing loaded,
// malformed files, DDP with a frozen base against one process, eval-mode determinism,
// and the CLI: train --init-from/--freeze keeps the base bit-identical to the file,
// infer's accuracy equals train's, bad images and flags fail clearly.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/autograd.h"
#include "dtrain/engine/data/idx.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/data/mnist.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/engine/safetensors_import.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/parallel/ddp.h"
#include "rank_threads.h"
#include "subprocess.h"

namespace fs = std::filesystem;
using dtrain::Generator;
using dtrain::Tensor;
using namespace dtrain;

namespace {

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_transfer", name);
}

std::string header_json(const std::map<std::string, Tensor>& t, const char* dtype = "F32") {
  nlohmann::json h = nlohmann::json::object();
  uint64_t off = 0;
  for (const auto& [k, v] : t) {
    h[k] = {{"dtype", dtype}, {"shape", v.shape()}, {"data_offsets", {off, off + v.nbytes()}}};
    off += v.nbytes();
  }
  return h.dump();
}

void write_raw(const fs::path& p, const std::string& header, const std::string& data,
               uint64_t hlen_override = 0) {
  std::ofstream f(p, std::ios::binary);
  uint64_t hlen = hlen_override ? hlen_override : header.size();
  f.write(reinterpret_cast<const char*>(&hlen), 8);
  f << header << data;
}

// A safetensors file of f32/f64 tensors (written here, independently of the importer).
void write_st(const fs::path& p, const std::map<std::string, Tensor>& t) {
  nlohmann::json h = nlohmann::json::object();
  std::string data;
  for (const auto& [k, v] : t) {
    Tensor c = v.contiguous();
    h[k] = {{"dtype", c.dtype() == DType::f64 ? "F64" : "F32"},
            {"shape", c.shape()},
            {"data_offsets", {data.size(), data.size() + c.nbytes()}}};
    data.append(static_cast<const char*>(c.raw_data()), c.nbytes());
  }
  write_raw(p, h.dump(), data);
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.contiguous().raw_data(), b.contiguous().raw_data(), a.nbytes()) == 0;
}

std::map<std::string, Tensor> clone_state(const nn::Module& m) {
  std::map<std::string, Tensor> out;
  for (const auto& [k, v] : m.state_dict()) out.emplace(k, v.clone());
  return out;
}

// python3 with torch (Debian's python3-torch); "" when missing.
std::string torch_python() {
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    if (dtrain::testing::run_command(std::string(py) + " -c 'import torch'", 120).code == 0)
      return py;
  }
  return "";
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.message();
  }
  return "(no error)";
}

}  // namespace

// PyTorch's own CNN (features.*, classifier.*) loads through a prefix rule and a JSON
// map, and our forward reproduces torch's logits.
TEST(SafetensorsImport, TorchModelReproducesTorchLogits) {
  const std::string py = torch_python();
  if (py.empty())
    GTEST_SKIP() << "python3 with torch is not installed (apt-get install python3-torch)";
  fs::path dir = scratch("torch");
  auto r = dtrain::testing::run_command(py + " " + DTRAIN_TESTS_DIR "/transfer_torch_fixture.py " +
                                        dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  std::ofstream(dir / "map.json")
      << R"({"classifier.0.weight": "9.weight", "classifier.0.bias": "9.bias",
    "classifier.2.*": "11."})";
  Generator g(1);
  auto model = nn::make_model("seed-cnn", g);
  nn::ImportOptions o;
  o.names = nn::read_name_map((dir / "map.json").string());
  o.names.prefixes.push_back(nn::parse_prefix_rule("features.="));
  nn::ImportReport rep = nn::load_safetensors(*model, (dir / "torch_cnn.safetensors").string(), o);
  EXPECT_EQ(rep.loaded.size(), 10u);
  nlohmann::json fx = nlohmann::json::parse(std::ifstream(dir / "logits.json"));
  Tensor x = from_vector(fx["input"].get<std::vector<float>>(), {2, 1, 28, 28});
  model->eval();
  NoGradGuard ng;
  Tensor y = model->forward(x).contiguous();
  auto want = fx["logits"].get<std::vector<float>>();
  ASSERT_EQ(y.numel(), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(y.data<float>()[i], want[i], 1e-5) << i;
}

TEST(SafetensorsImport, HalfAndBfloat16BecomeF32AsTorchConvertsThem) {
  const std::string py = torch_python();
  if (py.empty()) GTEST_SKIP() << "python3 with torch is not installed";
  fs::path dir = scratch("half");
  ASSERT_EQ(dtrain::testing::run_command(py + " " + DTRAIN_TESTS_DIR "/transfer_torch_fixture.py " +
                                         dir.string())
                .code,
            0);
  auto t = nn::read_safetensors((dir / "half.safetensors").string());
  nlohmann::json want = nlohmann::json::parse(std::ifstream(dir / "half.json"));
  for (const char* k : {"h", "b"}) {
    ASSERT_EQ(t.at(k).dtype(), DType::f32);
    auto v = want[k].get<std::vector<float>>();
    ASSERT_EQ(t.at(k).numel(), static_cast<int64_t>(v.size()));
    for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(t.at(k).data<float>()[i], v[i]) << k << i;
  }
}

TEST(SafetensorsImport, EveryMismatchIsListedAndNothingIsLoaded) {
  Generator g(1), g2(2);
  auto model = nn::make_model("seed-cnn", g);
  auto other = nn::make_model("seed-cnn", g2);
  std::map<std::string, Tensor> file = clone_state(*other);
  file.erase("3.bias");                              // missing
  file["extra.weight"] = zeros({4});                 // unused
  file["9.weight"] = zeros({64, 575});               // wrong shape
  file["11.bias"] = file["11.bias"].to(DType::f64);  // wrong dtype
  fs::path p = scratch("mismatch") / "w.safetensors";
  write_st(p, file);
  auto before = clone_state(*model);
  std::string msg = error_of([&] { nn::load_safetensors(*model, p.string()); });
  for (const char* s : {"4 mismatch", "'3.bias' [64] has no tensor", "'extra.weight' matches no",
                        "'9.weight': shape [64,575] in the file, [64,576]",
                        "'11.bias': dtype f64 in the file, f32", "nothing loaded"}) {
    EXPECT_NE(msg.find(s), std::string::npos) << s << "\n" << msg;
  }
  for (const auto& [k, v] : model->state_dict()) EXPECT_TRUE(bit_equal(v, before.at(k))) << k;
}

TEST(SafetensorsImport, AllowUnusedAndAFreshHeadLoadTheRest) {
  Generator g(1), g2(2);
  auto model = nn::make_model("seed-cnn", g);
  auto other = nn::make_model("seed-cnn", g2);
  std::map<std::string, Tensor> file = clone_state(*other);
  file["extra"] = zeros({1});
  file["11.weight"] = zeros({5, 64});  // a head of another width: ignored under keep_fresh
  fs::path p = scratch("unused") / "w.safetensors";
  write_st(p, file);
  auto before = clone_state(*model);
  nn::ImportOptions o;
  o.allow_unused = true;
  o.keep_fresh = {"11."};
  nn::ImportReport r = nn::load_safetensors(*model, p.string(), o);
  EXPECT_EQ(r.loaded.size(), 8u);
  EXPECT_EQ(r.unused.size(), 3u);  // extra, 11.weight, 11.bias
  for (const auto& [k, v] : model->state_dict()) {
    EXPECT_TRUE(bit_equal(v, k.rfind("11.", 0) == 0 ? before.at(k) : file.at(k))) << k;
  }
}

TEST(SafetensorsImport, MalformedFilesNameTheFileAndTheFault) {
  fs::path dir = scratch("malformed");
  std::map<std::string, Tensor> one = {{"w", zeros({2, 3})}};
  const std::string data(24, '\0');
  struct Case {
    std::string name, header, data;
    uint64_t hlen;
    std::string want;
  };
  const std::string good = header_json(one);
  std::vector<Case> cases = {
      {"short", "", "", 0, "shorter than the 8-byte"},
      {"hlen", good, data, 1u << 30, "header length 1073741824 runs past the file"},
      {"json", "{\"w\": [", data, 0, "is not valid JSON"},
      {"array", "[1,2]", data, 0, "is not a JSON object"},
      {"range", R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,48]}})", data, 0,
       "outside the 24 bytes of data"},
      {"size", R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", data, 0,
       "hold 20 bytes, but F32 [2,3] needs 24"},
      {"dtype", R"({"w":{"dtype":"Q7","shape":[2,3],"data_offsets":[0,24]}})", data, 0,
       "unknown dtype \"Q7\""},
      {"fields", R"({"w":{"dtype":"F32"}})", data, 0, "expected an object with dtype"},
  };
  for (const Case& c : cases) {
    fs::path p = dir / (c.name + ".safetensors");
    if (c.name == "short") {
      std::ofstream(p) << "abc";
    } else {
      write_raw(p, c.header, c.data, c.hlen);
    }
    try {
      nn::read_safetensors(p.string());
      ADD_FAILURE() << c.name << ": no error";
    } catch (const DataFormatError& e) {
      EXPECT_NE(e.message().find(p.string()), std::string::npos) << e.message();
      EXPECT_NE(e.message().find(c.want), std::string::npos) << c.name << ": " << e.message();
    }
  }
  std::ofstream(dir / "map.json") << R"({"a": 3})";
  EXPECT_NE(
      error_of([&] { nn::read_name_map((dir / "map.json").string()); }).find("'a' is not a string"),
      std::string::npos);
  EXPECT_NE(error_of([] { nn::parse_prefix_rule("nothing"); }).find("THEIR_PREFIX=OUR_PREFIX"),
            std::string::npos);
}

// Two ranks with half a batch each and the conv base frozen train exactly as one
// process on the whole batch: the frozen weights stay bit-identical, the head moves.
TEST(Freeze, DdpWithAFrozenBaseEqualsOneProcess) {
  Generator gd(5);
  nn::Batch batch = nn::make_random_batch("seed-cnn", 8, gd);
  auto train = [&](nn::Module& m, const Tensor& x, const Tensor& y,
                   parallel::DistributedDataParallel* ddp) {
    optim::SGD opt(m.parameters(), optim::SGDOptions(0.1).momentum(0.9).weight_decay(0.01));
    for (int s = 0; s < 3; ++s) {
      opt.zero_grad();
      cross_entropy(m.forward(x), y).backward();
      if (ddp) ddp->finish_gradient_sync();
      opt.step();
    }
  };
  auto freeze_base = [](nn::Module& m) {
    for (const char* k : {"0", "3", "6"}) {
      for (auto& [n, child] : m.named_children())
        if (n == k) child->set_requires_grad(false);
    }
  };
  Generator g(1);
  auto single = nn::make_model("seed-cnn", g);
  freeze_base(*single);
  auto initial = clone_state(*single);
  train(*single, batch.input, batch.target, nullptr);
  std::vector<std::map<std::string, Tensor>> ranks(2);
  dtrain::testing::run_tcp_ranks(2, "frozen-ddp", [&](int r, comm::Communicator& comm) {
    Generator gr(1);
    auto m = nn::make_model("seed-cnn", gr);
    freeze_base(*m);
    parallel::DistributedDataParallel ddp(m, comm);
    std::vector<int64_t> rows = {4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3};
    Tensor x = data::gather_rows(batch.input, rows);
    Tensor y = data::gather_rows(batch.target, rows);
    train(*m, x, y, &ddp);
    ranks[static_cast<size_t>(r)] = clone_state(*m);
  });
  for (const auto& [k, v] : single->state_dict()) {
    const bool frozen = k[0] == '0' || k[0] == '3' || k[0] == '6';
    EXPECT_EQ(bit_equal(v, initial.at(k)), frozen) << k;
    for (const auto& rs : ranks) {
      ASSERT_TRUE(rs.count(k));
      Tensor d = (rs.at(k) - v).contiguous();
      for (int64_t i = 0; i < d.numel(); ++i) ASSERT_NEAR(d.data<float>()[i], 0.0f, 2e-6) << k;
    }
  }
}

TEST(Infer, EvalModeForwardIsDeterministicAndDropsNothing) {
  Generator g(3);
  auto with = std::make_shared<nn::Sequential>(std::initializer_list<std::shared_ptr<nn::Module>>{
      std::make_shared<nn::Linear>(6, 4, g), std::make_shared<nn::Dropout>(0.5, g)});
  Tensor x = full({3, 6}, 1.0);
  with->eval();
  NoGradGuard ng;
  Tensor a = with->forward(x), b = with->forward(x);
  Tensor plain = (*with)[0]->forward(x);  // the Linear alone: what eval-mode dropout must give
  EXPECT_TRUE(bit_equal(a, b));
  EXPECT_TRUE(bit_equal(a, plain));
  with->train();
  EXPECT_FALSE(bit_equal(with->forward(x), plain));  // dropout is live in training
}

// ---- the CLI ----

namespace {

dtrain::testing::CommandResult dtrain_cli(const std::string& args) {
  return dtrain::testing::run_command(std::string(DTRAIN_BIN) + " " + args, 120);
}

fs::path synthetic_mnist(const fs::path& dir) {
  data::write_mnist_folder(dir.string(), data::generate_synthetic_digits(512, 200, 3));
  return dir;
}

double number_after(const std::string& out, const std::string& label) {
  std::smatch m;
  EXPECT_TRUE(std::regex_search(out, m, std::regex(label + " ([0-9.]+)"))) << out;
  return m.size() > 1 ? std::stod(m[1]) : -1;
}

}  // namespace

// train --save, then infer --ckpt on the same test split: the same accuracy, to the
// printed digit (both count argmax hits over every test image in eval mode).
TEST(InferCli, AccuracyEqualsTrainsTestAccuracyAndPrintsLatency) {
  fs::path dir = scratch("infer");
  fs::path data = synthetic_mnist(dir / "data");
  auto t = dtrain_cli("train --no-progress --max-steps 12 --data " + data.string() + " --save " +
                      (dir / "m.ckpt").string() + " --metrics " + (dir / "m.jsonl").string());
  ASSERT_EQ(t.code, 0) << t.out;
  auto i = dtrain_cli("infer --ckpt " + (dir / "m.ckpt").string() + " --data " + data.string() +
                      " --batch 64 --warmup 1");
  ASSERT_EQ(i.code, 0) << i.out;
  EXPECT_EQ(number_after(i.out, "accuracy"), number_after(t.out, "test accuracy"))
      << t.out << i.out;
  for (const char* s : {"200 samples in 4 batches of 64", "p50", "p90", "p99", "samples/s"}) {
    EXPECT_NE(i.out.find(s), std::string::npos) << s << "\n" << i.out;
  }
}

TEST(InferCli, ImagesOfTheWrongSizeNameTheFileAndBothShapes) {
  fs::path dir = scratch("infer_bad");
  fs::path data = synthetic_mnist(dir / "data");
  ASSERT_EQ(dtrain_cli("train --no-progress --max-steps 1 --data " + data.string() + " --save " +
                       (dir / "m.ckpt").string() + " --metrics " + (dir / "m.jsonl").string())
                .code,
            0);
  fs::path img = dir / "big-images-idx3-ubyte";
  data::write_idx(img.string(), zeros({3, 32, 30}, {.dtype = DType::u8}));
  auto r = dtrain_cli("infer --ckpt " + (dir / "m.ckpt").string() + " --input " + img.string());
  EXPECT_EQ(r.code, 1) << r.out;
  for (std::string s :
       {img.string(), std::string("32x30"), std::string("[3,32,30]"), std::string("28x28")}) {
    EXPECT_NE(r.out.find(s), std::string::npos) << s << "\n" << r.out;
  }
  auto both = dtrain_cli("infer --ckpt a --weights b");
  EXPECT_EQ(both.code, 1);
  EXPECT_NE(both.out.find("exactly one of --ckpt"), std::string::npos) << both.out;
}

// train --init-from FILE --freeze base --reset-head: the saved base equals the file's
// tensors bit for bit, the head was trained from a fresh start.
TEST(TransferCli, FrozenBaseStaysTheFilesWeightsAndTheHeadTrains) {
  fs::path dir = scratch("transfer");
  fs::path data = synthetic_mnist(dir / "data");
  Generator g(9);
  auto pre = nn::make_model("seed-cnn", g);
  std::map<std::string, Tensor> file = clone_state(*pre);
  file["11.weight"] = zeros({3, 64});  // another head: ignored with --reset-head
  write_st(dir / "pre.safetensors", file);
  auto r = dtrain_cli("train --no-progress --max-steps 5 --classes 5-9 --data " + data.string() +
                      " --init-from " + (dir / "pre.safetensors").string() +
                      " --freeze base --reset-head --save " + (dir / "t.ckpt").string() +
                      " --metrics " + (dir / "t.jsonl").string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("frozen: 92672 of 93322"), std::string::npos) << r.out;
  Archive a = load_archive((dir / "t.ckpt").string());
  Generator fresh(1);  // the run's --seed: its head starts as make_model(seed 1)'s head
  auto init = nn::make_model("seed-cnn", fresh);
  for (const auto& [k, v] : init->state_dict()) {
    const Tensor& saved = a.tensors.at("model." + k);
    if (k.rfind("11.", 0) == 0) {
      EXPECT_FALSE(bit_equal(saved, v)) << k << " was not trained";
    } else {
      EXPECT_TRUE(bit_equal(saved, file.at(k))) << k << " moved although frozen";
    }
  }
  auto bad = dtrain_cli("train --max-steps 1 --data " + data.string() + " --freeze 99.");
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.out.find("--freeze 99.: no parameter"), std::string::npos) << bad.out;
  auto cls = dtrain_cli("train --max-steps 1 --data " + data.string() + " --classes 3-12");
  EXPECT_EQ(cls.code, 1);
  EXPECT_NE(cls.out.find("--classes 3-12"), std::string::npos) << cls.out;
  auto mis = dtrain_cli("train --max-steps 1 --data " + data.string() + " --init-from " +
                        (dir / "pre.safetensors").string());
  EXPECT_EQ(mis.code, 1);
  EXPECT_NE(mis.out.find("'11.weight': shape [3,64] in the file, [10,64]"), std::string::npos)
      << mis.out;
}

// `dtrain ckpt export` writes what the importer reads: the exported weights equal the
// same run's --save checkpoint bit for bit.
TEST(TransferCli, ExportedCheckpointImportsAsTheSavedWeights) {
  fs::path dir = scratch("export");
  fs::path data = synthetic_mnist(dir / "data");
  auto t = dtrain_cli("train --no-progress --max-steps 4 --ckpt-every 4 --data " + data.string() +
                      " --ckpt-dir " + (dir / "ck").string() + " --save " +
                      (dir / "m.ckpt").string() + " --metrics " + (dir / "m.jsonl").string());
  ASSERT_EQ(t.code, 0) << t.out;
  auto e = dtrain_cli("ckpt export " + (dir / "ck").string() + " --out " +
                      (dir / "w.safetensors").string());
  ASSERT_EQ(e.code, 0) << e.out;
  Generator g1(5), g2(6);
  auto imported = nn::make_model("seed-cnn", g1);
  auto saved = nn::make_model("seed-cnn", g2);
  nn::load_safetensors(*imported, (dir / "w.safetensors").string());
  load_checkpoint((dir / "m.ckpt").string(), *saved, nullptr);
  auto want = saved->state_dict();
  for (const auto& [k, v] : imported->state_dict()) EXPECT_TRUE(bit_equal(v, want.at(k))) << k;
}
