// ProcessMesh (see mesh.h): rank <-> coordinates and the group splits.
#include "dtrain/parallel/mesh.h"

#include <fmt/format.h>

#include <cstdlib>
#include <sstream>

#include "dtrain/common/error.h"

namespace dtrain::parallel {

std::string MeshShape::str() const { return fmt::format("dp={},tp={},pp={}", dp, tp, pp); }

namespace {

int parse_size(const std::string& spec, const std::string& item, const std::string& value) {
  char* end = nullptr;
  long v = std::strtol(value.c_str(), &end, 10);
  DTRAIN_CHECK(!value.empty() && *end == '\0' && v >= 1 && v <= 65536, InvalidArgument,
               "--parallel '{}': '{}' needs a positive size", spec, item);
  return static_cast<int>(v);
}

}  // namespace

MeshShape MeshShape::parse(const std::string& spec) {
  MeshShape s;
  bool seen[3] = {false, false, false};
  std::stringstream in(spec);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t eq = item.find('=');
    std::string key = item.substr(0, eq);
    int idx = key == "dp" ? 0 : key == "tp" ? 1 : key == "pp" ? 2 : -1;
    DTRAIN_CHECK(eq != std::string::npos && idx >= 0, InvalidArgument,
                 "--parallel '{}': '{}' is not dp=N, tp=N or pp=N", spec, item);
    DTRAIN_CHECK(!seen[idx], InvalidArgument, "--parallel '{}': {} given twice", spec, key);
    seen[idx] = true;
    int v = parse_size(spec, item, item.substr(eq + 1));
    (idx == 0 ? s.dp : idx == 1 ? s.tp : s.pp) = v;
  }
  return s;
}

void MeshShape::check_world(int world_size) const {
  DTRAIN_CHECK(world() == world_size, InvalidArgument,
               "mesh {} needs {} x {} x {} = {} ranks, the world has {}", str(), dp, tp, pp, world(),
               world_size);
}

MeshCoord mesh_coord(const MeshShape& s, int rank) {
  DTRAIN_CHECK(rank >= 0 && rank < s.world(), InvalidArgument, "rank {} is outside mesh {}", rank,
               s.str());
  return MeshCoord{rank / (s.tp * s.pp), (rank / s.tp) % s.pp, rank % s.tp};
}

int mesh_rank(const MeshShape& s, const MeshCoord& c) { return (c.dp * s.pp + c.pp) * s.tp + c.tp; }

ProcessMesh::ProcessMesh(comm::Communicator& world, MeshShape shape)
    : world_(world), shape_(shape) {
  shape_.check_world(world.size());
  coord_ = mesh_coord(shape_, world.rank());
  const MeshCoord c = coord_;
  // Colors name the group by the coordinates its members share; keys order them.
  tp_ = world.split(c.dp * shape_.pp + c.pp, c.tp);
  pp_ = world.split(c.dp * shape_.tp + c.tp, c.pp);
  dp_ = world.split(c.pp * shape_.tp + c.tp, c.dp);
  const bool edge = shape_.pp > 1 && (is_first_stage() || is_last_stage());
  embedding_ = world.split(edge ? c.dp * shape_.tp + c.tp : comm::Communicator::kNoColor, c.pp);
}

}  // namespace dtrain::parallel
