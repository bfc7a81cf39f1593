// bf16 autocast on the CPU: real oneDNN bf16 primitives for linear and conv2d.
//
// Under AutocastGuard(DType::bf16) (amp.h), linear() and conv2d() (groups 1) on f32
// CPU tensors run as oneDNN bf16 primitives: operands rounded to bf16 (round to
// nearest even, the conversion shared with CUDA), products accumulated in f32, f32
// output; backward rounds the incoming gradient to bf16 and runs the data and weight
// gradients as bf16 primitives too, with f32 results. Biases stay f32 (added to the
// f32 accumulator forward; their gradient sums the f32 incoming gradient). Parameters
// stay f32: they are the master weights, as with torch.autocast("cpu", bfloat16).
//
// The emulation (round the operands, then the f32 kernels: exactly the same products,
// summed in another order) is the oracle of the tests, what CUDA runs, and what
// DTRAIN_CPU_BF16=emulate selects on the CPU. Without AVX512-BF16 or AMX the oneDNN
// path refuses with a clear error (require_cpu_bf16) rather than quietly emulating.
// Deliberately not here: bf16 activations between layers, grouped convolutions
// (they stay f32 under autocast), f16 on the CPU (it keeps the emulation).
// Thread-safety: any thread; autocast itself is per thread (amp.h).
#pragma once

#include <string>

#include "dtrain/engine/ops.h"
#include "dtrain/engine/tensor.h"

namespace dtrain::amp {

enum class CpuBf16Path {
  kOneDnn,   // oneDNN bf16 primitives (the default where the CPU has the ISA)
  kEmulate,  // rounded operands on the f32 kernels (DTRAIN_CPU_BF16=emulate)
};

// DTRAIN_CPU_BF16: "onednn" -> kOneDnn; "emulate" -> kEmulate; unset or "" -> kOneDnn
// where cpu_has_native_bf16(), else kEmulate; anything else throws InvalidArgument
// naming the value.
CpuBf16Path cpu_bf16_path();
// Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX).
bool cpu_has_native_bf16();
// oneDNN's effective ISA on this CPU in words (avx512_core_bf16, avx2, ...).
std::string cpu_isa_name();
// Throws UnsupportedError ("bf16 on the CPU needs AVX512-BF16 or AMX; this CPU has
// ...") when `path` is kOneDnn and the CPU cannot run it; no-op otherwise.
void require_cpu_bf16(CpuBf16Path path);

// x [..., in] W[out, in]^T + b on oneDNN bf16 primitives (f32 CPU tensors in and out;
// differentiable). Calls require_cpu_bf16(kOneDnn).
Tensor onednn_bf16_linear(const Tensor& x, const Tensor& weight, const Tensor& bias);
// conv2d (groups 1) on oneDNN bf16 primitives, forward and both gradients.
Tensor onednn_bf16_conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias,
                          Conv2dOptions opt = {});

// The emulation: operands rounded to `dtype`, f32 kernels, incoming gradient rounded
// (any device; differentiable). The oracle of the oneDNN path.
Tensor emulated_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, DType dtype);
Tensor emulated_conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt,
                       DType dtype);

// What conv2d() calls under an AutocastGuard: oneDNN for bf16 on the CPU unless
// DTRAIN_CPU_BF16=emulate, else emulated_conv2d.
Tensor autocast_conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, Conv2dOptions opt,
                       DType dtype);

}  // namespace dtrain::amp
