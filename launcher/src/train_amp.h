// `dtrain train --amp bf16` (and its older spelling --bf16): mixed precision for every
// model. The flag only chooses; the arithmetic is amp.h / amp_cpu.h.
//
// --amp bf16 runs each rank's training under amp::AutocastGuard(bf16): the linears
// and convolutions compute on bf16 operands with f32 accumulation, the parameters
// stay f32 (the master weights), nothing else changes. On the CPU it needs
// AVX512-BF16 or AMX (oneDNN's bf16 primitives); without them the run stops before
// training with one clear error (DTRAIN_CPU_BF16=emulate forces the emulation).
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "train.h"

namespace dtrain::cli {

// Adds --amp none|bf16 to `train`.
void add_amp_options(CLI::App* t, TrainConfig& c);
// After parsing: --bf16 and --amp bf16 mean the same (both fields end up set).
void resolve_amp(TrainConfig& c);
// Throws InvalidArgument for an unknown --amp, UnsupportedError when bf16 was asked
// for on a CPU that cannot run it.
void validate_amp(const TrainConfig& c);
// "amp: bf16 autocast (oneDNN bf16 primitives, avx512_core_bf16); f32 master weights",
// or "" without --amp.
std::string amp_line(const TrainConfig& c);

}  // namespace dtrain::cli
