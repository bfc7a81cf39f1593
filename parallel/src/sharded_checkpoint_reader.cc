// ShardedCheckpointReader: parses the manifest and assembles a requested slice of a
// tensor from the stored pieces that overlap it (box intersection in global
// coordinates, so a stored slice along any dimension, or a whole tensor, serves any
// request). Layout: sharded_checkpoint.h. Not here: saving (sharded_checkpoint.cc).
#include <fstream>

#include "dtrain/common/error.h"
#include "dtrain/parallel/sharded_checkpoint.h"

namespace dtrain::parallel {
namespace {

// A box [lo, hi) per dimension, in global coordinates.
struct Range {
  int64_t lo = 0, hi = 0;
};
using Box = std::vector<Range>;

Box box_of(const Shape& global, int dim, int64_t offset, int64_t length) {
  Box b;
  for (int64_t n : global) b.push_back({0, n});
  if (dim >= 0) b[static_cast<size_t>(dim)] = {offset, offset + length};
  return b;
}

// The intersection of a and b; false when it is empty.
bool intersect(const Box& a, const Box& b, Box& out) {
  out.resize(a.size());
  for (size_t d = 0; d < a.size(); ++d) {
    out[d] = {std::max(a[d].lo, b[d].lo), std::min(a[d].hi, b[d].hi)};
    if (out[d].hi <= out[d].lo) return false;
  }
  return true;
}

int64_t volume(const Box& b) {
  int64_t n = 1;
  for (const Range& r : b) n *= r.hi - r.lo;
  return n;
}

// The view of t (which holds the box `origin`) on `region`.
Tensor view(Tensor t, const Box& origin, const Box& region) {
  for (size_t d = 0; d < region.size(); ++d) {
    t = t.narrow(static_cast<int64_t>(d), region[d].lo - origin[d].lo, region[d].hi - region[d].lo);
  }
  return t;
}

nlohmann::json read_manifest(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  std::ifstream in(path);
  DTRAIN_CHECK(in.is_open(), CheckpointError,
               "sharded checkpoint '{}': no manifest.json (not a checkpoint, or a save that did "
               "not finish)",
               dir);
  nlohmann::json m = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  DTRAIN_CHECK(!m.is_discarded() && m.is_object(), CheckpointError,
               "sharded checkpoint '{}': manifest.json is not valid JSON", dir);
  DTRAIN_CHECK(m.value("format", "") == "dtrain-sharded-checkpoint", CheckpointError,
               "sharded checkpoint '{}': manifest.json is not a dtrain sharded checkpoint", dir);
  DTRAIN_CHECK(m.value("version", 0) == 1, CheckpointError,
               "sharded checkpoint '{}': manifest version {} (this build reads 1)", dir,
               m.value("version", 0));
  DTRAIN_CHECK(m.contains("tensors") && m["tensors"].is_object(), CheckpointError,
               "sharded checkpoint '{}': manifest.json has no 'tensors'", dir);
  return m;
}

}  // namespace

ShardedCheckpointReader::ShardedCheckpointReader(const std::string& dir) : dir_(dir) {
  const nlohmann::json m = read_manifest(dir);
  meta_ = m.value("meta", nlohmann::json::object());
  try {
    for (const auto& [name, t] : m["tensors"].items()) {
      Entry e{t.at("shape").get<Shape>(), t.at("dtype").get<std::string>(), {}};
      for (const nlohmann::json& p : t.at("pieces")) {
        e.pieces.push_back({p.at("file").get<std::string>(), p.at("dim").get<int>(),
                            p.at("offset").get<int64_t>(), p.at("length").get<int64_t>()});
      }
      tensors_[name] = std::move(e);
    }
  } catch (const nlohmann::json::exception& e) {
    DTRAIN_THROW(CheckpointError, "sharded checkpoint '{}': malformed manifest.json: {}", dir,
                 e.what());
  }
}

Shape ShardedCheckpointReader::global_shape(const std::string& name) const {
  auto it = tensors_.find(name);
  DTRAIN_CHECK(it != tensors_.end(), CheckpointError, "sharded checkpoint '{}': no tensor '{}'",
               dir_, name);
  return it->second.shape;
}

std::vector<std::string> ShardedCheckpointReader::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : tensors_) out.push_back(name);
  return out;
}

const Tensor& ShardedCheckpointReader::stored(const std::string& name, const Piece& piece) const {
  auto it = shards_.find(piece.file);
  if (it == shards_.end()) it = shards_.emplace(piece.file, load_archive(dir_ + "/" + piece.file)).first;
  const TensorMap& tensors = it->second.tensors;
  auto t = tensors.find(name);
  const Entry& e = tensors_.at(name);
  const Shape want = piece_shape(e.shape, piece.dim, piece.length);
  DTRAIN_CHECK(t != tensors.end() && t->second.shape() == want &&
                   dtype_name(t->second.dtype()) == e.dtype,
               CheckpointError,
               "sharded checkpoint '{}': shard '{}' does not hold the {} {} piece of '{}' the "
               "manifest lists",
               dir_, piece.file, e.dtype, shape_str(want), name);
  return t->second;
}

Tensor ShardedCheckpointReader::read(const std::string& name, const Shape& expected_global,
                                     DType dtype, int dim, int64_t offset, int64_t length) const {
  const Shape stored_shape = global_shape(name);
  const Entry& e = tensors_.at(name);
  DTRAIN_CHECK(stored_shape == expected_global, CheckpointError,
               "sharded checkpoint '{}': tensor '{}' is stored with global shape {}, expected {}",
               dir_, name, shape_str(stored_shape), shape_str(expected_global));
  DTRAIN_CHECK(e.dtype == dtype_name(dtype), CheckpointError,
               "sharded checkpoint '{}': tensor '{}' is stored as {}, expected {}", dir_, name,
               e.dtype, dtype_name(dtype));
  const int64_t rank = static_cast<int64_t>(stored_shape.size());
  DTRAIN_CHECK(dim >= -1 && dim < rank &&
                   (dim < 0 || (offset >= 0 && length >= 0 &&
                                offset + length <= stored_shape[static_cast<size_t>(dim)])),
               InvalidArgument, "sharded checkpoint '{}': slice [{}, {}) along dim {} of '{}' {}",
               dir_, offset, offset + length, dim, name, shape_str(stored_shape));
  const Box want = box_of(stored_shape, dim, offset, length);
  Tensor out = empty(piece_shape(stored_shape, dim, length), TensorOptions().with_dtype(dtype));
  int64_t filled = 0;
  for (const Piece& p : e.pieces) {
    const Box have = box_of(stored_shape, p.dim, p.offset, p.length);
    Box common;
    if (!intersect(want, have, common)) continue;
    view(out, want, common).copy_(view(stored(name, p), have, common));
    filled += volume(common);
  }
  DTRAIN_CHECK(filled == out.numel(), CheckpointError,
               "sharded checkpoint '{}': the pieces of '{}' cover {} of the {} elements asked for",
               dir_, name, filled, out.numel());
  return out;
}

}  // namespace dtrain::parallel
