// CheckpointStore: the on-disk layout of sharded checkpoints, their manifest, the
// `latest` pointer, verification and retention.
//
// Layout of a checkpoint root folder:
//   <root>/step-00000120/shard-00000-of-00002.dtrn   one DTRN archive per rank (engine/serialize.h)
//   <root>/step-00000120/manifest.json               written last; its presence = committed
//   <root>/latest                                    text "step-00000120\n"; moves only after the
//                                                    manifest is in place
// Every file is written tmp -> fsync -> rename (+ directory fsync), so a crash leaves
// either the old file or the new one, never a torn one.
//
// This library does not read or write tensors (dtrain/engine/checkpoint.h does); it
// only sees shard files as bytes, so the coordinator can commit checkpoints without
// linking the engine. Checksums are XXH3-64 of the whole file (libxxhash).
//
// Thread-safety: a CheckpointStore holds no mutable state; concurrent commits to one
// root from several processes are not supported (one committer, the coordinator or
// rank 0, per root).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dtrain::ckpt {

struct ShardEntry {
  int32_t rank = 0;
  std::string file;  // relative to the checkpoint folder
  uint64_t bytes = 0;
  std::string checksum;  // "xxh3-64:<16 lowercase hex digits>" of the whole file
};

struct Manifest {
  std::string name;  // folder name, checkpoint_name(step)
  int64_t step = 0;
  int64_t epoch = 0;
  int32_t world_size = 0;
  uint64_t generation = 0;         // coordinator generation that made it (0: no coordinator)
  std::vector<ShardEntry> shards;  // one per rank, sorted by rank
  nlohmann::json config =
      nlohmann::json::object();  // run configuration (model, seed, batch, lr, ...)

  nlohmann::json to_json() const;
  // Throws CheckpointError naming `where` (a file name) and the field that is wrong.
  static Manifest from_json(const nlohmann::json& j, const std::string& where);
};

// "step-00000120".
std::string checkpoint_name(int64_t step);
// "shard-00001-of-00004.dtrn".
std::string shard_file_name(int rank, int world_size);
// "xxh3-64:<16 hex>" of the whole file. IoError when unreadable.
std::string file_checksum(const std::string& path);
// Writes `content` to path via path.tmp -> fsync -> rename -> directory fsync. IoError.
void write_file_atomic(const std::string& path, const std::string& content);

class CheckpointStore {
 public:
  // Creates root (and its parents) when missing. IoError when that fails.
  explicit CheckpointStore(std::string root);
  const std::string& root() const { return root_; }
  // root/name.
  std::string folder(const std::string& name) const;

  // Phase 2 (once every shard is in): verifies every shard (exists, size, checksum),
  // writes <folder>/manifest.json, then moves `latest` to m.name, then applies
  // retention: keeps the newest keep_last committed checkpoints (0 = all) -- an older
  // one is deleted only now, after the newer one is committed -- and removes
  // uncommitted folders older than m.step. CheckpointError naming the shard on
  // failure (and then nothing is committed).
  void commit(const Manifest& m, int keep_last) const;
  // nullopt when there is no `latest`; CheckpointError when it or its manifest is malformed.
  std::optional<Manifest> latest() const;
  // Every folder with a readable manifest, newest step first.
  std::vector<Manifest> committed() const;
  // CheckpointError naming the file when missing or malformed.
  Manifest read_manifest(const std::string& name) const;
  // CheckpointError naming the shard file and what is wrong (missing, size, checksum).
  void verify(const Manifest& m) const;
  // One shard of m: CheckpointError naming the shard file and what is wrong.
  void verify_shard(const Manifest& m, const ShardEntry& shard) const;
  // The newest committed checkpoint that verifies, starting from `latest` then older
  // ones; each one skipped is reported through log("checkpoint step-... skipped:
  // <reason>"). nullopt when none.
  std::optional<Manifest> find_resumable(const std::function<void(const std::string&)>& log) const;

 private:
  std::string root_;
};

}  // namespace dtrain::ckpt
