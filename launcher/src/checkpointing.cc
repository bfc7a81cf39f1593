#include "checkpointing.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "dtrain/common/error.h"
#include "dtrain/engine/checkpoint.h"
#include "host_values.h"
#include "progress.h"

namespace dtrain::cli {

namespace fs = std::filesystem;

ShardedCheckpoints::ShardedCheckpoints(CheckpointOptions options, WorkerSession& session,
                                       Device device)
    : options_(std::move(options)),
      session_(session),
      device_(device),
      store_(fs::absolute(options_.dir).string()) {}

// Rank 0 picks the checkpoint and broadcasts its step, so every rank loads the same one.
std::optional<ckpt::Manifest> ShardedCheckpoints::choose() const {
  comm::Communicator& comm = session_.comm();
  int64_t step = -1;
  std::optional<ckpt::Manifest> m;
  if (comm.rank() == 0) {
    if (options_.resume == "auto") {
      m = store_.find_resumable(
          [](const std::string& line) { spdlog::info("dtrain train: {}", line); });
    } else {
      m = store_.read_manifest(options_.resume);
      store_.verify(*m);
    }
    if (m) step = m->step;
  }
  if (comm.size() > 1) {
    on_host_values(device_, &step, 1, DType::i64,
                   [&](void* p) { comm.broadcast(p, 1, DType::i64, 0); });
  }
  if (step < 0) return std::nullopt;
  if (!m) m = store_.read_manifest(ckpt::checkpoint_name(step));
  return m;
}

bool ShardedCheckpoints::load(CheckpointState& state) {
  if (options_.resume == "none") return false;
  const bool lead = session_.comm().rank() == 0;
  std::optional<ckpt::Manifest> m = choose();
  if (!m) {
    if (lead) {
      spdlog::info("dtrain train: no committed checkpoint in {}: starting at step 0",
                   store_.root());
    }
    return false;
  }
  std::string saved_model = m->config.value("model", options_.model);
  DTRAIN_CHECK(saved_model == options_.model, CheckpointError,
               "checkpoint {} in {} holds a {} model, not --model {}", m->name, store_.root(),
               saved_model, options_.model);
  ckpt::load(store_, *m, state.training, state.shard, state.num_shards);
  if (lead) {
    spdlog::info(
        "dtrain train: resumed from {} in {} (step {}, epoch {}, written by {} "
        "worker(s), now {})",
        m->name, store_.root(), m->step, m->epoch, m->world_size, session_.comm().size());
  }
  return true;
}

// Phase 1 on every rank (its shard), phase 2 by the coordinator (or locally).
void ShardedCheckpoints::on_checkpoint(const CheckpointState& state) {
  const ckpt::TrainingState& st = state.training;
  const std::string name = ckpt::checkpoint_name(st.step);
  if (!begin(name, st)) return;
  const WriteProgress bar = bytes_reporter(
      {.label = fmt::format("checkpoint {} shard {}/{}", name, state.shard + 1, state.num_shards),
       .enabled = options_.progress && session_.comm().rank() == 0});
  ckpt::ShardEntry entry = ckpt::write_shard(store_, name, st, state.shard, state.num_shards, bar);
  if (options_.test_commit_delay_ms > 0) {
    spdlog::info("dtrain train: rank {}: shard of {} written, committing in {} ms",
                 session_.comm().rank(), name, options_.test_commit_delay_ms);
    std::this_thread::sleep_for(std::chrono::milliseconds(options_.test_commit_delay_ms));
  }
  if (session_.has_coordinator()) {
    commit_through_coordinator(name, st.step, entry);
  } else {
    commit_locally(name, state, entry);
  }
}

// BeginCheckpoint through the coordinator; false (one line) when it is refused.
bool ShardedCheckpoints::begin(const std::string& name, const ckpt::TrainingState& st) const {
  if (!session_.has_coordinator()) return true;
  try {
    session_.begin_checkpoint(
        {0, 0, st.step, st.epoch, store_.root(), options_.run_config.dump(), options_.keep});
    return true;
  } catch (const Error& e) {
    spdlog::warn("dtrain train: rank {}: checkpoint {} skipped: {}", session_.comm().rank(), name,
                 e.message());
    // The seam keeps a skipped checkpoint as long as a written one.
    std::this_thread::sleep_for(std::chrono::milliseconds(options_.test_commit_delay_ms));
    return false;
  }
}

void ShardedCheckpoints::commit_through_coordinator(const std::string& name, int64_t step,
                                                    const ckpt::ShardEntry& entry) const {
  try {
    coordinator::ShardCommit c =
        session_.commit_shard(step, {entry.rank, entry.file, entry.bytes, entry.checksum});
    if (c.committed) spdlog::info("dtrain train: checkpoint {} committed", name);
  } catch (const Error& e) {
    spdlog::warn("dtrain train: rank {}: checkpoint {} not committed: {}", session_.comm().rank(),
                 name, e.message());
  }
}

// No coordinator: rank 0 commits once every rank's shard is on disk (a shared
// folder under mpirun), reading the other ranks' entries from their files.
void ShardedCheckpoints::commit_locally(const std::string& name, const CheckpointState& state,
                                        const ckpt::ShardEntry& entry) const {
  comm::Communicator& comm = session_.comm();
  const int world = state.num_shards;
  if (comm.size() > 1) comm.barrier();
  if (comm.rank() != 0) return;
  ckpt::Manifest m;
  m.name = name;
  m.step = state.training.step;
  m.epoch = state.training.epoch;
  m.world_size = world;
  m.config = options_.run_config;
  for (int r = 0; r < world; ++r) {
    if (r == state.shard) {
      m.shards.push_back(entry);
      continue;
    }
    std::string file = ckpt::shard_file_name(r, world);
    std::string path = (fs::path(store_.folder(name)) / file).string();
    m.shards.push_back(
        {r, file, static_cast<uint64_t>(fs::file_size(path)), ckpt::file_checksum(path)});
  }
  store_.commit(m, options_.keep);
  spdlog::info("dtrain train: checkpoint {} committed", name);
}

}  // namespace dtrain::cli
