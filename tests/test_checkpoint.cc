// Sharded checkpoints (dtrain/engine/checkpoint.h, dtrain/common/checkpoint_store.h)
// and the `dtrain ckpt` command. Oracles: the state before saving (bit-exact
// comparison), the samplers' own remaining indices, an independent safetensors reader
// (tests/safetensors_reader.py, struct only), and the files on disk.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/checkpoint.h"
#include "dtrain/engine/nn/models.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/adam.h"
#include "dtrain/engine/optim/lr_scheduler.h"
#include "dtrain/engine/serialize.h"
#include "subprocess.h"

#ifndef DTRAIN_BIN
#error "DTRAIN_BIN must point at the dtrain binary"
#endif
#ifndef DTRAIN_TESTS_DIR
#error "DTRAIN_TESTS_DIR must point at the tests folder"
#endif

namespace fs = std::filesystem;
using namespace dtrain;
using dtrain::ckpt::CheckpointStore;
using dtrain::ckpt::Manifest;
using dtrain::ckpt::TrainingState;

namespace {

constexpr int64_t kDatasetSize = 103;
constexpr uint64_t kDataSeed = 7;

fs::path scratch(const std::string& name) {
  return dtrain::testing::scratch_dir("dtrain_test_checkpoint", name);
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// One data-parallel rank: model, Adam, StepLR, sampler, two named generators.
struct Replica {
  std::shared_ptr<nn::Sequential> model;
  std::unique_ptr<optim::Adam> opt;
  std::unique_ptr<optim::StepLR> sched;
  std::unique_ptr<data::DistributedSampler> sampler;
  Generator dropout, augment;

  Replica(const std::string& model_name, uint64_t init_seed, int rank, int world) {
    Generator g(init_seed);
    model = nn::make_model(model_name, g);
    opt = std::make_unique<optim::Adam>(model->parameters(), optim::AdamOptions(0.01));
    sched = std::make_unique<optim::StepLR>(*opt, optim::StepLROptions(1).gamma(0.5));
    sampler = std::make_unique<data::DistributedSampler>(kDatasetSize, rank, world, kDataSeed);
    dropout.reseed(1000 + static_cast<uint64_t>(rank));
    augment.reseed(2000 + static_cast<uint64_t>(rank));
  }
  // One identical training step on every replica (same batch), plus per-rank progress.
  void train_step(const std::string& model_name, int64_t samples) {
    Generator bg(99);
    nn::Batch b = nn::make_random_batch(model_name, 4, bg);
    opt->zero_grad();
    Tensor loss = cross_entropy(model->forward(b.input), b.target);
    loss.backward();
    opt->step();
    sched->step();
    sampler->advance(samples);
    dropout.next_u64();
    augment.next_u32();
  }
  TrainingState state(int64_t step, int64_t epoch) {
    TrainingState s;
    s.model = model.get();
    s.optimizer = opt.get();
    s.scheduler = sched.get();
    s.sampler = sampler.get();
    s.generators = {{"dropout", &dropout}, {"augment", &augment}};
    s.step = step;
    s.epoch = epoch;
    return s;
  }
};

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) return false;
  Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.raw_data(), cb.raw_data(), ca.nbytes()) == 0;
}

void expect_same_dicts(const std::map<std::string, Tensor>& a,
                       const std::map<std::string, Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, t] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_TRUE(same_bytes(t, b.at(k))) << k;
  }
}

// N trained replicas at one step; the sampler of rank r has consumed `consumed` samples.
std::vector<std::unique_ptr<Replica>> trained_world(int n, const std::string& model_name = "mlp",
                                                    int64_t consumed = 6) {
  std::vector<std::unique_ptr<Replica>> out;
  for (int r = 0; r < n; ++r) {
    out.push_back(std::make_unique<Replica>(model_name, 5, r, n));
    out.back()->sampler->set_epoch(1);
    out.back()->train_step(model_name, consumed / 2);
    out.back()->train_step(model_name, consumed - consumed / 2);
  }
  return out;
}

// Phase 1 on every rank, then phase 2.
Manifest save_world(const CheckpointStore& store, std::vector<std::unique_ptr<Replica>>& world,
                    int64_t step, int keep_last = 0) {
  Manifest m;
  m.name = ckpt::checkpoint_name(step);
  m.step = step;
  m.epoch = 1;
  m.world_size = static_cast<int32_t>(world.size());
  m.config = {{"model", "mlp"}, {"seed", 5}};
  for (size_t r = 0; r < world.size(); ++r) {
    TrainingState s = world[r]->state(step, 1);
    s.extra = {{"rank_note", static_cast<int>(r)}};
    m.shards.push_back(
        ckpt::write_shard(store, m.name, s, static_cast<int>(r), static_cast<int>(world.size())));
  }
  store.commit(m, keep_last);
  return m;
}

