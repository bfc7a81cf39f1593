// CoordinatorServer: the gRPC service dtrain.v1.Coordinator (proto/coordinator.proto)
// for one job, running in this process.
//
// It owns the job's state (rendezvous, ranks, generation, barriers, key-value
// store, heartbeats, failures) and serves it on bind_address:port. Blocking calls
// (Join, Barrier, Get with wait, Wait) hold a gRPC server thread each until they
// are released, their timeout passes, the client cancels, or shutdown() runs. When
// heartbeat_timeout is non-zero a monitor thread declares ranks that stop
// heartbeating lost: the job fails, or with max_restarts > 0 starts a new generation
// (see proto/coordinator.proto, Recovery). It commits checkpoints once every rank's
// shard is in (two-phase commit) and keeps its state in state_dir. It does not start
// processes: restarting a lost worker is the launcher's job.
//
// Thread-safety: all methods are safe to call from any thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "dtrain/coordinator/types.h"

namespace dtrain::coordinator {

struct ServerOptions {
  std::string bind_address = "127.0.0.1";  // the only address listened on
  int port = 0;                            // 0: an ephemeral port (see port())
  int world_size = 1;
  std::string job_id = "default";
  std::string token;  // non-empty: every call must carry it ("x-dtrain-token")
  // TLS: PEM files of the server's certificate chain and private key (both or
  // neither; neither: plaintext). A bind address other than loopback requires a token.
  std::string tls_cert_file;
  std::string tls_key_file;
  // A rank silent for longer than this after its first heartbeat is lost; 0: off.
  std::chrono::milliseconds heartbeat_timeout{30000};
  // How often workers should heartbeat (told to them in Join).
  std::chrono::milliseconds heartbeat_interval{1000};
  // Restarts (a lost worker -> a new generation) before the job FAILS; 0: off.
  int max_restarts = 0;
  // Folder for job.json (generation, restarts, state, last committed checkpoint);
  // a coordinator started on a folder holding this job's job.json continues it.
  // Empty: nothing is persisted.
  std::string state_dir;
  // Elastic: a recovering rendezvous that has at least min_workers (0 or world_size:
  // off) but not all of them after rejoin_timeout goes on with those (ranks
  // 0..n-1 in the order of their previous ranks); world_size is then the maximum.
  int min_workers = 0;
  std::chrono::milliseconds rejoin_timeout{10000};
  // Receives one line per event (joins, rendezvous, failures). Called from gRPC
  // threads with the job locked: keep it short and never call back into the server.
  std::function<void(const std::string&)> log;
};

class CoordinatorServer {
 public:
  // Binds and starts serving; throws InvalidArgument for bad options and IoError
  // when the address cannot be bound (port in use, address not local).
  explicit CoordinatorServer(ServerOptions options);
  ~CoordinatorServer();  // shutdown()
  CoordinatorServer(const CoordinatorServer&) = delete;
  CoordinatorServer& operator=(const CoordinatorServer&) = delete;

  int port() const;             // the bound port
  std::string address() const;  // "127.0.0.1:41234" ("[::1]:41234" for IPv6)
  JobStatus status() const;     // the same view GetJobStatus returns

  // Stops serving: blocked calls end UNAVAILABLE, new ones are refused. Idempotent.
  void shutdown();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::coordinator
