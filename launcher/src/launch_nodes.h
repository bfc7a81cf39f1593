// Several nodes, one `dtrain launch` each (torchrun-style):
//
//   node 0:  dtrain launch --nnodes 2 --node-rank 0 --nproc-per-node 2
//              --coordinator 10.0.0.1:29500 --token T -- dtrain train ...
//   node 1:  dtrain launch --nnodes 2 --node-rank 1 --nproc-per-node 2
//              --coordinator 10.0.0.1:29500 --token T -- dtrain train ...
//
// Node 0 starts the coordinator on the given HOST:PORT (bound to HOST) unless
// --external-coordinator says one runs already; every node first checks that the
// coordinator answers (bounded by --connect-timeout) and runs the same job: the same
// job id and world size (nnodes x nproc-per-node). Node r's workers are ranks
// r*K .. r*K+K-1. Workers listen on --bind, default the address this node uses to
// reach the coordinator (never a hard-coded 127.0.0.1 once there are several nodes).
//
// Errors: InvalidArgument naming the flag (node rank out of range, no --coordinator),
// CommError for an unreachable coordinator, FailedPrecondition-style InvalidArgument
// for a job id or world size that differs from the coordinator's.
#pragma once

#include <string>

namespace dtrain::coordinator {
struct ClientOptions;
}

namespace dtrain::cli {

struct NodeLayout {
  int nnodes = 1;
  int node_rank = 0;
  int nproc_per_node = 1;
  bool external_coordinator = false;  // --external-coordinator: node 0 starts none
  std::string coordinator;            // HOST:PORT (required when nnodes > 1)
  std::string bind;                   // the workers' (and node 0's coordinator's) address

  int world_size() const { return nnodes * nproc_per_node; }
  int first_rank() const { return node_rank * nproc_per_node; }
  bool multi_node() const { return nnodes > 1; }
  // Node 0 of a multi-node job starts the coordinator on `coordinator`'s address.
  bool hosts_coordinator() const { return multi_node() && node_rank == 0 && !external_coordinator; }
};

// Throws InvalidArgument naming the flag that is wrong.
void validate(const NodeLayout& n);

// "10.0.0.1:29500" -> {"10.0.0.1", 29500}; "[::1]:29500" -> {"[::1]", 29500}.
std::pair<std::string, int> split_host_port(const std::string& host_port);

// The local address this machine uses to reach host_port (a UDP socket connected
// there; nothing is sent). Throws CommError when there is no route.
std::string local_address_towards(const std::string& host_port);

// Connects (bounded by client.connect_timeout) and checks the coordinator runs this
// job with this world size; throws with one line saying what differs.
void check_coordinator_job(const coordinator::ClientOptions& client, int world_size, bool elastic);

}  // namespace dtrain::cli
