// Sharded checkpoints over the real tcp backend (ranks are threads of this process).
//
// Oracles: the original tensors (a slice read back must equal original.narrow(...)
// bit for bit, whatever pieces were stored) and the 1-process GPT (its init does not
// depend on the mesh, so the slice of its state is what every rank of any mesh must
// load). The loading models are built with another seed, so a value can only be right
// if it came from the checkpoint. Bad input: typed errors naming what is wrong, and a
// failed save that leaves the previous checkpoint as it was.
#include <gtest/gtest.h>

#include "rank_threads.h"

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/nn/gpt.h"
#include "dtrain/engine/random.h"
#include "dtrain/parallel/gpt_checkpoint.h"
#include "dtrain/parallel/mesh.h"
#include "dtrain/parallel/sharded_checkpoint.h"
#include "dtrain/parallel/tensor_parallel.h"

namespace {

using dtrain::DType;
using dtrain::Shape;
using dtrain::Tensor;
using dtrain::TensorMap;
using dtrain::comm::Communicator;
namespace fs = std::filesystem;
namespace nn = dtrain::nn;
namespace par = dtrain::parallel;

void run_ranks(int world, const std::function<void(Communicator&)>& fn) {
  dtrain::testing::run_tcp_ranks(world, "ckpt-test", [&](int, Communicator& c) { fn(c); });
}

Tensor randn(const Shape& shape, uint64_t seed) {
  dtrain::Generator gen(seed);
  Tensor t = dtrain::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(gen.normal());
  return t;
}

Tensor random_i64(const Shape& shape, uint64_t seed) {
  dtrain::Generator gen(seed);
  Tensor t = dtrain::empty(shape, dtrain::TensorOptions().with_dtype(DType::i64));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int64_t>()[i] = static_cast<int64_t>(gen.below(1u << 30));
  return t;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()) == 0;
}

#define EXPECT_SAME(a, b) EXPECT_TRUE(same_bits(a, b)) << (a).str() << "\nvs\n" << (b).str()

Tensor slice(const Tensor& full, int dim, int rank, int parts) {
  if (dim < 0 || parts == 1) return full;
  const int64_t n = full.size(dim) / parts;
  return full.narrow(dim, rank * n, n).contiguous();
}

// A unique directory under the system temp dir, removed (with its siblings) afterwards.
class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (fs::temp_directory_path() /
            fmt::format("dtrain-sharded-{}-{}", ::getpid(), info->name()))
               .string();
    clean();
  }
  void TearDown() override { clean(); }
  void clean() {
    for (const char* suffix : {"", ".tmp", ".old"}) fs::remove_all(dir_ + suffix);
  }
  std::string dir_;
};

// ---------------------------------------------------------------- the store

struct StoreFixture {
  Tensor a = randn({8, 6}, 1);         // 4 row pieces
  Tensor b = random_i64({6, 4}, 2);    // 2 column pieces, ranks 0 and 1
  Tensor c = randn({5}, 3).to(DType::f64);  // replicated: every rank writes it whole
  Tensor s = dtrain::scalar_tensor(7, dtrain::TensorOptions().with_dtype(DType::i64));

  // Rank r's pieces; drop_a_on: a rank that leaves its piece of `a` out.
  std::vector<par::TensorPiece> pieces(int r, int drop_a_on = -1) const {
    std::vector<par::TensorPiece> out;
    if (r != drop_a_on) out.push_back({"a", a.shape(), 0, 2 * r, a.narrow(0, 2 * r, 2)});
    if (r < 2) out.push_back({"b", b.shape(), 1, 2 * r, b.narrow(1, 2 * r, 2)});
    out.push_back({"c", c.shape(), -1, 0, c});
    if (r == 0) out.push_back({"s", s.shape(), -1, 0, s});
    return out;
  }
  void save(const std::string& dir, const nlohmann::json& meta) const {
    run_ranks(4, [&](Communicator& w) { par::save_sharded(dir, w, pieces(w.rank()), meta); });
  }
};

