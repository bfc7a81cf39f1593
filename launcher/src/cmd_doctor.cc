// `dtrain doctor`: what a user with a GPU runs first. Prints the devices, the driver
// and the CUDA, cuBLAS, cuDNN and NCCL versions, then checks every op on every
// available backend against the CPU reference (forward and backward, random odd
// shapes; dtrain/engine/cuda/op_check.h) and prints one table with the max relative
// error and pass/fail per op and dtype. Exit code 1 when any check fails.
#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "dtrain/engine/cuda/op_check.h"
#include "dtrain/engine/cuda/runtime.h"

namespace dtrain::cli {

namespace {

struct DoctorConfig {
  uint64_t seed = 1234;
  std::string only;  // "", "cpu" or "cuda"
};

std::string error_cell(double e, bool skipped) {
  if (skipped) return "-";
  return fmt::format("{:.2e}", e);
}

int run_doctor(const DoctorConfig& c) {
  fmt::print("dtrain doctor\n");
  const cuda::Versions v = cuda::versions();
  fmt::print("  CUDA backend: {}\n", cuda::built_with_cuda() ? "built" : "not built");
  fmt::print("  driver (CUDA): {}  runtime: {}  cuBLAS: {}  cuDNN: {}  NCCL: {}\n", v.driver,
             v.runtime, v.cublas, v.cudnn, v.nccl);
  const std::vector<cuda::DeviceInfo> devs = cuda::devices();
  if (devs.empty()) {
    fmt::print("  devices: no GPU found (no CUDA device: {})\n", cuda::device_error());
  }
  for (const cuda::DeviceInfo& d : devs) {
    fmt::print("  cuda:{}: {} (sm_{}{}, {:.1f} GiB, {} SMs)\n", d.index, d.name, d.cc_major,
               d.cc_minor, static_cast<double>(d.total_memory) / (1 << 30), d.multiprocessors);
  }

  struct Run {
    Device device;
    DType dtype;
    check::Precision precision;
  };
  std::vector<Run> runs;
  if (c.only != "cuda") runs.push_back({Device::cpu(), DType::f32, check::Precision::kNative});
  if (c.only != "cpu") {
    for (const cuda::DeviceInfo& d : devs) {
      Device dev = Device::cuda(d.index);
      runs.push_back({dev, DType::f32, check::Precision::kNative});
      runs.push_back({dev, DType::f32, check::Precision::kTf32});
      runs.push_back({dev, DType::bf16, check::Precision::kNative});
      runs.push_back({dev, DType::f16, check::Precision::kNative});
    }
  }

  fmt::print("\n{:<40} {:<7} {:<5} {:>9} {:>9} {:>8}  {}\n", "op", "backend", "dtype", "fwd err",
             "bwd err", "tol", "result");
  int passed = 0, failed = 0, skipped = 0;
  for (const Run& r : runs) {
    for (const check::Result& res : check::run_all(r.device, r.dtype, r.precision, c.seed)) {
      std::string verdict = res.skipped  ? "skip: " + res.note
                            : res.passed ? "pass"
                                         : "FAIL" + (res.note.empty() ? "" : ": " + res.note);
      fmt::print("{:<40} {:<7} {:<5} {:>9} {:>9} {:>8.0e}  {}\n", res.op, res.backend, res.dtype,
                 error_cell(res.forward_error, res.skipped),
                 error_cell(res.backward_error, res.skipped || !res.checked_backward),
                 res.tolerance, verdict);
      (res.skipped ? skipped : res.passed ? passed : failed) += 1;
    }
  }
  fmt::print("\n{} passed, {} failed, {} skipped", passed, failed, skipped);
  if (devs.empty()) {
    fmt::print(" -- no GPU found: checked the CPU backend only\n");
  } else {
    fmt::print(" on cpu and {} GPU(s)\n", devs.size());
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace

Command add_doctor_command(CLI::App& app) {
  auto c = std::make_shared<DoctorConfig>();
  CLI::App* d = app.add_subcommand(
      "doctor", "Show GPUs and library versions; check every op on every backend against the CPU");
  d->add_option("--seed", c->seed, "Seed of the random inputs")->capture_default_str();
  d->add_option("--only", c->only, "Check one backend only: cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  return Command{d, [c] { return run_doctor(*c); }};
}

}  // namespace dtrain::cli
