// CoordinatorClient: a worker's (or an operator's) connection to the coordinator.
//
// Every call carries the job id and, when set, the job token; every call has a
// deadline (blocking calls: their own timeout plus a grace period, so the
// coordinator's descriptive answer arrives before the transport gives up). A failed
// call throws a dtrain error whose message names the coordinator address, the call
// and the coordinator's reason, e.g.
//   coordinator 127.0.0.1:29500: Join refused: job 'a' is full (world size 2) [RESOURCE_EXHAUSTED]
// Kinds: DEADLINE_EXCEEDED -> TimeoutError; refusals (UNAUTHENTICATED,
// FAILED_PRECONDITION, RESOURCE_EXHAUSTED, ALREADY_EXISTS, INVALID_ARGUMENT,
// NOT_FOUND, ...) -> InvalidArgument; UNIMPLEMENTED -> UnsupportedError; the rest
// (UNAVAILABLE, ABORTED, ...) -> CommError.
//
// Thread-safety: all methods are safe to call from several threads at once.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/coordinator/types.h"

namespace dtrain::coordinator {

struct ClientOptions {
  std::string address;  // "host:port" of the coordinator
  std::string job_id = "default";
  std::string token;  // sent as "x-dtrain-token" when non-empty
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds call_timeout{10000};  // deadline of non-blocking calls
  // TLS: a PEM file of the CA(s) the coordinator's certificate must chain to (empty:
  // plaintext), and the name to check it against when it differs from the address's
  // host (e.g. the certificate names "coordinator" and the address is an IP).
  std::string tls_ca_file;
  std::string tls_server_name;

  // tls_ca_file and tls_server_name from DTRAIN_TLS_CA and DTRAIN_TLS_SERVER_NAME.
  void tls_from_env();
};

struct JoinOptions {
  std::string host;                          // empty: this machine's host name
  std::string address;                       // where peers can reach this worker (may stay empty)
  int64_t pid = 0;                           // 0: this process's id
  std::optional<int> rank;                   // a rank the launcher already assigned
  std::chrono::milliseconds timeout{60000};  // how long to wait for the rendezvous
  // A re-join after a generation change: what the worker was (informational).
  std::optional<int> previous_rank;
  uint64_t previous_generation = 0;
};

// What a rank tells the coordinator when it begins writing its checkpoint shard.
struct CheckpointBegin {
  int rank = 0;
  uint64_t generation = 0;
  int64_t step = 0;
  int64_t epoch = 0;
  std::string root;         // the checkpoint root folder
  std::string config_json;  // recorded in the manifest
  int keep_last = 0;        // retention at commit (0: keep all)
};

struct ShardCommit {
  bool committed = false;  // this shard completed the checkpoint, which is committed
  int shards_in = 0;
  CheckpointRef last;  // the last committed checkpoint after the call
};

class CoordinatorClient {
 public:
  // Opens a channel and waits until it is connected; throws CommError naming the
  // address when the coordinator cannot be reached within connect_timeout.
  static CoordinatorClient connect(ClientOptions options);
  ~CoordinatorClient();
  CoordinatorClient(CoordinatorClient&&) noexcept;
  CoordinatorClient& operator=(CoordinatorClient&&) noexcept;

  const std::string& address() const;
  const std::string& job_id() const;

  // Blocks until the rendezvous completes (TimeoutError after options.timeout).
  JoinResult join(const JoinOptions& options);
  HeartbeatResult heartbeat(int rank, uint64_t generation,
                            const std::optional<WorkerProgress>& progress = std::nullopt);
  // Returns when every rank arrived at `name`; TimeoutError names the missing ranks.
  void barrier(const std::string& name, int rank, uint64_t generation,
               std::chrono::milliseconds timeout);

  void set(const std::string& key, const std::string& value);
  // Waits for the key; TimeoutError naming the key after `timeout`.
  std::string get(const std::string& key, std::chrono::milliseconds timeout);
  // The value, or nullopt when the key is not set (does not wait).
  std::optional<std::string> try_get(const std::string& key);
  // Waits until every key is set; TimeoutError naming the missing keys.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);

  JobStatus status();
  // Reports that `rank` (-1: unknown) failed; returns the job's state afterwards.
  // fatal: the failure would repeat on a restart, so the job fails even with restarts left.
  JobState report_failure(int rank, const std::string& reason,
                          std::optional<int> reporter_rank = std::nullopt, uint64_t generation = 0,
                          bool fatal = false);
  // This rank finished cleanly; returns the job's state afterwards.
  JobState leave(int rank, uint64_t generation);

  // Two-phase checkpoint commit: begin (returns the checkpoint's folder name), then
  // commit this rank's shard. A refused or failed commit throws (the checkpoint is
  // then not committed).
  std::string begin_checkpoint(const CheckpointBegin& begin);
  ShardCommit commit_shard(uint64_t generation, int64_t step, const ShardInfo& shard);
  CheckpointRef last_checkpoint();

 private:
  struct Impl;
  explicit CoordinatorClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::coordinator