TEST_F(CheckpointTest, StoreReadsAnySlicingBitForBit) {
  const StoreFixture f;
  f.save(dir_, {{"note", "round trip"}});
  for (int r = 0; r < 4; ++r) EXPECT_TRUE(fs::exists(fmt::format("{}/shard-{}.dtrn", dir_, r)));
  EXPECT_FALSE(fs::exists(dir_ + ".tmp"));

  par::ShardedCheckpointReader reader(dir_);
  EXPECT_EQ(reader.meta()["note"], "round trip");
  EXPECT_EQ(reader.names(), (std::vector<std::string>{"a", "b", "c", "s"}));
  EXPECT_EQ(reader.global_shape("b"), f.b.shape());
  EXPECT_FALSE(reader.contains("d"));
  EXPECT_SAME(reader.read("a", {8, 6}, DType::f32, -1, 0, 0), f.a);
  for (int64_t c0 : {0, 3}) {
    EXPECT_SAME(reader.read("a", {8, 6}, DType::f32, 1, c0, 3), f.a.narrow(1, c0, 3));
  }
  const int64_t rows[][2] = {{0, 3}, {3, 3}, {6, 2}};
  for (const auto& [r0, n] : rows) {
    EXPECT_SAME(reader.read("a", {8, 6}, DType::f32, 0, r0, n), f.a.narrow(0, r0, n));
  }
  EXPECT_SAME(reader.read("b", {6, 4}, DType::i64, -1, 0, 0), f.b);
  EXPECT_SAME(reader.read("b", {6, 4}, DType::i64, 0, 1, 4), f.b.narrow(0, 1, 4));
  EXPECT_SAME(reader.read("c", {5}, DType::f64, 0, 1, 3), f.c.narrow(0, 1, 3));
  EXPECT_SAME(reader.read("s", {}, DType::i64, -1, 0, 0), f.s);
}

TEST_F(CheckpointTest, StoreRefusesWrongRequests) {
  StoreFixture().save(dir_, {});
  par::ShardedCheckpointReader reader(dir_);
  EXPECT_THROW(reader.read("zz", {1}, DType::f32, -1, 0, 0), dtrain::CheckpointError);
  EXPECT_THROW(reader.read("a", {8, 6}, DType::f64, -1, 0, 0), dtrain::CheckpointError);
  EXPECT_THROW(reader.read("a", {8, 6}, DType::f32, 0, 6, 3), dtrain::InvalidArgument);
  try {
    reader.read("a", {8, 7}, DType::f32, -1, 0, 0);
    FAIL() << "a wrong global shape was accepted";
  } catch (const dtrain::CheckpointError& e) {
    const std::string m = e.what();
    for (const std::string& want : {dir_, std::string("'a'"), std::string("[8,6]"), std::string("[8,7]")}) {
      EXPECT_NE(m.find(want), std::string::npos) << m;
    }
  }
}

