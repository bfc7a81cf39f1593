// Sharded checkpoints: every rank writes the slices it holds, any mesh reads them back.
//
// A checkpoint is a directory:
//   <dir>/shard-<rank>.dtrn  one serialize.h archive per rank that wrote pieces; its
//                            tensors are named after the global tensor they slice
//   <dir>/manifest.json      written by rank 0: {"format": "dtrain-sharded-checkpoint",
//                            "version": 1, "world_size", "meta", "tensors": {name:
//                            {"shape", "dtype", "pieces": [{"file", "dim", "offset",
//                            "length"}]}}}
// A piece is the whole tensor (dim -1) or the slice [offset, offset+length) of it
// along one dimension. The pieces of a tensor must tile it exactly: one dimension for
// all of them (or all whole), no gaps, and overlaps only between identical pieces (the
// replicas of a tensor that several ranks hold; the reader uses one).
//
// Saving is atomic: the files go to the sibling directory "<dir>.tmp", the ranks agree
// that every write succeeded, rank 0 checks the coverage, writes the manifest and only
// then swaps the new directory in (<dir> -> "<dir>.old", "<dir>.tmp" -> <dir>, remove
// the old one). A failure anywhere throws on every rank (the failing rank its own error,
// the others a CheckpointError naming it) and leaves a checkpoint already at <dir>
// untouched; a crash between the two renames leaves it at "<dir>.old".
//
// Reading is local (no communicator): a rank asks for the slice it holds at its own
// mesh, and the reader assembles it from whichever stored pieces overlap it, loading
// each shard file at most once.
//
// Deliberately not here: what a model's tensors and slices are (gpt_checkpoint.h),
// parallel or asynchronous I/O, GPU tensors (pieces are copied to the host to be
// written; reads return host tensors), pieces split along more than one dimension.
// Thread-safety: a reader belongs to one thread (its shard cache is not locked).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/serialize.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::parallel {

struct TensorPiece {
  std::string name;
  Shape global_shape;
  int dim = -1;        // the dimension this piece is a slice of; -1: the whole tensor
  int64_t offset = 0;  // where the piece starts along dim
  Tensor data;         // == global.narrow(dim, offset, data.size(dim)) (or the whole tensor)
};

// The shape of the slice of length `length` along dim of a tensor `global` (dim -1: global).
Shape piece_shape(const Shape& global, int dim, int64_t length);

// Collective over `world`: each rank passes the pieces it writes (possibly none; at most
// one piece per tensor name per rank). See the file comment for layout and atomicity.
void save_sharded(const std::string& dir, comm::Communicator& world,
                  const std::vector<TensorPiece>& pieces, const nlohmann::json& meta);

class ShardedCheckpointReader {
 public:
  // CheckpointError when <dir>/manifest.json is missing or malformed.
  explicit ShardedCheckpointReader(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const nlohmann::json& meta() const { return meta_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  Shape global_shape(const std::string& name) const;  // CheckpointError when absent
  std::vector<std::string> names() const;

  // This rank's slice [offset, offset+length) along dim (dim -1: the whole tensor),
  // assembled from the stored pieces that overlap it. CheckpointError naming the tensor,
  // the checkpoint and both shapes when the stored global shape is not expected_global;
  // CheckpointError when the tensor is absent or its dtype differs; InvalidArgument for
  // a slice outside the tensor; DataFormatError (from load_archive) on a corrupt file,
  // IoError on a missing one.
  Tensor read(const std::string& name, const Shape& expected_global, DType dtype, int dim,
              int64_t offset, int64_t length) const;

 private:
  struct Piece {
    std::string file;
    int dim = -1;
    int64_t offset = 0, length = 0;
  };
  struct Entry {
    Shape shape;
    std::string dtype;
    std::vector<Piece> pieces;
  };
  const Tensor& stored(const std::string& name, const Piece& piece) const;

  std::string dir_;
  nlohmann::json meta_;
  std::map<std::string, Entry> tensors_;
  mutable std::map<std::string, Archive> shards_;  // file -> archive, loaded on first use
};

}  // namespace dtrain::parallel
