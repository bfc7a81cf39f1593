// Sharded training checkpoints; see checkpoint.h.
#include "dtrain/engine/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <system_error>

#include "dtrain/common/error.h"
#include "dtrain/engine/serialize.h"

namespace dtrain::ckpt {

namespace fs = std::filesystem;

namespace {

constexpr const char* kShardFormat = "dtrain-sharded-checkpoint";
constexpr int kShardVersion = 1;

// Every model and optimizer tensor of s, named "model.<key>" / "optim.<key>".
TensorMap all_tensors(const TrainingState& s) {
  TensorMap out;
  for (const auto& [k, t] : s.model->state_dict()) out.emplace("model." + k, t);
  if (s.optimizer != nullptr) {
    for (const auto& [k, t] : s.optimizer->state_dict()) out.emplace("optim." + k, t);
  }
  return out;
}

// name -> owning rank: largest tensors first (ties by name), each to the rank with the
// fewest bytes so far (ties to the lowest rank). Depends only on names, sizes, world.
std::map<std::string, int> partition(const TensorMap& tensors, int world_size) {
  std::vector<std::pair<size_t, std::string>> order;
  for (const auto& [k, t] : tensors) order.emplace_back(t.nbytes(), k);
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::vector<size_t> load(static_cast<size_t>(world_size), 0);
  std::map<std::string, int> owner;
  for (const auto& [bytes, k] : order) {
    auto r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    load[r] += bytes;
    owner[k] = static_cast<int>(r);
  }
  return owner;
}

nlohmann::json sampler_json(const data::DistributedSampler& s) {
  auto st = s.state();
  return {{"epoch", st.epoch},         {"position", st.position},
          {"offset", st.offset},       {"dataset_size", s.dataset_size()},
          {"rank", s.rank()},          {"world_size", s.world_size()},
          {"seed", s.seed()},          {"shuffle", s.shuffle()},
          {"drop_last", s.drop_last()}};
}

// A loaded, verified shard.
struct Shard {
  std::string path;
  Archive archive;
};

template <typename T>
T meta_field(const nlohmann::json& meta, const char* key, const std::string& path) {
  DTRAIN_CHECK(meta.contains(key), CheckpointError, "shard {}: metadata lacks '{}'", path, key);
  try {
    return meta.at(key).get<T>();
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(CheckpointError, "shard {}: metadata field '{}' is malformed: {}", path, key,
                 e.what());
  }
}

// Verifies and reads every shard of m, and checks that each holds what the manifest
// and the tensor index (in every shard's metadata) say.
std::vector<Shard> read_shards(const CheckpointStore& store, const Manifest& m) {
  DTRAIN_CHECK(m.shards.size() == static_cast<size_t>(m.world_size) && m.world_size >= 1,
               CheckpointError, "checkpoint {}: {} shards for world_size {}", m.name,
               m.shards.size(), m.world_size);
  std::vector<Shard> shards;
  for (const auto& e : m.shards) {
    Shard sh;
    sh.path = (fs::path(store.folder(m.name)) / e.file).string();
    store.verify_shard(m, e);
    try {
      sh.archive = load_archive(sh.path);
    } catch (const Error& err) {
      DTRAIN_THROW(CheckpointError, "checkpoint {}: shard {} (rank {}) is unreadable: {}", m.name,
                   sh.path, e.rank, err.message());
    }
    const auto& meta = sh.archive.metadata;
    DTRAIN_CHECK(meta.is_object() && meta.value("format", "") == kShardFormat, CheckpointError,
                 "shard {}: not a dtrain checkpoint shard", sh.path);
    DTRAIN_CHECK(meta_field<int>(meta, "version", sh.path) == kShardVersion, CheckpointError,
                 "shard {}: shard version {} is not supported (this build reads {})", sh.path,
                 meta_field<int>(meta, "version", sh.path), kShardVersion);
    DTRAIN_CHECK(meta_field<int>(meta, "rank", sh.path) == e.rank &&
                     meta_field<int>(meta, "world_size", sh.path) == m.world_size &&
                     meta_field<int64_t>(meta, "step", sh.path) == m.step,
                 CheckpointError,
                 "shard {}: holds rank {} of {} at step {}, the manifest expects rank {} of {} at "
                 "step {}",
                 sh.path, meta_field<int>(meta, "rank", sh.path),
                 meta_field<int>(meta, "world_size", sh.path),
                 meta_field<int64_t>(meta, "step", sh.path), e.rank, m.world_size, m.step);
    DTRAIN_CHECK(meta.contains("tensors") && meta["tensors"].is_object(), CheckpointError,
                 "shard {}: metadata lacks the tensor index", sh.path);
    shards.push_back(std::move(sh));
  }
  // Each tensor of the index is in exactly the shard the index names.
  const auto& index = shards[0].archive.metadata["tensors"];
  size_t held = 0;
  for (const auto& sh : shards) held += sh.archive.tensors.size();
  DTRAIN_CHECK(held == index.size(), CheckpointError,
               "checkpoint {}: the shards hold {} tensors, the index lists {}", m.name, held,
               index.size());
  for (const auto& [name, info] : index.items()) {
    const int owner = info.value("rank", -1);
    DTRAIN_CHECK(owner >= 0 && owner < m.world_size &&
                     shards[static_cast<size_t>(owner)].archive.tensors.count(name) == 1,
                 CheckpointError, "checkpoint {}: tensor '{}' is not in shard {} as indexed",
                 m.name, name, owner);
  }
  return shards;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

Generator::State generator_state(const nlohmann::json& meta, const std::string& name,
                                 const std::string& path) {
  const auto& gens = meta.value("generators", nlohmann::json::object());
  DTRAIN_CHECK(gens.is_object() && gens.contains(name), CheckpointError,
               "shard {}: no generator '{}' saved", path, name);
  try {
    return {gens[name].at("state").get<uint64_t>(), gens[name].at("inc").get<uint64_t>()};
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(CheckpointError, "shard {}: generator '{}' is malformed: {}", path, name,
                 e.what());
  }
}

data::SamplerState sampler_state(const nlohmann::json& j) {
  return {j.at("epoch").get<int64_t>(), j.at("position").get<int64_t>(),
          j.value("offset", int64_t{0})};
}

}  // namespace

ShardEntry write_shard(const CheckpointStore& store, const std::string& name,
                       const TrainingState& s, int rank, int world_size,
                       const WriteProgress& progress) {
  DTRAIN_CHECK(s.model != nullptr, InvalidArgument, "write_shard: TrainingState.model is null");
  DTRAIN_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, InvalidArgument,
               "write_shard: rank {} is outside [0, {})", rank, world_size);
  const std::string dir = store.folder(name);
  std::error_code ec;
  fs::create_directories(dir, ec);
  DTRAIN_CHECK(!ec, IoError, "cannot create checkpoint folder '{}': {}", dir, ec.message());