TEST_F(CheckpointTest, CorruptShardIsADataFormatErrorNamingTheFile) {
  StoreFixture().save(dir_, {});
  const std::string shard = dir_ + "/shard-1.dtrn";
  {
    std::fstream io(shard, std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(-3, std::ios::end);
    const char byte = static_cast<char>(io.get() ^ 0x5a);
    io.seekp(-3, std::ios::end);
    io.put(byte);
  }
  par::ShardedCheckpointReader reader(dir_);
  try {
    reader.read("a", {8, 6}, DType::f32, -1, 0, 0);
    FAIL() << "a corrupt shard was read";
  } catch (const dtrain::DataFormatError& e) {
    EXPECT_NE(std::string(e.what()).find(shard), std::string::npos) << e.what();
  }
}

TEST_F(CheckpointTest, MissingOrForeignManifestIsACheckpointError) {
  EXPECT_THROW(par::ShardedCheckpointReader{dir_}, dtrain::CheckpointError);
  StoreFixture().save(dir_, {});
  fs::remove(dir_ + "/manifest.json");
  EXPECT_THROW(par::ShardedCheckpointReader{dir_}, dtrain::CheckpointError);
  std::ofstream(dir_ + "/manifest.json") << "{\"format\": \"something else\"}";
  EXPECT_THROW(par::ShardedCheckpointReader{dir_}, dtrain::CheckpointError);
}

// A gap (rank 3 leaves its rows out) or a bad piece fails the save on every rank; the
// checkpoint saved before is still there, unchanged.
TEST_F(CheckpointTest, FailedSaveThrowsEverywhereAndKeepsThePreviousCheckpoint) {
  const StoreFixture f;
  f.save(dir_, {{"generation", 1}});
  std::atomic<int> gap_errors{0}, shape_errors{0};
  run_ranks(4, [&](Communicator& w) {
    try {
      par::save_sharded(dir_, w, f.pieces(w.rank(), /*drop_a_on=*/3), {{"generation", 2}});
    } catch (const dtrain::CheckpointError& e) {
      ++gap_errors;
      if (w.rank() == 0) {
        EXPECT_NE(std::string(e.what()).find("'a'"), std::string::npos) << e.what();
      }
    }
    std::vector<par::TensorPiece> bad = f.pieces(w.rank());
    if (w.rank() == 2) bad[0].data = f.a.narrow(0, 0, 5);  // rows 4..9 of an 8-row tensor
    try {
      par::save_sharded(dir_, w, bad, {{"generation", 3}});
    } catch (const dtrain::ShapeError&) {
      if (w.rank() == 2) ++shape_errors;
    } catch (const dtrain::CheckpointError&) {
      if (w.rank() != 2) ++shape_errors;
    }
  });
  EXPECT_EQ(gap_errors.load(), 4);
  EXPECT_EQ(shape_errors.load(), 4);
  EXPECT_FALSE(fs::exists(dir_ + ".tmp"));
  par::ShardedCheckpointReader reader(dir_);
  EXPECT_EQ(reader.meta()["generation"], 1);
  EXPECT_SAME(reader.read("a", {8, 6}, DType::f32, -1, 0, 0), f.a);
}

// ---------------------------------------------------------------- GPT reshard

nn::GptConfig small_gpt(uint64_t seed = 42) {
  nn::GptConfig c;
  c.vocab_size = 24;
  c.block_size = 8;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_embd = 16;
  c.seed = seed;
  return c;
}

// The model's parameters, two fake optimizer slots derived from each, and a step.
TensorMap make_state(const nn::Gpt& model) {
  TensorMap state;
  for (const auto& [name, p] : model.state_dict()) {
    Tensor avg = p.clone(), sq = p.clone();
    for (int64_t i = 0; i < p.numel(); ++i) {
      const float v = p.contiguous().data<float>()[i];
      avg.data<float>()[i] = v * 2 + 1;
      sq.data<float>()[i] = v * v;
    }
    state[name] = p.clone();
    state[name + "/exp_avg"] = avg;
    state[name + "/exp_avg_sq"] = sq;
  }
  state["step"] = dtrain::scalar_tensor(7, dtrain::TensorOptions().with_dtype(DType::i64));
  return state;
}

std::shared_ptr<nn::Gpt> gpt_on(par::ProcessMesh& mesh, const nn::GptConfig& c,
                                nn::GptStage stage = {}) {
  return std::make_shared<nn::Gpt>(c, std::make_shared<par::TensorParallel>(mesh.tp()), stage);
}

// The 2-stage split of small_gpt's 2 blocks.
nn::GptStage stage_of(const par::ProcessMesh& mesh) {
  if (mesh.shape().pp == 1) return {};
  return mesh.is_first_stage() ? nn::GptStage{true, 0, 1, false} : nn::GptStage{false, 1, 2, true};
}

// Loads the checkpoint into a model built with another seed (so its own values are
// wrong) and compares every key with the slice of the 1-process reference state.
void expect_loads_reference(const std::string& dir, par::ProcessMesh& mesh, const TensorMap& ref) {
  auto model = gpt_on(mesh, small_gpt(/*seed=*/99), stage_of(mesh));
  const TensorMap like = make_state(*model);
  const TensorMap got = par::load_gpt_sharded(dir, *model, like);
  ASSERT_EQ(got.size(), like.size());
  for (const auto& [key, t] : like) {
    SCOPED_TRACE(key + " on rank " + std::to_string(mesh.rank()));
    ASSERT_EQ(got.count(key), 1u);
    auto spec = model->shard_specs().find(key.substr(0, key.find('/')));
    const Tensor want = spec == model->shard_specs().end()
                            ? ref.at(key)
                            : slice(ref.at(key), spec->second.dim, spec->second.rank,
                                    spec->second.parts);
    EXPECT_SAME(got.at(key), want);
    if (key == "wte.weight") {
      EXPECT_FALSE(same_bits(t, want));  // the seeds really differ
    }
  }
}

void save_at(const std::string& dir, const par::MeshShape& shape) {
  run_ranks(shape.world(), [&](Communicator& w) {
    par::ProcessMesh mesh(w, shape);
    auto model = gpt_on(mesh, small_gpt(), stage_of(mesh));
    par::save_gpt_sharded(dir, *model, mesh, make_state(*model), {{"saved_at", shape.str()}});
  });
}

void load_at(const std::string& dir, const par::MeshShape& shape, const TensorMap& ref) {
  SCOPED_TRACE("loaded at " + shape.str());
  run_ranks(shape.world(), [&](Communicator& w) {
    par::ProcessMesh mesh(w, shape);
    expect_loads_reference(dir, mesh, ref);
  });
}

TEST_F(CheckpointTest, GptSavedAtDp2Tp2LoadsAtOtherMeshes) {
  const TensorMap ref = make_state(nn::Gpt(small_gpt()));
  save_at(dir_, {2, 2, 1});
  EXPECT_EQ(par::ShardedCheckpointReader(dir_).meta()["saved_at"], "dp=2,tp=2,pp=1");
  EXPECT_FALSE(fs::exists(dir_ + "/shard-2.dtrn"));  // dp index 1 writes nothing
  for (const char* spec : {"tp=4", "dp=1", "dp=4", "pp=2"}) {
    load_at(dir_, par::MeshShape::parse(spec), ref);
  }
}

// A pipeline with tp saves too: the last stage's copy of wte is left to the first.
TEST_F(CheckpointTest, GptSavedAtAPipelineLoadsAtTp2) {
  const TensorMap ref = make_state(nn::Gpt(small_gpt()));
  save_at(dir_, par::MeshShape::parse("tp=2,pp=2"));
  par::ShardedCheckpointReader reader(dir_);
  for (const std::string& name : reader.names()) EXPECT_EQ(ref.count(name), 1u) << name;
  EXPECT_EQ(reader.names().size(), ref.size());
  nlohmann::json manifest = nlohmann::json::parse(std::ifstream(dir_ + "/manifest.json"));
  std::vector<std::string> wte_files;
  for (const auto& p : manifest["tensors"]["wte.weight"]["pieces"]) wte_files.push_back(p["file"]);
  EXPECT_EQ(wte_files, (std::vector<std::string>{"shard-0.dtrn", "shard-1.dtrn"}));  // stage 0
  for (const char* last : {"/shard-2.dtrn", "/shard-3.dtrn"}) {
    const dtrain::Archive a = dtrain::load_archive(dir_ + last);
    EXPECT_EQ(a.tensors.count("wte.weight"), 0u) << last;
    EXPECT_EQ(a.tensors.count("h.1.mlp.fc_weight"), 1u) << last;  // split over tp: both write
  }
  load_at(dir_, par::MeshShape::parse("tp=2"), ref);
}

TEST_F(CheckpointTest, GptOfAnotherShapeIsRefusedNamingTensorAndShapes) {
  save_at(dir_, {1, 1, 1});
  nn::GptConfig other = small_gpt();
  other.n_embd = 8;
  nn::Gpt model(other);
  EXPECT_THROW(par::load_gpt_sharded(dir_, model, make_state(model)), dtrain::CheckpointError);
  TensorMap like{{"wte.weight", model.state_dict().at("wte.weight")}};
  try {
    par::load_gpt_sharded(dir_, model, like);
    FAIL() << "a checkpoint of another width loaded";
  } catch (const dtrain::CheckpointError& e) {
    const std::string m = e.what();
    const Shape saved{small_gpt().vocab_size, small_gpt().n_embd};
    const Shape wanted{other.vocab_size, other.n_embd};
    for (const std::string& want : {dir_, std::string("wte.weight"), dtrain::shape_str(saved),
                                    dtrain::shape_str(wanted)}) {
      EXPECT_NE(m.find(want), std::string::npos) << m;
    }
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
  TensorMap extra{{"no.such.tensor", dtrain::zeros({2})}};
  EXPECT_THROW(par::load_gpt_sharded(dir_, model, extra), dtrain::CheckpointError);
}

// A slot of the wrong shape on one rank fails the save there (ShapeError naming the
// key) and on every other rank (CheckpointError); nothing is written.
TEST_F(CheckpointTest, GptSaveWithABadSlotFailsOnEveryRank) {
  std::atomic<int> errors{0};
  run_ranks(2, [&](Communicator& w) {
    par::ProcessMesh mesh(w, par::MeshShape::parse("tp=2"));
    auto model = gpt_on(mesh, small_gpt());
    TensorMap state = make_state(*model);
    if (w.rank() == 1) state["wpe.weight/exp_avg"] = dtrain::zeros({3});
    try {
      par::save_gpt_sharded(dir_, *model, mesh, state, {});
    } catch (const dtrain::ShapeError& e) {
      if (w.rank() == 1) ++errors;
      EXPECT_NE(std::string(e.what()).find("wpe.weight/exp_avg"), std::string::npos) << e.what();
    } catch (const dtrain::CheckpointError&) {
      if (w.rank() == 0) ++errors;
    }
  });
  EXPECT_EQ(errors.load(), 2);
  EXPECT_FALSE(fs::exists(dir_));
  EXPECT_FALSE(fs::exists(dir_ + ".tmp"));
}

}  // namespace
