// `dtrain bench scaling --predict | --fit | --validate` (cmd_bench_scaling_model.cc):
// the scaling model's options on the `bench scaling` subcommand.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <optional>

namespace dtrain::cli {

// Adds the options to `scaling`. The returned function runs the mode that was asked
// for and returns its exit code, or nullopt when none of the three was given.
std::function<std::optional<int>()> add_scaling_model_options(CLI::App& scaling);

}  // namespace dtrain::cli
