// `dtrain ckpt`: look into sharded checkpoints and convert them.
//
//   dtrain ckpt inspect <root-or-checkpoint-folder>
//     Lists every checkpoint of a root (or the one folder given): step, epoch, world
//     size, generation, config, every shard with bytes, checksum and OK /
//     CORRUPT(reason), every tensor with dtype, shape and the shard that holds it.
//     Verifies every checksum; exit 1 naming the corrupt shard(s) when any fails.
//   dtrain ckpt export --format safetensors [--checkpoint NAME|latest] <root> --out FILE
//     Writes the model weights of one committed checkpoint as safetensors.
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "dtrain/common/checkpoint_store.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/checkpoint.h"
#include "dtrain/engine/serialize.h"

namespace dtrain::cli {

namespace fs = std::filesystem;

namespace {

struct CkptOptions {
  std::string path;
  std::string format = "safetensors";
  std::string checkpoint = "latest";
  std::string out;
};

std::string shape_text(const nlohmann::json& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + shape[i].dump();
  return s + "]";
}

// Prints one checkpoint; appends a line per failed shard to `failures`.
void print_checkpoint(const ckpt::CheckpointStore& store, const ckpt::Manifest& m, bool is_latest,
                      std::vector<std::string>& failures) {
  fmt::print("checkpoint {}{}\n", m.name, is_latest ? "  (latest)" : "");
  fmt::print("  step {}  epoch {}  world size {}  generation {}\n", m.step, m.epoch, m.world_size,
             m.generation);
  fmt::print("  config {}\n", m.config.dump());
  fmt::print("  shards:\n");
  nlohmann::json index;
  for (const auto& e : m.shards) {
    std::string status = "OK";
    try {
      store.verify_shard(m, e);
      if (index.is_null()) {
        Archive a = load_archive((fs::path(store.folder(m.name)) / e.file).string());
        index = a.metadata.value("tensors", nlohmann::json::object());
      }
    } catch (const Error& err) {
      status = fmt::format("CORRUPT({})", err.message());
      failures.push_back(err.message());
    }
    fmt::print("    rank {:<3} {}  {} bytes  {}  {}\n", e.rank, e.file, e.bytes, e.checksum,
               status);
  }
  if (index.is_object()) {
    fmt::print("  tensors ({}):\n", index.size());
    for (const auto& [name, info] : index.items()) {
      fmt::print("    {:<40} {:<5} {:<16} shard {}\n", name, info.value("dtype", "?"),
                 shape_text(info.value("shape", nlohmann::json::array())), info.value("rank", -1));
    }
  } else {
    fmt::print("  tensors: unavailable (no shard could be read)\n");
  }
}

int run_inspect(const CkptOptions& o) {
  DTRAIN_CHECK(fs::is_directory(o.path), IoError, "ckpt inspect: '{}' is not a folder", o.path);
  fs::path p = fs::absolute(o.path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  std::vector<std::string> failures;
  if (fs::exists(p / "manifest.json")) {  // one checkpoint folder
    ckpt::CheckpointStore store(p.parent_path().string());
    ckpt::Manifest m = store.read_manifest(p.filename().string());
    print_checkpoint(store, m, false, failures);
  } else {
    ckpt::CheckpointStore store(p.string());
    std::string latest_name;
    try {
      if (auto l = store.latest()) latest_name = l->name;
    } catch (const CheckpointError& e) {
      fmt::print("latest: MALFORMED({})\n", e.message());
      failures.push_back(e.message());
    }
    int listed = 0;
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(p)) {
      if (entry.is_directory() && entry.path().filename().string().rfind("step-", 0) == 0) {
        names.push_back(entry.path().filename().string());
      }
    }
    std::sort(names.rbegin(), names.rend());
    for (const auto& name : names) {
      if (!fs::exists(p / name / "manifest.json")) {
        fmt::print("checkpoint {}  uncommitted (no manifest; ignored)\n", name);
        continue;
      }
      try {
        ckpt::Manifest m = store.read_manifest(name);
        print_checkpoint(store, m, name == latest_name, failures);
        ++listed;
      } catch (const CheckpointError& e) {
        fmt::print("checkpoint {}  CORRUPT({})\n", name, e.message());
        failures.push_back(e.message());
      }
    }
    DTRAIN_CHECK(listed > 0 || !failures.empty(), CheckpointError,
                 "ckpt inspect: no committed checkpoint in '{}'", p.string());
  }
  std::fflush(stdout);  // the listing before the error line
  if (!failures.empty()) {
    std::string all;
    for (const auto& f : failures) all += (all.empty() ? "" : "; ") + f;
    DTRAIN_THROW(CheckpointError, "{} problem(s): {}", failures.size(), all);
  }
  fmt::print("all checksums OK\n");
  return 0;
}

int run_export(const CkptOptions& o) {
  DTRAIN_CHECK(o.format == "safetensors", InvalidArgument,
               "ckpt export: --format must be safetensors, got '{}'", o.format);
  DTRAIN_CHECK(fs::is_directory(o.path), IoError, "ckpt export: '{}' is not a folder", o.path);
  ckpt::CheckpointStore store(o.path);
  ckpt::Manifest m;
  if (o.checkpoint == "latest") {
    auto l = store.latest();
    DTRAIN_CHECK(l.has_value(), CheckpointError,
                 "ckpt export: '{}' has no `latest` checkpoint (use --checkpoint step-...)",
                 o.path);
    m = *l;
  } else {
    m = store.read_manifest(o.checkpoint);
  }
  ckpt::export_safetensors(store, m, o.out);
  fmt::print("wrote {} ({} bytes) from {}\n", o.out, fs::file_size(o.out), m.name);
  return 0;
}

}  // namespace

Command add_ckpt_command(CLI::App& app) {
  auto o = std::make_shared<CkptOptions>();
  CLI::App* ckpt = app.add_subcommand("ckpt", "Inspect and export sharded checkpoints");
  CLI::App* inspect =
      ckpt->add_subcommand("inspect", "List what checkpoints hold and verify every checksum");
  inspect->add_option("path", o->path, "Checkpoint root or one checkpoint folder")->required();
  CLI::App* exp = ckpt->add_subcommand("export", "Write a checkpoint's model weights");
  exp->add_option("root", o->path, "Checkpoint root")->required();
  exp->add_option("--format", o->format, "Output format (safetensors)")->capture_default_str();
  exp->add_option("--checkpoint", o->checkpoint, "Checkpoint name (step-...) or latest")
      ->capture_default_str();
  exp->add_option("--out", o->out, "Output file")->required();
  ckpt->require_subcommand(1);
  return {ckpt, [o, inspect] { return inspect->parsed() ? run_inspect(*o) : run_export(*o); }};
}

}  // namespace dtrain::cli