  const TensorMap tensors = all_tensors(s);
  const auto owner = partition(tensors, world_size);
  TensorMap mine;
  nlohmann::json index = nlohmann::json::object();
  for (const auto& [k, t] : tensors) {
    const int r = owner.at(k);
    index[k] = {{"rank", r}, {"dtype", dtype_name(t.dtype())}, {"shape", t.shape()}};
    if (r == rank) mine.emplace(k, t);
  }
  nlohmann::json gens = nlohmann::json::object();
  for (const auto& [gname, g] : s.generators) {
    DTRAIN_CHECK(g != nullptr, InvalidArgument, "write_shard: generator '{}' is null", gname);
    auto st = g->get_state();
    gens[gname] = {{"state", st.state}, {"inc", st.inc}};
  }
  nlohmann::json meta = {
      {"format", kShardFormat},
      {"version", kShardVersion},
      {"rank", rank},
      {"world_size", world_size},
      {"step", s.step},
      {"epoch", s.epoch},
      {"optimizer", s.optimizer ? nlohmann::json(s.optimizer->name()) : nullptr},
      {"scheduler_last_epoch", s.scheduler ? nlohmann::json(s.scheduler->last_epoch()) : nullptr},
      {"sampler", s.sampler ? sampler_json(*s.sampler) : nullptr},
      {"generators", gens},
      {"extra", s.extra},
      {"tensors", index}};
  const std::string file = shard_file_name(rank, world_size);
  const std::string path = (fs::path(dir) / file).string();
  save_archive(path, mine, meta, progress);
  ShardEntry e;
  e.rank = rank;
  e.file = file;
  e.bytes = fs::file_size(path, ec);
  DTRAIN_CHECK(!ec, IoError, "cannot stat '{}': {}", path, ec.message());
  e.checksum = file_checksum(path);
  return e;
}

void load(const CheckpointStore& store, const Manifest& m, TrainingState& s, int rank,
          int world_size) {
  DTRAIN_CHECK(s.model != nullptr, InvalidArgument, "checkpoint load: TrainingState.model is null");
  DTRAIN_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, InvalidArgument,
               "checkpoint load: rank {} is outside [0, {})", rank, world_size);
  const std::vector<Shard> shards = read_shards(store, m);
  const bool same_world = world_size == m.world_size;
  // The shard whose per-rank state this rank takes (sampler, generators, extra).
  const Shard& own = shards[static_cast<size_t>(rank < m.world_size ? rank : 0)];
  const auto& meta = own.archive.metadata;

