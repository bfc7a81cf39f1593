// GptCheckpoints (see gpt_checkpoints.h).
#include "gpt_checkpoints.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/parallel/gpt_checkpoint.h"
#include "dtrain/parallel/sharded_checkpoint.h"

namespace dtrain::cli {

namespace {

namespace fs = std::filesystem;

nlohmann::json model_json(const nn::GptConfig& g) {
  return {{"vocab_size", g.vocab_size},
          {"block_size", g.block_size},
          {"n_layer", g.n_layer},
          {"n_head", g.n_head},
          {"n_embd", g.n_embd}};
}

// step-* folders under dir, oldest first.
std::vector<fs::path> checkpoints_in(const std::string& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.rfind("step-", 0) == 0 && name.find('.') == std::string::npos) {
      out.push_back(e.path());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

GptCheckpoints::GptCheckpoints(const TrainConfig& config, parallel::GptOnMesh& run,
                               optim::LRScheduler& schedule,
                               std::function<void(int64_t)> resume_data)
    : config_(config), run_(run), schedule_(schedule), resume_data_(std::move(resume_data)) {}

void GptCheckpoints::on_checkpoint(const CheckpointState& state) {
  const std::string dir =
      (fs::path(config_.ckpt_dir) / fmt::format("step-{:08d}", state.training.step)).string();
  if (run_.mesh().rank() == 0) fs::create_directories(config_.ckpt_dir);
  run_.mesh().world().barrier();
  const nlohmann::json meta = {{"format", "dtrain-gpt"},
                               {"step", state.training.step},
                               {"epoch", state.training.epoch},
                               {"mesh", run_.mesh().shape().str()},
                               {"model", model_json(run_.model()->config())}};
  parallel::save_gpt_sharded(dir, *run_.model(), run_.mesh(), run_.train_state(), meta);
  if (run_.mesh().rank() == 0) {
    spdlog::info("checkpoint: {} (mesh {})", dir, run_.mesh().shape().str());
    prune();
  }
}

void GptCheckpoints::prune() const {
  std::vector<fs::path> all = checkpoints_in(config_.ckpt_dir);
  if (config_.keep <= 0 || all.size() <= static_cast<size_t>(config_.keep)) return;
  for (size_t i = 0; i + static_cast<size_t>(config_.keep) < all.size(); ++i) {
    fs::remove_all(all[i]);
  }
}

std::string GptCheckpoints::choose() const {
  if (config_.resume == "none") return "";
  if (config_.resume == "auto") {
    std::vector<fs::path> all = checkpoints_in(config_.ckpt_dir);
    return all.empty() ? "" : all.back().string();
  }
  const fs::path dir = fs::path(config_.ckpt_dir) / config_.resume;
  DTRAIN_CHECK(fs::is_directory(dir), CheckpointError,
               "--resume {}: no checkpoint {} (the folder does not exist)", config_.resume,
               dir.string());
  return dir.string();
}

void GptCheckpoints::check_model(const std::string& dir, const nlohmann::json& meta) const {
  DTRAIN_CHECK(meta.value("format", "") == "dtrain-gpt" && meta.contains("step"), CheckpointError,
               "checkpoint {}: not a dtrain GPT checkpoint", dir);
  const nlohmann::json want = model_json(run_.model()->config());
  DTRAIN_CHECK(meta.value("model", nlohmann::json()) == want, CheckpointError,
               "checkpoint {}: it holds the model {}, this run builds {}", dir,
               meta.value("model", nlohmann::json()).dump(), want.dump());
}

bool GptCheckpoints::load(CheckpointState& state) {
  const std::string dir = choose();
  if (dir.empty()) {
    if (run_.mesh().rank() == 0 && config_.resume != "none") {
      spdlog::info("resume: no checkpoint in {}, starting fresh", config_.ckpt_dir);
    }
    return false;
  }
  // Every rank reads its own slices; all agree on the outcome before any goes on.
  const nn::StateDict like = run_.train_state();  // collective under ZeRO
  nn::StateDict loaded;
  nlohmann::json meta;
  std::string error;
  try {
    const parallel::ShardedCheckpointReader reader(dir);
    meta = reader.meta();
    check_model(dir, meta);
    loaded = parallel::load_gpt_sharded(dir, *run_.model(), like);
  } catch (const std::exception& e) {
    error = e.what();
  }
  double failed = error.empty() ? 0 : 1;
  run_.mesh().world().allreduce(&failed, 1, DType::f64, comm::ReduceOp::kMax);
  if (!error.empty()) throw CheckpointError(error);
  DTRAIN_CHECK(failed == 0, CheckpointError, "checkpoint {}: another rank could not load it", dir);
  run_.load_train_state(loaded);
  const int64_t step = meta.at("step").get<int64_t>();
  state.training.step = step;
  state.training.epoch = meta.value("epoch", int64_t{0});
  schedule_.set_last_epoch(step);
  resume_data_(step);
  if (run_.mesh().rank() == 0) {
    spdlog::info("resume: {} (saved at mesh {}, step {}) on mesh {}", dir,
                 meta.value("mesh", std::string("?")), step, run_.mesh().shape().str());
  }
  return true;
}

}  // namespace dtrain::cli