std::string shard_path(const CheckpointStore& store, const Manifest& m, int rank) {
  return (fs::path(store.folder(m.name)) / m.shards[static_cast<size_t>(rank)].file).string();
}

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x01);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const CheckpointError& e) {
    return e.message();
  }
  return "(no CheckpointError)";
}

// ---------------------------------------------------------------- round trips

class RoundTrip : public ::testing::TestWithParam<int> {};

TEST_P(RoundTrip, SameWorldSizeIsBitExact) {
  const int n = GetParam();
  CheckpointStore store(scratch("roundtrip_" + std::to_string(n)).string());
  auto world = trained_world(n);
  Manifest m = save_world(store, world, 12);

  // Each tensor lives in exactly one shard, and with N > 1 the work is spread.
  std::map<std::string, int> holders;
  int shards_with_tensors = 0;
  for (int r = 0; r < n; ++r) {
    Archive a = load_archive(shard_path(store, m, r));
    shards_with_tensors += a.tensors.empty() ? 0 : 1;
    for (const auto& [k, t] : a.tensors) ++holders[k];
  }
  const size_t expected = world[0]->model->state_dict().size() + world[0]->opt->state_dict().size();
  EXPECT_EQ(holders.size(), expected);
  for (const auto& [k, c] : holders) EXPECT_EQ(c, 1) << k;
  EXPECT_EQ(shards_with_tensors, n);

  for (int r = 0; r < n; ++r) {
    Replica fresh("mlp", 77, r, n);  // different init, nothing consumed
    TrainingState s = fresh.state(0, 0);
    ckpt::load(store, store.read_manifest(m.name), s, r, n);
    expect_same_dicts(world[static_cast<size_t>(r)]->model->state_dict(),
                      fresh.model->state_dict());
    expect_same_dicts(world[static_cast<size_t>(r)]->opt->state_dict(), fresh.opt->state_dict());
    EXPECT_EQ(fresh.opt->lr(), world[static_cast<size_t>(r)]->opt->lr());
    EXPECT_EQ(fresh.sched->last_epoch(), world[static_cast<size_t>(r)]->sched->last_epoch());
    EXPECT_EQ(fresh.sampler->state(), world[static_cast<size_t>(r)]->sampler->state());
    EXPECT_EQ(fresh.sampler->remaining_indices(),
              world[static_cast<size_t>(r)]->sampler->remaining_indices());
    EXPECT_EQ(fresh.dropout.next_u64(), world[static_cast<size_t>(r)]->dropout.next_u64());
    EXPECT_EQ(fresh.augment.next_u64(), world[static_cast<size_t>(r)]->augment.next_u64());
    EXPECT_EQ(s.step, 12);
    EXPECT_EQ(s.epoch, 1);
    EXPECT_EQ(s.extra, (nlohmann::json{{"rank_note", r}}));
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, RoundTrip, ::testing::Values(1, 2, 3));

TEST(Checkpoint, ResumedTrainingContinuesBitExactly) {
  CheckpointStore store(scratch("resume_exact").string());
  auto world = trained_world(1);
  Manifest m = save_world(store, world, 2);
  Replica resumed("mlp", 123, 0, 1);
  TrainingState s = resumed.state(0, 0);
  ckpt::load(store, m, s, 0, 1);
  for (int i = 0; i < 3; ++i) {
    world[0]->train_step("mlp", 3);
    resumed.train_step("mlp", 3);
  }
  expect_same_dicts(world[0]->model->state_dict(), resumed.model->state_dict());
  expect_same_dicts(world[0]->opt->state_dict(), resumed.opt->state_dict());
}

// ---------------------------------------------------------------- N -> M

struct Resize {
  int n, m;
};
class Reshard : public ::testing::TestWithParam<Resize> {};

TEST_P(Reshard, ModelOptimizerAndSamplesCarryOver) {
  const auto [n, mm] = GetParam();
  CheckpointStore store(scratch(fmt::format("reshard_{}_{}", n, mm)).string());
  auto world = trained_world(n, "mlp", 7);
  Manifest m = save_world(store, world, 20);

  // What the N ranks had left: the remaining entries at padded positions < dataset size.
  std::multiset<int64_t> left;
  for (int r = 0; r < n; ++r) {
    auto rem = world[static_cast<size_t>(r)]->sampler->remaining_indices();
    int64_t pos = world[static_cast<size_t>(r)]->sampler->position();
    for (size_t k = 0; k < rem.size(); ++k) {
      if (r + (pos + static_cast<int64_t>(k)) * n < kDatasetSize) left.insert(rem[k]);
    }
  }
  ASSERT_EQ(left.size(), static_cast<size_t>(kDatasetSize - 7 * n));

  std::multiset<int64_t> got;
  std::set<std::pair<uint64_t, uint64_t>> gen_states;
  for (int r = 0; r < mm; ++r) {
    Replica fresh("mlp", 31, r, mm);
    TrainingState s = fresh.state(0, 0);
    ckpt::load(store, m, s, r, mm);
    expect_same_dicts(world[0]->model->state_dict(), fresh.model->state_dict());
    expect_same_dicts(world[0]->opt->state_dict(), fresh.opt->state_dict());
    EXPECT_EQ(fresh.sampler->epoch(), 1);
    fresh.sampler->set_epoch(1);  // the restored epoch keeps its position
    for (int64_t i : fresh.sampler->remaining_indices()) got.insert(i);
    auto st = fresh.dropout.get_state();
    gen_states.insert({st.state, st.inc});
    if (r < n) {  // an existing rank keeps its own stream
      auto want = world[static_cast<size_t>(r)]->dropout.get_state();
      EXPECT_EQ(st.state, want.state);
      EXPECT_EQ(st.inc, want.inc);
    }
    // Deterministic: loading again gives the same streams.
    Replica again("mlp", 32, r, mm);
    TrainingState s2 = again.state(0, 0);
    ckpt::load(store, m, s2, r, mm);
    EXPECT_EQ(again.dropout.next_u64(), fresh.dropout.next_u64());
  }
  EXPECT_EQ(gen_states.size(), static_cast<size_t>(mm));  // every rank its own stream
  // Nothing lost; beyond what was left, only padding (fewer than one per new rank),
  // which repeats samples that were left.
  for (int64_t i : std::set<int64_t>(left.begin(), left.end())) {
    EXPECT_GE(got.count(i), left.count(i)) << "sample " << i << " lost";
  }
  ASSERT_GE(got.size(), left.size());
  EXPECT_LT(got.size() - left.size(), static_cast<size_t>(mm));
  for (int64_t i : got) EXPECT_TRUE(left.count(i)) << "sample " << i << " was already consumed";
}

INSTANTIATE_TEST_SUITE_P(Worlds, Reshard,
                         ::testing::Values(Resize{2, 3}, Resize{4, 2}, Resize{3, 1}),
                         [](const auto& info) {
                           return fmt::format("{}to{}", info.param.n, info.param.m);
                         });

TEST(Sampler, ReshardOfTheSameWorldIsTheGlobalPrefix) {
  // Oracle: the padded permutation written out; 3 ranks consumed 4 each -> prefix 12.
  std::vector<data::SamplerState> st(3, data::SamplerState{2, 4, 0});
  data::SamplerState s = data::reshard(st, 20);
  EXPECT_EQ(s, (data::SamplerState{2, 0, 12}));
  data::DistributedSampler one(20, 0, 1, 3);
  one.load_state(s);
  one.set_epoch(2);
  auto perm = data::seeded_permutation(20, 3, 2);
  EXPECT_EQ(one.remaining_indices(), std::vector<int64_t>(perm.begin() + 12, perm.end()));
  one.set_epoch(3);  // the next epoch is whole again
  EXPECT_EQ(one.num_samples(), 20);
  st[1].offset = 1;
  EXPECT_THROW(data::reshard(st, 20), InvalidArgument);
}

// ---------------------------------------------------------------- failures

TEST(Checkpoint, FlippedByteNamesTheShardAndFallsBack) {
  CheckpointStore store(scratch("flipped").string());
  auto world = trained_world(2);
  Manifest a = save_world(store, world, 10);
  world[0]->train_step("mlp", 1);
  world[1]->train_step("mlp", 1);
  Manifest b = save_world(store, world, 20);
  ASSERT_EQ(store.latest()->name, b.name);
  flip_byte(shard_path(store, b, 1), b.shards[1].bytes - 3);

  std::string msg = error_of([&] { store.verify(b); });
  EXPECT_TRUE(contains(msg, "shard-00001-of-00002.dtrn")) << msg;
  EXPECT_TRUE(contains(msg, "corrupt")) << msg;
  std::vector<std::string> log;
  auto found = store.find_resumable([&](const std::string& s) { log.push_back(s); });
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->name, a.name);
  ASSERT_EQ(log.size(), 1u);
  EXPECT_TRUE(contains(log[0], "checkpoint step-00000020 skipped")) << log[0];
  EXPECT_TRUE(contains(log[0], "shard-00001-of-00002.dtrn")) << log[0];

  // load of the corrupt one names the shard and changes nothing.
  Replica fresh("mlp", 9, 0, 2);
  auto before = fresh.model->state_dict();
  std::map<std::string, Tensor> copy;
  for (auto& [k, t] : before) copy.emplace(k, t.clone());
  TrainingState s = fresh.state(0, 0);
  msg = error_of([&] { ckpt::load(store, b, s, 0, 2); });
  EXPECT_TRUE(contains(msg, "shard-00001-of-00002.dtrn")) << msg;
  expect_same_dicts(copy, fresh.model->state_dict());
  EXPECT_EQ(fresh.sampler->position(), 0);
  // The fallback loads.
  ckpt::load(store, *found, s, 0, 2);
  EXPECT_EQ(s.step, 10);
}