  nn::StateDict model_sd;
  optim::StateDict optim_sd;
  for (const auto& sh : shards) {
    for (const auto& [k, t] : sh.archive.tensors) {
      if (k.rfind("model.", 0) == 0) {
        model_sd.emplace(k.substr(6), t);
      } else if (k.rfind("optim.", 0) == 0) {
        optim_sd.emplace(k.substr(6), t);
      } else {
        DTRAIN_THROW(CheckpointError, "shard {}: unexpected tensor '{}'", sh.path, k);
      }
    }
  }
  // Validate everything before anything in s changes.
  try {
    s.model->check_state_dict(model_sd, /*strict=*/true);
  } catch (const Error& e) {
    DTRAIN_THROW(CheckpointError, "checkpoint {}: the model does not fit: {}", m.name, e.message());
  }
  if (s.optimizer != nullptr) {
    const auto& saved = meta.value("optimizer", nlohmann::json());
    DTRAIN_CHECK(saved.is_string() && saved.get<std::string>() == s.optimizer->name(),
                 CheckpointError, "checkpoint {} holds optimizer state {}, but the optimizer is {}",
                 m.name, saved.dump(), s.optimizer->name());
  }
  std::optional<int64_t> sched_epoch;
  if (s.scheduler != nullptr) {
    const auto& v = meta.value("scheduler_last_epoch", nlohmann::json());
    DTRAIN_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0, CheckpointError,
                 "checkpoint {}: no scheduler position saved in {}", m.name, own.path);
    sched_epoch = v.get<int64_t>();
  }
  std::optional<data::DistributedSampler> sampler;
  if (s.sampler != nullptr) {
    DTRAIN_CHECK(s.sampler->rank() == rank && s.sampler->world_size() == world_size,
                 InvalidArgument,
                 "checkpoint load: the sampler is rank {} of {}, but loading as rank {} of {}",
                 s.sampler->rank(), s.sampler->world_size(), rank, world_size);
    std::vector<data::SamplerState> states;
    for (const auto& sh : shards) {
      const auto& j = sh.archive.metadata.value("sampler", nlohmann::json());
      DTRAIN_CHECK(j.is_object(), CheckpointError, "shard {}: no sampler state saved", sh.path);
      try {
        DTRAIN_CHECK(j.at("dataset_size").get<int64_t>() == s.sampler->dataset_size() &&
                         j.at("seed").get<uint64_t>() == s.sampler->seed() &&
                         j.at("shuffle").get<bool>() == s.sampler->shuffle() &&
                         j.at("drop_last").get<bool>() == s.sampler->drop_last(),
                     CheckpointError,
                     "shard {}: sampler was (dataset_size {}, seed {}, shuffle {}, drop_last {}), "
                     "this run's is (dataset_size {}, seed {}, shuffle {}, drop_last {})",
                     sh.path, j.at("dataset_size").dump(), j.at("seed").dump(),
                     j.at("shuffle").dump(), j.at("drop_last").dump(), s.sampler->dataset_size(),
                     s.sampler->seed(), s.sampler->shuffle(), s.sampler->drop_last());
        states.push_back(sampler_state(j));
      } catch (const nlohmann::json::exception& e) {
        DTRAIN_THROW(CheckpointError, "shard {}: sampler state is malformed: {}", sh.path,
                     e.what());
      }
    }
    data::SamplerState st;
    try {
      st = same_world ? states[static_cast<size_t>(rank)]
                      : data::reshard(states, s.sampler->dataset_size());
      sampler.emplace(*s.sampler);
      sampler->load_state(st);
    } catch (const InvalidArgument& e) {
      DTRAIN_THROW(CheckpointError, "checkpoint {}: sampler state does not fit: {}", m.name,
                   e.message());
    }
  }
  std::vector<Generator::State> gen_states;
  for (const auto& [gname, g] : s.generators) {
    DTRAIN_CHECK(g != nullptr, InvalidArgument, "checkpoint load: generator '{}' is null", gname);
    if (rank < m.world_size) {
      gen_states.push_back(generator_state(meta, gname, own.path));
    } else {
      // A rank that did not exist: derived from rank (rank % N)'s stream and the rank.
      const Shard& base = shards[static_cast<size_t>(rank % m.world_size)];
      Generator src;
      src.set_state(generator_state(base.archive.metadata, gname, base.path));
      Generator derived(src.next_u64() ^ splitmix64(static_cast<uint64_t>(rank)),
                        splitmix64(static_cast<uint64_t>(rank) + 0x5bd1e995ULL));
      gen_states.push_back(derived.get_state());
    }
  }
  const int64_t step = meta_field<int64_t>(meta, "step", own.path);
  const int64_t epoch = meta_field<int64_t>(meta, "epoch", own.path);
  nlohmann::json extra = meta.value("extra", nlohmann::json::object());

  // Archives load on the CPU. A model on a device gets its optimizer state there too
  // (per-parameter slots; the scalars "lr", "num_params", "state.<i>.step" stay on the
  // CPU); the model's own load_state_dict copies across devices itself.
  if (s.optimizer != nullptr && !s.optimizer->params().empty()) {
    const Device dev = s.optimizer->params().front().device();
    if (!dev.is_cpu()) {
      for (auto& [k, t] : optim_sd) {
        const bool scalar = k == "lr" || k == "num_params" ||
                            (k.size() > 5 && k.compare(k.size() - 5, 5, ".step") == 0);
        if (!scalar && t.defined()) t = t.to(dev);
      }
    }
  }
  // Apply. The optimizer validates before it changes anything, so it goes first.
  if (s.optimizer != nullptr) {
    try {
      s.optimizer->load_state_dict(optim_sd);
    } catch (const Error& e) {
      DTRAIN_THROW(CheckpointError, "checkpoint {}: the optimizer state does not fit: {}", m.name,
                   e.message());
    }
  }
  s.model->load_state_dict(model_sd, /*strict=*/true);
  if (sched_epoch) s.scheduler->set_last_epoch(*sched_epoch);
  if (sampler) *s.sampler = *sampler;
  for (size_t i = 0; i < gen_states.size(); ++i) s.generators[i].second->set_state(gen_states[i]);
  s.step = step;
  s.epoch = epoch;
  s.extra = std::move(extra);
}

