// `dtrain models`: every reference model with its input, parameter count and
// multiply-adds per sample (nn::count_multiply_adds: Conv2d, Linear and LSTM), so a
// model's size and cost can be compared before training it.
#include <fmt/format.h>

#include <memory>
#include <string>

#include "commands.h"
#include "dtrain/engine/nn/mobilenet.h"
#include "dtrain/engine/nn/models.h"

namespace dtrain::cli {

namespace {

int run_models() {
  fmt::print("{:<10} {:<28} {:>12} {:>20}\n", "model", "input", "parameters",
             "multiply-adds/sample");
  for (const std::string& name : nn::model_names()) {
    const nn::ModelInfo& info = nn::model_info(name);
    Generator gen(1);
    std::shared_ptr<nn::Sequential> model = nn::make_model(name, gen);
    int64_t macs = nn::count_multiply_adds(*model, info.input_shape, info.input_dtype);
    fmt::print("{:<10} {:<28} {:>12} {:>20}\n", name, info.input, model->num_parameters(), macs);
  }
  fmt::print("(--model gpt: see `dtrain bench gpt`)\n");
  return 0;
}

}  // namespace

Command add_models_command(CLI::App& app) {
  CLI::App* sub =
      app.add_subcommand("models", "List the reference models: parameters and multiply-adds");
  return {sub, [] { return run_models(); }};
}

}  // namespace dtrain::cli
