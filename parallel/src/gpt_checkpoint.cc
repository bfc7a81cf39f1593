// save_gpt_sharded / load_gpt_sharded: the GPT's state keys mapped to global tensors
// and slices (gpt_checkpoint.h), on top of the generic store (sharded_checkpoint.h).
// Not here: file layout, atomicity, assembling slices (the store's job).
#include "dtrain/parallel/gpt_checkpoint.h"

#include <exception>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/parallel/sharded_checkpoint.h"

namespace dtrain::parallel {
namespace {

// Where key `key` (local shape `local`) lies in its global tensor on this rank.
struct Placement {
  bool parameter = false;  // false: a replicated non-parameter key
  bool replicated_over_tp = true;
  Shape global;
  int dim = -1;
  int64_t offset = 0;
};

Placement place(const nn::Gpt& gpt, const std::string& key, const Tensor& local) {
  const auto& specs = gpt.shard_specs();
  auto it = specs.find(key.substr(0, key.find('/')));
  if (it == specs.end()) return {false, true, local.shape(), -1, 0};
  const nn::ShardSpec& spec = it->second;
  Placement p{true, spec.parts == 1, spec.global_shape, -1, 0};
  int64_t length = 0;
  if (spec.parts > 1) {
    p.dim = spec.dim;
    length = spec.global_shape[static_cast<size_t>(spec.dim)] / spec.parts;
    p.offset = spec.rank * length;
  }
  const Shape want = piece_shape(spec.global_shape, p.dim, length);
  DTRAIN_CHECK(local.shape() == want, ShapeError,
               "gpt checkpoint: '{}' is {} on this rank, its slice of {} is {}", key,
               shape_str(local.shape()), shape_str(spec.global_shape), shape_str(want));
  return p;
}

bool writes(const nn::Gpt& gpt, ProcessMesh& mesh, const std::string& key, const Placement& p) {
  if (mesh.coord().dp != 0) return false;
  if (!p.parameter) return mesh.rank() == 0;
  if (p.replicated_over_tp && mesh.coord().tp != 0) return false;
  const bool tied_copy = key.substr(0, key.find('/')) == "wte.weight" && !gpt.stage().embedding;
  return !tied_copy;
}

}  // namespace

void save_gpt_sharded(const std::string& dir, const nn::Gpt& gpt, ProcessMesh& mesh,
                      const TensorMap& state, const nlohmann::json& meta) {
  std::vector<TensorPiece> pieces;
  std::exception_ptr error;
  try {
    for (const auto& [key, t] : state) {
      const Placement p = place(gpt, key, t);
      if (writes(gpt, mesh, key, p)) pieces.push_back({key, p.global, p.dim, p.offset, t});
    }
  } catch (...) {
    error = std::current_exception();
  }
  // A bad local state must still fail the save on every rank: hand save_sharded a piece
  // it refuses rather than leaving the others waiting.
  if (error) pieces = {TensorPiece{"", {}, -1, 0, Tensor()}};
  try {
    save_sharded(dir, mesh.world(), pieces, meta);
  } catch (...) {
    if (error) std::rethrow_exception(error);
    throw;
  }
}

TensorMap load_gpt_sharded(const std::string& dir, const nn::Gpt& gpt, const TensorMap& like) {
  ShardedCheckpointReader reader(dir);
  TensorMap out;
  for (const auto& [key, t] : like) {
    const Placement p = place(gpt, key, t);
    const int64_t length = p.dim < 0 ? 0 : t.size(p.dim);
    out[key] = reader.read(key, p.global, t.dtype(), p.dim, p.offset, length);
  }
  return out;
}

}  // namespace dtrain::parallel