void export_safetensors(const CheckpointStore& store, const Manifest& m, const std::string& path) {
  const std::vector<Shard> shards = read_shards(store, m);
  std::map<std::string, Tensor> weights;
  for (const auto& sh : shards) {
    for (const auto& [k, t] : sh.archive.tensors) {
      if (k.rfind("model.", 0) == 0) weights.emplace(k.substr(6), t.contiguous());
    }
  }
  DTRAIN_CHECK(!weights.empty(), CheckpointError, "checkpoint {} holds no model weights", m.name);
  auto st_dtype = [&](DType d, const std::string& k) -> const char* {
    switch (d) {
      case DType::f32:
        return "F32";
      case DType::f64:
        return "F64";
      case DType::f16:
        return "F16";
      case DType::bf16:
        return "BF16";
      case DType::i32:
        return "I32";
      case DType::i64:
        return "I64";
      case DType::u8:
        return "U8";
    }
    DTRAIN_THROW(UnsupportedError, "safetensors export: tensor '{}' has an unknown dtype", k);
  };
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}, {"dtrain_checkpoint", m.name}};
  uint64_t offset = 0;
  for (const auto& [k, t] : weights) {
    header[k] = {{"dtype", st_dtype(t.dtype(), k)},
                 {"shape", t.shape()},
                 {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');  // data starts 8-byte aligned
  std::string out(8, '\0');
  const uint64_t hlen = text.size();
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((hlen >> (8 * i)) & 0xff);
  out += text;
  out.reserve(out.size() + offset);
  for (const auto& [k, t] : weights) {
    out.append(static_cast<const char*>(t.raw_data()), t.nbytes());
  }
  write_file_atomic(path, out);
}

}  // namespace dtrain::ckpt