TEST(Checkpoint, ShardsWithoutManifestAreNotCommitted) {
  CheckpointStore store(scratch("uncommitted").string());
  auto world = trained_world(2);
  Manifest a = save_world(store, world, 10);
  // Step 20: both shards written, then "killed" before the manifest.
  std::string name = ckpt::checkpoint_name(20);
  for (int r = 0; r < 2; ++r) {
    ckpt::write_shard(store, name, world[static_cast<size_t>(r)]->state(20, 1), r, 2);
  }
  EXPECT_TRUE(fs::exists(fs::path(store.folder(name)) / "shard-00000-of-00002.dtrn"));
  EXPECT_EQ(store.latest()->name, a.name);
  ASSERT_EQ(store.committed().size(), 1u);
  EXPECT_EQ(store.find_resumable(nullptr)->name, a.name);
  EXPECT_TRUE(contains(error_of([&] { store.read_manifest(name); }), "not committed"));
  Replica fresh("mlp", 9, 1, 2);
  TrainingState s = fresh.state(0, 0);
  ckpt::load(store, *store.latest(), s, 1, 2);
  EXPECT_EQ(s.step, 10);
  // The next commit cleans the older uncommitted folder up.
  save_world(store, world, 30);
  EXPECT_FALSE(fs::exists(store.folder(name)));
  EXPECT_TRUE(fs::exists(store.folder(a.name)));
}

