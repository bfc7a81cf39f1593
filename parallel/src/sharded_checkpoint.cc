// Sharded checkpoints, the collective save: temp directory, agreement between ranks,
// coverage check, swap. Layout and guarantees: sharded_checkpoint.h. Not here: reading
// (sharded_checkpoint_reader.cc) and which pieces a model writes (gpt_checkpoint.cc).
#include "dtrain/parallel/sharded_checkpoint.h"

#include <algorithm>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <utility>

#include "dtrain/common/error.h"

namespace dtrain::parallel {
namespace {

namespace fs = std::filesystem;
constexpr const char* kFormat = "dtrain-sharded-checkpoint";
constexpr int kVersion = 1;

// "<dir>" without a trailing separator, so "<dir>.tmp" is a sibling.
std::string clean_dir(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (!p.has_filename() && p.has_parent_path()) p = p.parent_path();
  return p.string();
}

// Runs `step` here, then every rank learns whether any rank failed: the failing rank
// rethrows its own error, the others throw a CheckpointError naming the lowest one.
void agree(comm::Communicator& world, const std::string& dir, const char* what,
           const std::function<void()>& step) {
  std::exception_ptr error;
  try {
    step();
  } catch (...) {
    error = std::current_exception();
  }
  int64_t failed = error ? world.rank() : world.size();
  world.allreduce(&failed, 1, DType::i64, comm::ReduceOp::kMin);
  if (error) std::rethrow_exception(error);
  DTRAIN_CHECK(failed == world.size(), CheckpointError,
               "save_sharded '{}': rank {} failed while {}; nothing was committed", dir, failed,
               what);
}

// ShapeError naming the tensor and both shapes unless `p` is a slice of its global shape.
void check_piece(const TensorPiece& p) {
  DTRAIN_CHECK(!p.name.empty() && p.data.defined(), InvalidArgument,
               "save_sharded: a piece without a name or data ('{}')", p.name);
  const int64_t rank = static_cast<int64_t>(p.global_shape.size());
  DTRAIN_CHECK(p.dim >= -1 && p.dim < rank, ShapeError,
               "save_sharded: '{}' is split along dimension {} of a {}-D tensor", p.name, p.dim,
               rank);
  const int64_t len = p.dim < 0 ? 0 : p.data.dim() == rank ? p.data.size(p.dim) : -1;
  const int64_t size = p.dim < 0 ? 0 : p.global_shape[static_cast<size_t>(p.dim)];
  DTRAIN_CHECK(p.data.shape() == piece_shape(p.global_shape, p.dim, len) && p.offset >= 0 &&
                   p.offset + len <= size,
               ShapeError,
               "save_sharded: piece of '{}' {} at offset {} along dim {} does not fit its global "
               "shape {}",
               p.name, shape_str(p.data.shape()), p.offset, p.dim, shape_str(p.global_shape));
}

// Checks this rank's pieces and writes them to <tmp>/shard-<rank>.dtrn; returns their
// manifest entries.
nlohmann::json write_shard(const std::string& tmp, int rank, const std::vector<TensorPiece>& pieces) {
  nlohmann::json out = nlohmann::json::array();
  if (pieces.empty()) return out;
  const std::string file = "shard-" + std::to_string(rank) + ".dtrn";
  TensorMap tensors;
  for (const TensorPiece& p : pieces) {
    check_piece(p);
    DTRAIN_CHECK(tensors.count(p.name) == 0, InvalidArgument,
                 "save_sharded: rank {} passes two pieces of '{}'", rank, p.name);
    tensors[p.name] = p.data.to(Device::cpu());
    out.push_back({{"name", p.name},
                   {"shape", p.global_shape},
                   {"dtype", dtype_name(p.data.dtype())},
                   {"file", file},
                   {"dim", p.dim},
                   {"offset", p.offset},
                   {"length", p.dim < 0 ? 0 : p.data.size(p.dim)}});
  }
  save_archive(tmp + "/" + file, tensors, {{"format", kFormat}, {"rank", rank}});
  return out;
}

// Every rank's piece entries, in rank order (an all-gather of JSON text).
std::vector<nlohmann::json> gather_entries(comm::Communicator& world, const nlohmann::json& mine) {
  const std::string text = mine.dump();
  std::vector<int64_t> sizes(static_cast<size_t>(world.size()));
  const int64_t n = static_cast<int64_t>(text.size());
  world.allgather(&n, sizes.data(), 1, DType::i64);
  const size_t width = static_cast<size_t>(*std::max_element(sizes.begin(), sizes.end()));
  std::vector<uint8_t> send(width, 0), recv(width * sizes.size());
  std::copy(text.begin(), text.end(), send.begin());
  world.allgather(send.data(), recv.data(), width, DType::u8);
  std::vector<nlohmann::json> all;
  for (size_t r = 0; r < sizes.size(); ++r) {
    const char* at = reinterpret_cast<const char*>(recv.data() + r * width);
    all.push_back(nlohmann::json::parse(at, at + sizes[r]));
  }
  return all;
}

// The manifest entry of one tensor from all its pieces; CheckpointError unless they
// agree on shape, dtype and dimension and tile the tensor exactly.
nlohmann::json tensor_entry(const std::string& dir, const std::string& name,
                            const std::vector<nlohmann::json>& pieces) {
  const nlohmann::json& first = pieces.front();
  std::map<std::pair<int64_t, int64_t>, std::string> intervals;  // (offset, length) -> file
  for (const nlohmann::json& p : pieces) {
    DTRAIN_CHECK(p["shape"] == first["shape"] && p["dtype"] == first["dtype"] &&
                     p["dim"] == first["dim"],
                 CheckpointError,
                 "save_sharded '{}': the pieces of '{}' disagree: {} {} along dim {} ({}) vs {} {} "
                 "along dim {} ({})",
                 dir, name, first["dtype"].dump(), first["shape"].dump(), first["dim"].dump(),
                 first["file"].dump(), p["dtype"].dump(), p["shape"].dump(), p["dim"].dump(),
                 p["file"].dump());
    intervals.emplace(std::make_pair(p["offset"].get<int64_t>(), p["length"].get<int64_t>()),
                      p["file"].get<std::string>());
  }
  const int dim = first["dim"].get<int>();
  const int64_t size = dim < 0 ? 0 : first["shape"][static_cast<size_t>(dim)].get<int64_t>();
  nlohmann::json out = {{"shape", first["shape"]}, {"dtype", first["dtype"]}, {"pieces", {}}};
  int64_t next = 0;
  for (const auto& [range, file] : intervals) {
    DTRAIN_CHECK(range.first == next, CheckpointError,
                 "save_sharded '{}': the pieces of '{}' {} along dim {} {} at {} (piece [{}, {}) "
                 "in {})",
                 dir, name, first["shape"].dump(), dim, range.first > next ? "leave a gap" : "overlap",
                 next, range.first, range.first + range.second, file);
    next = range.first + range.second;
    out["pieces"].push_back({{"file", file}, {"dim", dim}, {"offset", range.first},
                             {"length", range.second}});
    if (dim < 0) break;  // whole replicas: one is enough
  }
  DTRAIN_CHECK(next == size, CheckpointError,
               "save_sharded '{}': the pieces of '{}' {} cover [0, {}) of {} along dim {}", dir,
               name, first["shape"].dump(), next, size, dim);
  return out;
}

nlohmann::json build_manifest(const std::string& dir, int world_size,
                              const std::vector<nlohmann::json>& per_rank,
                              const nlohmann::json& meta) {
  std::map<std::string, std::vector<nlohmann::json>> by_name;
  for (const nlohmann::json& pieces : per_rank) {
    for (const nlohmann::json& p : pieces) by_name[p["name"].get<std::string>()].push_back(p);
  }
  nlohmann::json tensors = nlohmann::json::object();
  for (const auto& [name, pieces] : by_name) tensors[name] = tensor_entry(dir, name, pieces);
  return {{"format", kFormat}, {"version", kVersion}, {"world_size", world_size},
          {"meta", meta},      {"tensors", tensors}};
}

void check_fs(const std::error_code& ec, const char* what, const std::string& path) {
  DTRAIN_CHECK(!ec, IoError, "save_sharded: cannot {} '{}': {}", what, path, ec.message());
}

// Rank 0: writes the manifest into tmp and swaps tmp in for dir.
void commit(const std::string& dir, const std::string& tmp, const nlohmann::json& manifest) {
  {
    std::ofstream out(tmp + "/manifest.json");
    out << manifest.dump(1) << "\n";
    out.close();
    DTRAIN_CHECK(out.good(), IoError, "save_sharded: cannot write '{}/manifest.json'", tmp);
  }
  std::error_code ec;
  const std::string old = dir + ".old";
  fs::remove_all(old, ec);
  check_fs(ec, "remove", old);
  if (fs::exists(dir)) {
    fs::rename(dir, old, ec);
    check_fs(ec, "move aside", dir);
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    std::error_code back;
    if (fs::exists(old)) fs::rename(old, dir, back);  // put the previous checkpoint back
    check_fs(ec, "rename into place", tmp);
  }
  fs::remove_all(old, ec);  // the new checkpoint is in place; a leftover is harmless
}

void fresh_dir(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  check_fs(ec, "remove", path);
  fs::create_directories(path, ec);
  check_fs(ec, "create", path);
}

}  // namespace

Shape piece_shape(const Shape& global, int dim, int64_t length) {
  Shape s = global;
  if (dim >= 0) s[static_cast<size_t>(dim)] = length;
  return s;
}

void save_sharded(const std::string& dir_in, comm::Communicator& world,
                  const std::vector<TensorPiece>& pieces, const nlohmann::json& meta) {
  const std::string dir = clean_dir(dir_in), tmp = dir + ".tmp";
  const bool root = world.rank() == 0;
  try {
    agree(world, dir, "creating the temp directory", [&] {
      if (root) fresh_dir(tmp);
    });
    nlohmann::json mine;
    agree(world, dir, "writing its shard", [&] { mine = write_shard(tmp, world.rank(), pieces); });
    const std::vector<nlohmann::json> all = gather_entries(world, mine);
    agree(world, dir, "checking and committing the checkpoint", [&] {
      if (root) commit(dir, tmp, build_manifest(dir, world.size(), all, meta));
    });
  } catch (...) {
    std::error_code ec;
    if (root) fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace dtrain::parallel
