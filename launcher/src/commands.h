// The dtrain subcommands. Each add_*_command registers its options on `app` and
// returns a Command whose run() executes it when it was the one parsed.
// run() throws dtrain::Error on failure; main() turns that into a message and exit 1.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace dtrain::cli {

struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;  // returns the process exit code
};

// "--epochs must be a positive integer, got -3" instead of CLI11's range text.
extern const CLI::Validator kPositive;

Command add_train_command(CLI::App& app);        // train.cc
Command add_data_command(CLI::App& app);         // main.cc
Command add_launch_command(CLI::App& app);       // cmd_launch.cc
Command add_coordinator_command(CLI::App& app);  // cmd_coordinator.cc
Command add_bench_command(CLI::App& app);        // cmd_bench.cc
Command add_doctor_command(CLI::App& app);       // cmd_doctor.cc
Command add_ckpt_command(CLI::App& app);         // cmd_ckpt.cc
Command add_generate_command(CLI::App& app);     // cmd_generate.cc
Command add_report_command(CLI::App& app);       // cmd_report.cc
Command add_status_command(CLI::App& app);       // cmd_status.cc
Command add_infer_command(CLI::App& app);        // cmd_infer.cc
Command add_prune_command(CLI::App& app);        // cmd_compress.cc
Command add_quantize_command(CLI::App& app);     // cmd_compress.cc
Command add_distill_command(CLI::App& app);      // cmd_distill.cc
Command add_models_command(CLI::App& app);       // cmd_models.cc

}  // namespace dtrain::cli