TEST(Checkpoint, DamagedFilesAreNamed) {
  CheckpointStore store(scratch("damaged").string());
  auto world = trained_world(2);
  Manifest m = save_world(store, world, 10);
  const std::string s0 = shard_path(store, m, 0), s1 = shard_path(store, m, 1);

  fs::resize_file(s0, m.shards[0].bytes - 10);  // truncated
  std::string msg = error_of([&] { store.verify(m); });
  EXPECT_TRUE(contains(msg, s0) && contains(msg, "bytes")) << msg;
  fs::remove(s1);  // and one missing: verify_shard names it
  msg = error_of([&] { store.verify_shard(m, m.shards[1]); });
  EXPECT_TRUE(contains(msg, s1) && contains(msg, "missing")) << msg;
  EXPECT_FALSE(store.find_resumable(nullptr).has_value());

  const std::string manifest = (fs::path(store.folder(m.name)) / "manifest.json").string();
  std::ofstream(manifest) << "{\"format\": \"dtrain-checkpoint-manifest\", \"version\": 1, ";
  msg = error_of([&] { store.read_manifest(m.name); });
  EXPECT_TRUE(contains(msg, manifest) && contains(msg, "malformed")) << msg;
  nlohmann::json j = m.to_json();
  j.erase("world_size");
  std::ofstream(manifest) << j.dump();
  msg = error_of([&] { store.read_manifest(m.name); });
  EXPECT_TRUE(contains(msg, manifest) && contains(msg, "world_size")) << msg;
  EXPECT_TRUE(store.committed().empty());

  const std::string latest = (fs::path(store.root()) / "latest").string();
  std::ofstream(latest) << "../../etc/passwd\n";
  msg = error_of([&] { store.latest(); });
  EXPECT_TRUE(contains(msg, latest) && contains(msg, "malformed")) << msg;
  std::vector<std::string> log;
  EXPECT_FALSE(store.find_resumable([&](const std::string& s) { log.push_back(s); }));
  ASSERT_FALSE(log.empty());
  EXPECT_TRUE(contains(log[0], "latest")) << log[0];
}

