// ProcessMesh: the world laid out as dp x pp x tp, with a communicator per group.
//
// Rank order follows Megatron-LM: tp varies fastest, then pp, then dp,
//   rank = (dp_index * pp + pp_index) * tp + tp_index,
// so the ranks of one tensor-parallel group are neighbours (on one host when the
// launcher places consecutive ranks together), which is where the chatty per-layer
// all-reduces of tensor parallelism belong. With dp=2, pp=2, tp=2:
//
//   rank:      0   1   2   3   4   5   6   7
//   dp index:  0   0   0   0   1   1   1   1
//   pp stage:  0   0   1   1   0   0   1   1
//   tp index:  0   1   0   1   0   1   0   1
//   tp groups {0,1} {2,3} {4,5} {6,7}; pp groups {0,2} {1,3} {4,6} {5,7};
//   dp groups {0,4} {1,5} {2,6} {3,7}.
//
// Each group's communicator is split from the world communicator (Communicator::split),
// so every backend (tcp, mpi, nccl) provides the groups the same way; a group of size 1
// is still a communicator (of one rank) so callers need no special case. Also kept: the
// "embedding" group {first stage, last stage} of one (dp, tp) column, which carries the
// gradient of a word embedding tied to the output head when pp > 1.
//
// Deliberately not here: what runs on each group (tensor_parallel.h, pipeline.h,
// zero.h, ddp.h). Thread-safety: a mesh belongs to one training thread.
#pragma once

#include <memory>
#include <string>

#include "dtrain/comm/communicator.h"

namespace dtrain::parallel {

struct MeshShape {
  int dp = 1, tp = 1, pp = 1;

  int world() const { return dp * tp * pp; }
  std::string str() const;  // "dp=2,tp=2,pp=1"
  // Parses "dp=2,tp=2,pp=2" (any order, missing dimensions are 1); InvalidArgument
  // naming the spec on anything else.
  static MeshShape parse(const std::string& spec);
  // InvalidArgument, one line with the numbers, unless dp * tp * pp == world_size.
  void check_world(int world_size) const;
};

struct MeshCoord {
  int dp = 0, pp = 0, tp = 0;
};

MeshCoord mesh_coord(const MeshShape& shape, int rank);
int mesh_rank(const MeshShape& shape, const MeshCoord& coord);

class ProcessMesh {
 public:
  // Collective over `world` (every rank calls it with the same shape): splits the
  // tp, pp, dp and embedding groups. `world` must outlive the mesh.
  ProcessMesh(comm::Communicator& world, MeshShape shape);

  const MeshShape& shape() const { return shape_; }
  const MeshCoord& coord() const { return coord_; }
  int rank() const { return world_.rank(); }
  bool is_first_stage() const { return coord_.pp == 0; }
  bool is_last_stage() const { return coord_.pp == shape_.pp - 1; }

  comm::Communicator& world() { return world_; }
  comm::Communicator& tp() { return *tp_; }
  comm::Communicator& pp() { return *pp_; }
  comm::Communicator& dp() { return *dp_; }
  // {first, last} stage of this rank's (dp, tp) column; null on middle stages and
  // when pp == 1 (the head and the embedding are then one tensor).
  comm::Communicator* embedding() { return embedding_.get(); }

 private:
  comm::Communicator& world_;
  MeshShape shape_;
  MeshCoord coord_;
  std::unique_ptr<comm::Communicator> tp_, pp_, dp_, embedding_;
};

}  // namespace dtrain::parallel
