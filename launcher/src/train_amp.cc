// --amp for `dtrain train` (train_amp.h).
#include "train_amp.h"

#include <cstdlib>

#include <fmt/format.h>

#include "dtrain/common/error.h"
#include "dtrain/engine/amp_cpu.h"

namespace dtrain::cli {

void add_amp_options(CLI::App* t, TrainConfig& c) {
  t->add_option("--amp", c.amp,
                "Mixed precision: none | bf16 (linear and conv2d on bf16 operands with f32 "
                "accumulation and f32 master weights; on the CPU oneDNN's bf16 primitives, "
                "which need AVX512-BF16 or AMX). --bf16 is the same")
      ->capture_default_str();
}

void resolve_amp(TrainConfig& c) {
  if (c.amp == "bf16") c.bf16 = true;
  if (c.bf16) c.amp = "bf16";
}

void validate_amp(const TrainConfig& c) {
  DTRAIN_CHECK(c.amp == "none" || c.amp == "bf16", InvalidArgument,
               "--amp {}: expected none or bf16", c.amp);
  if (c.amp != "bf16" || c.device != "cpu") return;
  // Asked for bf16 on the CPU: oneDNN's, or the clear message, unless the user chose
  // the emulation explicitly (DTRAIN_CPU_BF16=emulate); never a silent fallback.
  const char* env = std::getenv("DTRAIN_CPU_BF16");
  const bool explicit_choice = env != nullptr && *env != '\0';
  amp::require_cpu_bf16(explicit_choice ? amp::cpu_bf16_path() : amp::CpuBf16Path::kOneDnn);
}

std::string amp_line(const TrainConfig& c) {
  if (c.amp != "bf16") return "";
  std::string how = "bf16 on the device";
  if (c.device == "cpu") {
    how = amp::cpu_bf16_path() == amp::CpuBf16Path::kOneDnn
              ? fmt::format("oneDNN bf16 primitives, {}", amp::cpu_isa_name())
              : std::string("DTRAIN_CPU_BF16=emulate: rounded operands on f32 kernels");
  }
  return fmt::format("amp: bf16 autocast ({}); f32 master weights", how);
}

}  // namespace dtrain::cli