TEST(Checkpoint, CommitRefusesAShardThatDoesNotMatch) {
  CheckpointStore store(scratch("refuse").string());
  auto world = trained_world(2);
  Manifest a = save_world(store, world, 10, /*keep_last=*/1);
  Manifest b;
  b.name = ckpt::checkpoint_name(20);
  b.step = 20;
  b.world_size = 2;
  for (int r = 0; r < 2; ++r) {
    b.shards.push_back(
        ckpt::write_shard(store, b.name, world[static_cast<size_t>(r)]->state(20, 1), r, 2));
  }
  b.shards[1].checksum = "xxh3-64:0000000000000000";
  std::string msg = error_of([&] { store.commit(b, 1); });
  EXPECT_TRUE(contains(msg, "shard-00001-of-00002.dtrn")) << msg;
  EXPECT_FALSE(fs::exists(fs::path(store.folder(b.name)) / "manifest.json"));
  EXPECT_EQ(store.latest()->name, a.name);  // and with keep_last 1, a is still there
  EXPECT_TRUE(fs::exists(fs::path(store.folder(a.name)) / "manifest.json"));
}

TEST(Checkpoint, RetentionKeepsTheNewestK) {
  CheckpointStore store(scratch("retention").string());
  auto world = trained_world(1);
  std::vector<std::string> names;
  for (int64_t step : {10, 20, 30, 40}) {
    names.push_back(save_world(store, world, step, /*keep_last=*/2).name);
    std::vector<std::string> have;
    for (const auto& c : store.committed()) have.push_back(c.name);
    std::vector<std::string> want(names.rbegin(), names.rend());
    if (want.size() > 2) want.resize(2);
    EXPECT_EQ(have, want) << "after " << names.back();
    EXPECT_EQ(store.latest()->name, names.back());
  }
  EXPECT_FALSE(fs::exists(store.folder(names[0])));
  EXPECT_FALSE(fs::exists(store.folder(names[1])));
  // keep_last 0 keeps everything.
  save_world(store, world, 50, 0);
  EXPECT_EQ(store.committed().size(), 3u);
}

TEST(Checkpoint, ManifestRoundTripsAndChecksumIsXxh3) {
  Manifest m;
  m.name = ckpt::checkpoint_name(120);
  m.step = 120;
  m.epoch = 3;
  m.world_size = 1;
  m.generation = 4;
  m.shards.push_back({0, "shard-00000-of-00001.dtrn", 99, "xxh3-64:0123456789abcdef"});
  m.config = {{"lr", 0.1}};
  EXPECT_EQ(m.name, "step-00000120");
  Manifest back = Manifest::from_json(m.to_json(), "here");
  EXPECT_EQ(back.to_json(), m.to_json());
  nlohmann::json j = m.to_json();
  j["shards"][0]["file"] = "../escape";
  EXPECT_TRUE(contains(error_of([&] { Manifest::from_json(j, "here"); }), "here"));
  // XXH3-64 of the empty input is 0x2d06800538d394c2 (the xxHash reference value).
  fs::path empty = scratch("xxh") / "empty";
  std::ofstream(empty).close();
  EXPECT_EQ(ckpt::file_checksum(empty.string()), "xxh3-64:2d06800538d394c2");
}

// ---------------------------------------------------------------- safetensors

// The model's state_dict written independently: name, dtype, shape, raw bytes (hex).
void write_reference_dump(const nn::Module& model, const std::string& path) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, t] : model.state_dict()) {
    Tensor c = t.contiguous();
    std::string hex;
    const auto* p = static_cast<const unsigned char*>(c.raw_data());
    for (size_t i = 0; i < c.nbytes(); ++i) hex += fmt::format("{:02x}", p[i]);
    std::vector<double> values;
    if (c.dtype() == DType::f32) {
      for (int64_t i = 0; i < c.numel(); ++i) values.push_back(c.data<float>()[i]);
    }
    j[k] = {
        {"dtype", dtype_name(c.dtype())}, {"shape", c.shape()}, {"hex", hex}, {"values", values}};
  }
  std::ofstream(path) << j.dump();
}

