// The dtrain command line: one binary, one subcommand per job (see commands.h).
// Exit codes: 0 success, 1 a dtrain error (the message names what and where),
// 2 a bad command line (unknown command or flag, bad value), 75 `train` (and `launch`)
// stopped on a signal after committing a final checkpoint (signal_checkpoint.h).
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <exception>
#include <vector>

#include "commands.h"
#include "dtrain/common/error.h"
#include "dtrain/engine/data/mnist.h"
#include "logging.h"
#include "progress.h"

namespace dtrain::cli {

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

Command add_data_command(CLI::App& app) {
  auto dir = std::make_shared<std::string>("data");
  CLI::App* data = app.add_subcommand("data", "Prepare data sets");
  CLI::App* mnist = data->add_subcommand("mnist", "Fetch and convert the demo's MNIST subset");
  mnist->add_option("--dir", *dir, "Cache folder")->capture_default_str();
  data->require_subcommand(1);
  return {data, [dir] {
            data::MnistSubsetOptions options;
            options.progress = progress_reporter({.label = "data mnist", .unit = "stages"});
            auto r = data::prepare_mnist_subset(
                *dir, [](std::string_view line) { spdlog::info("{}", line); }, options);
            fmt::print("{}: {} ({} train / {} test){}\n", r.dir, r.source, r.num_train, r.num_test,
                       r.cached ? ", cached" : "");
            return 0;
          }};
}

}  // namespace dtrain::cli

int main(int argc, char** argv) {
  using namespace dtrain::cli;
  // Once, before anything logs: spdlog's default logger (logging.h). Until a command
  // configures it, it prints the bare message to stderr.
  install_process_logger();
  CLI::App app{"dtrain: distributed training for neural networks"};
  app.require_subcommand(1);
  std::vector<Command> commands;
  commands.push_back(add_train_command(app));
  commands.push_back(add_data_command(app));
  commands.push_back(add_coordinator_command(app));
  commands.push_back(add_launch_command(app));
  commands.push_back(add_bench_command(app));
  commands.push_back(add_doctor_command(app));
  commands.push_back(add_ckpt_command(app));
  commands.push_back(add_generate_command(app));
  commands.push_back(add_report_command(app));
  commands.push_back(add_status_command(app));
  commands.push_back(add_infer_command(app));
  commands.push_back(add_prune_command(app));
  commands.push_back(add_quantize_command(app));
  commands.push_back(add_distill_command(app));
  commands.push_back(add_models_command(app));
  // (new subcommands are registered here, one line each)

  if (argc > 1 && argv[1][0] != '-') {
    std::string cmd = argv[1];
    std::string names;
    bool known = false;
    for (const Command& c : commands) {
      known |= c.app->get_name() == cmd;
      names += (names.empty() ? "" : ", ") + c.app->get_name();
    }
    if (!known) {
      spdlog::error("dtrain: unknown command '{}' (commands: {}; see dtrain --help)", cmd, names);
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
    for (const Command& c : commands) {
      if (c.app->parsed()) return c.run();
    }
  } catch (const dtrain::Error& e) {
    spdlog::error("dtrain: error: {} ({}{})", e.message(), dtrain::error_kind_name(e.kind()),
                  e.where().empty() ? "" : ", " + e.where());
    return 1;
  } catch (const std::exception& e) {
    spdlog::error("dtrain: error: {}", e.what());
    return 1;
  }
  return 0;
}
