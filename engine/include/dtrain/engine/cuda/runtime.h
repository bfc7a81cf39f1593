// The CUDA runtime as the rest of dtrain sees it: is there a device, what is it, and
// which library versions were built in. Plain C++ (no CUDA headers), available in every
// build: without the CUDA backend the queries say so instead of failing to link.
//
// Device selection and streams: each device has one compute stream on which every
// kernel, cuBLAS/cuDNN call and device copy of the engine runs in order (so the
// caching device allocator can hand a freed block to the next op without a sync).
// The DataLoader copies host batches on its own copy stream and orders the compute
// stream after them with an event (data/loader.h).
//
// Thread-safety: every function may be called from any thread.
#pragma once

#include <string>
#include <vector>

#include "dtrain/common/error.h"
#include "dtrain/engine/device.h"

namespace dtrain::cuda {

// "cpu", "cuda" (= cuda:0) or "cuda:N"; throws InvalidArgument naming the text otherwise.
// Does not check that the device exists (require_device does).
inline Device parse_device(const std::string& s) {
  if (s == "cpu") return Device::cpu();
  if (s == "cuda") return Device::cuda(0);
  if (s.size() > 5 && s.compare(0, 5, "cuda:") == 0 &&
      s.find_first_not_of("0123456789", 5) == std::string::npos && s.size() <= 8) {
    return Device::cuda(std::stoi(s.substr(5)));
  }
  DTRAIN_THROW(InvalidArgument, "device '{}': expected cpu, cuda or cuda:N", s);
}

// True when this binary was built with the CUDA backend.
bool built_with_cuda();

// Number of visible CUDA devices; 0 when there is none, the driver is missing, or
// the backend is not built (device_error() then says why).
int device_count();

// Why device_count() is 0, in the driver's words ("CUDA driver version is
// insufficient for CUDA runtime version", "no CUDA-capable device is detected", or
// "dtrain was built without the CUDA backend"); empty when a device exists.
std::string device_error();

// Throws UnsupportedError "no CUDA device: <driver's error>" unless `device` is a
// CUDA device that exists; a no-op for the CPU.
void require_device(const Device& device);

struct DeviceInfo {
  int index = 0;
  std::string name;
  int cc_major = 0, cc_minor = 0;
  size_t total_memory = 0;
  int multiprocessors = 0;
};
std::vector<DeviceInfo> devices();

// Versions as printed by `dtrain doctor` ("13.0", "9.10.2", "2.27.7"); "none" when the
// driver is missing, "not built" without the backend.
struct Versions {
  std::string driver;   // the CUDA version the installed driver supports
  std::string runtime;  // the CUDA runtime dtrain was built and linked with
  std::string cublas;
  std::string cudnn;
  std::string nccl;
};
Versions versions();

// Waits until every queued operation on `device`'s compute stream has finished.
void synchronize(const Device& device);

// The cudaStream_t (as void*) of `device`'s compute stream, for libraries that must
// order their own work against the engine's (NcclOptions::compute_stream). Throws
// UnsupportedError "no CUDA device: ..." for the CPU or a device that does not exist.
void* compute_stream(const Device& device);

// While a guard lives, f32 matmuls and convolutions issued by the calling thread may
// use TF32 tensor cores (10-bit mantissa inputs, f32 accumulation; about 1e-3 relative
// error). Off by default: f32 means f32. Thread-local like NoGradGuard; guards nest.
class AllowTf32Guard {
 public:
  explicit AllowTf32Guard(bool allow = true) : previous_(flag()) { flag() = allow; }
  ~AllowTf32Guard() { flag() = previous_; }
  AllowTf32Guard(const AllowTf32Guard&) = delete;
  AllowTf32Guard& operator=(const AllowTf32Guard&) = delete;
  static bool enabled() { return flag(); }

 private:
  static bool& flag() {
    thread_local bool allow = false;
    return allow;
  }
  bool previous_;
};

}  // namespace dtrain::cuda