dtrain::testing::CommandResult run_reader(const std::string& file, const std::string& dump) {
  return dtrain::testing::run_command(
      fmt::format("python3 {}/safetensors_reader.py {} {}", DTRAIN_TESTS_DIR, file, dump));
}

TEST(Safetensors, SeedCnnExportReadsBackIdentically) {
  fs::path dir = scratch("safetensors");
  CheckpointStore store((dir / "ckpt").string());
  auto world = trained_world(2, "seed-cnn");
  Manifest m = save_world(store, world, 5);
  const std::string out = (dir / "model.safetensors").string();
  ckpt::export_safetensors(store, m, out);
  const std::string dump = (dir / "reference.json").string();
  write_reference_dump(*world[0]->model, dump);
  auto r = run_reader(out, dump);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "tensors identical")) << r.out;

  // The reader can fail: one changed byte in the export is found.
  flip_byte(out, fs::file_size(out) - 1);
  r = run_reader(out, dump);
  EXPECT_NE(r.code, 0) << r.out;
}

// ---------------------------------------------------------------- the CLI

dtrain::testing::CommandResult dtrain_cmd(const std::string& args) {
  return dtrain::testing::run_command(std::string(DTRAIN_BIN) + " " + args);
}

TEST(CkptCli, InspectListsAndVerifies) {
  fs::path root = scratch("cli_inspect");
  CheckpointStore store(root.string());
  auto world = trained_world(2);
  save_world(store, world, 10);
  Manifest b = save_world(store, world, 20);
  auto r = dtrain_cmd("ckpt inspect " + root.string());
  EXPECT_EQ(r.code, 0) << r.out;
  for (const char* want :
       {"checkpoint step-00000020  (latest)", "checkpoint step-00000010", "world size 2",
        "shard-00001-of-00002.dtrn", "OK", "model.1.weight", "optim.lr", "all checksums OK"}) {
    EXPECT_TRUE(contains(r.out, want)) << want << "\n" << r.out;
  }
  EXPECT_FALSE(contains(r.out, "CORRUPT")) << r.out;
  r = dtrain_cmd("ckpt inspect " + store.folder(b.name));  // one checkpoint folder
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_FALSE(contains(r.out, "step-00000010")) << r.out;

  flip_byte(shard_path(store, b, 1), 40);
  r = dtrain_cmd("ckpt inspect " + root.string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "CORRUPT")) << r.out;
  EXPECT_TRUE(contains(r.out, "dtrain: error:")) << r.out;
  EXPECT_TRUE(contains(r.out, "step-00000020/shard-00001-of-00002.dtrn")) << r.out;

  r = dtrain_cmd("ckpt inspect " + (root / "nowhere").string());
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "nowhere")) << r.out;
  EXPECT_FALSE(fs::exists(root / "nowhere"));
}

TEST(CkptCli, ExportWritesWhatTheLibraryWrites) {
  fs::path root = scratch("cli_export");
  CheckpointStore store((root / "ckpt").string());
  auto world = trained_world(3);
  Manifest a = save_world(store, world, 10);
  world[0]->train_step("mlp", 1);
  world[1]->train_step("mlp", 1);
  world[2]->train_step("mlp", 1);
  save_world(store, world, 20);
  const std::string lib = (root / "lib.safetensors").string();
  ckpt::export_safetensors(store, a, lib);
  const std::string cli = (root / "cli.safetensors").string();
  auto r = dtrain_cmd(fmt::format("ckpt export --format safetensors --checkpoint {} {} --out {}",
                                  a.name, store.root(), cli));
  ASSERT_EQ(r.code, 0) << r.out;
  auto read = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  EXPECT_EQ(read(cli), read(lib));
  const std::string dump = (root / "reference.json").string();
  write_reference_dump(*world[0]->model, dump);  // the latest (step 20) weights
  r = dtrain_cmd(fmt::format("ckpt export {} --out {}", store.root(), cli));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(contains(r.out, "step-00000020")) << r.out;
  EXPECT_EQ(run_reader(cli, dump).code, 0);

  r = dtrain_cmd(fmt::format("ckpt export --format onnx {} --out {}", store.root(), cli));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "onnx")) << r.out;
  r = dtrain_cmd(
      fmt::format("ckpt export --checkpoint step-00000099 {} --out {}", store.root(), cli));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_TRUE(contains(r.out, "step-00000099")) << r.out;
  r = dtrain_cmd("ckpt export " + store.root());  // --out is required
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_TRUE(contains(r.out, "--out")) << r.out;
}

}  // namespace
