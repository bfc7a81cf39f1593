// Shared helpers of the mpi backend tests (test_comm_mpi.cc: collectives, runtime,
// main; test_comm_mpi_failures.cc: timeouts, abort, split): the process's MpiRuntime,
// deterministic inputs every rank can recompute for every rank, typed buffers compared
// element by element, the reduction oracle, and the MpiComm fixture (one fresh
// communicator per test, a collective verdict at the end). Both files are one binary run
// under mpirun; the fixture lives in a named namespace so that their TEST_Ps share one
// parameterised suite (instantiated once, in test_comm_mpi.cc).
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/comm/mpi.h"

namespace dtrain::comm {

// GoogleTest names the parameter in failure lines (found by ADL, so in MpiAlgorithm's
// namespace).
inline void PrintTo(MpiAlgorithm algo, std::ostream* os) { *os << mpi_algorithm_name(algo); }

namespace mpitest {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr DType kDTypes[] = {DType::f32, DType::f64, DType::i32, DType::i64,
                             DType::u8,  DType::f16, DType::bf16};
constexpr ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};
constexpr size_t kLarge = 1'000'003;  // odd, and not divisible by 2, 3 or 4

// The process's runtime, set by main() before RUN_ALL_TESTS.
inline std::shared_ptr<MpiRuntime>& runtime() {
  static std::shared_ptr<MpiRuntime> r;
  return r;
}

enum class InitMode { kDtrain, kSerialized, kFunneled };

inline InitMode init_mode() {
  const char* v = std::getenv("DTRAIN_TEST_MPI_INIT");
  const std::string mode = v ? v : "dtrain";
  if (mode == "serialized") return InitMode::kSerialized;
  if (mode == "funneled") return InitMode::kFunneled;
  return InitMode::kDtrain;
}

inline int world_rank() { return runtime()->world_rank(); }
inline int world_size() { return runtime()->world_size(); }

// ---- deterministic inputs and typed element access ----

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Rank `rank`'s input element `i` for a test `salt`, as a double that the dtype holds
// exactly; any sum of up to 4 of them is exact in the dtype too.
inline double input_value(DType dtype, int rank, size_t i, uint64_t salt) {
  const uint64_t h = splitmix64((static_cast<uint64_t>(rank) << 48) ^ (salt << 40) ^ i);
  auto centered = [&](uint64_t range) {  // uniform integer in [-(range/2), range/2]
    // Powers of two by mask, others by multiply-shift (no division: this runs ~1e8 times).
    const uint64_t u = (range & (range - 1)) == 0 ? h & (range - 1) : ((h >> 32) * range) >> 32;
    return static_cast<double>(static_cast<int64_t>(u) - static_cast<int64_t>(range / 2));
  };
  switch (dtype) {
    case DType::f32:
      return centered(2001) * 0.25;
    case DType::f64:
      return centered(20001) * 0.125;
    case DType::f16:
      return centered(61) * 0.25;
    case DType::bf16:
      return centered(31) * 0.5;
    case DType::i32:
      return centered(uint64_t{1} << 29);
    case DType::i64:
      return centered(uint64_t{1} << 50);
    case DType::u8:
      return static_cast<double>(h & 63);
  }
  return 0;
}

inline double read(DType dtype, const void* base, size_t i) {
  switch (dtype) {
    case DType::f32:
      return static_cast<const float*>(base)[i];
    case DType::f64:
      return static_cast<const double*>(base)[i];
    case DType::f16:
      return static_cast<float>(static_cast<const Half*>(base)[i]);
    case DType::bf16:
      return static_cast<float>(static_cast<const BFloat16*>(base)[i]);
    case DType::i32:
      return static_cast<const int32_t*>(base)[i];
    case DType::i64:
      return static_cast<double>(static_cast<const int64_t*>(base)[i]);
    case DType::u8:
      return static_cast<const uint8_t*>(base)[i];
  }
  return 0;
}

inline void write(DType dtype, void* base, size_t i, double v) {
  switch (dtype) {
    case DType::f32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      return;
    case DType::f64:
      static_cast<double*>(base)[i] = v;
      return;
    case DType::f16:
      static_cast<Half*>(base)[i] = Half(static_cast<float>(v));
      return;
    case DType::bf16:
      static_cast<BFloat16*>(base)[i] = BFloat16(static_cast<float>(v));
      return;
    case DType::i32:
      static_cast<int32_t*>(base)[i] = static_cast<int32_t>(static_cast<int64_t>(v));
      return;
    case DType::i64:
      static_cast<int64_t*>(base)[i] = static_cast<int64_t>(v);
      return;
    case DType::u8:
      static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(static_cast<int64_t>(v));
      return;
  }
}

// A typed buffer of `count` elements.
struct Buffer {
  DType dtype;
  size_t count;
  std::vector<std::byte> bytes;
  Buffer(DType t, size_t n) : dtype(t), count(n), bytes(n * dtype_size(t) + 1) {}
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  double get(size_t i) const { return read(dtype, data(), i); }
  void set(size_t i, double v) { write(dtype, data(), i, v); }
};

// Buffer holding `rank`'s input elements [first, first + count).
inline Buffer make_input(DType dtype, int rank, size_t first, size_t count, uint64_t salt) {
  Buffer b(dtype, count);
  for (size_t i = 0; i < count; ++i) b.set(i, input_value(dtype, rank, first + i, salt));
  return b;
}

// kAvg's final scaling exactly as comm::scale_in_place documents it: floats multiply
// by 1/n rounded to their compute type (float for f32/f16/bf16), integers round to
// nearest.
inline double scale_like_library(DType dtype, double v, int n) {
  const double factor = 1.0 / n;
  switch (dtype) {
    case DType::f64:
      return v * factor;
    case DType::f32:
    case DType::f16:
    case DType::bf16:
      return static_cast<double>(static_cast<float>(v) * static_cast<float>(factor));
    case DType::i32:
    case DType::i64:
    case DType::u8:
      return static_cast<double>(std::llround(v * factor));
  }
  return v;
}

// The reduction over every rank of input element `i`, as stored in the dtype.
inline void oracle_reduce(Buffer& out, size_t out_i, size_t in_i, ReduceOp op, int n,
                          uint64_t salt) {
  double acc = input_value(out.dtype, 0, in_i, salt);
  for (int r = 1; r < n; ++r) {
    const double v = input_value(out.dtype, r, in_i, salt);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg:
        acc += v;
        break;
      case ReduceOp::kMax:
        acc = std::max(acc, v);
        break;
      case ReduceOp::kMin:
        acc = std::min(acc, v);
        break;
    }
  }
  out.set(out_i, acc);
  if (op == ReduceOp::kAvg) out.set(out_i, scale_like_library(out.dtype, out.get(out_i), n));
}

// Element-by-element comparison; reports the first few mismatches.
inline testing::AssertionResult same_elements(const Buffer& got, const Buffer& want) {
  size_t wrong = 0;
  std::string detail;
  for (size_t i = 0; i < want.count; ++i) {
    const double g = got.get(i), w = want.get(i);
    if (g == w) continue;
    if (++wrong <= 5)
      detail += " [" + std::to_string(i) + "] got " + std::to_string(g) + " want " +
                std::to_string(w) + ";";
  }
  if (wrong == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure()
         << wrong << " of " << want.count << " elements wrong:" << detail;
}

inline std::string label(const char* what, DType dtype, size_t count) {
  return std::string(what) + " " + dtype_name(dtype) + " count " + std::to_string(count);
}

// ---- the fixture: one fresh communicator per test, a collective verdict at the end ----

struct AlgoName {
  std::string operator()(const testing::TestParamInfo<MpiAlgorithm>& info) const {
    return mpi_algorithm_name(info.param);
  }
};

class MpiComm : public testing::TestWithParam<MpiAlgorithm> {
 protected:
  void SetUp() override { comm_ = make(milliseconds(20'000)); }

  void TearDown() override {
    comm_.reset();
    // Every rank learns whether the test failed anywhere (bounded: never hangs).
    int mine = HasFailure() ? 1 : 0, any = 0;
    MPI_Request req;
    {
      auto lock = runtime()->lock_mpi();
      MPI_Iallreduce(&mine, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD, &req);
    }
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    for (int done = 0; !done;) {
      {
        auto lock = runtime()->lock_mpi();  // the test's own MPI calls, too, under SERIALIZED
        MPI_Test(&req, &done, MPI_STATUS_IGNORE);
      }
      if (!done && Clock::now() > deadline) {
        std::fprintf(stderr, "[rank %d] ranks diverged: the end-of-test check timed out\n",
                     world_rank());
        runtime()->abort_job(3);
      }
      if (!done) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    if (any && !mine) ADD_FAILURE() << "this test failed on another rank (see its [rank r] lines)";
  }

  std::unique_ptr<Communicator> make(milliseconds timeout) const {
    MpiOptions mpi;
    mpi.algorithm = GetParam();
    return make_mpi_communicator(runtime(), CommOptions{timeout}, mpi);
  }

  Communicator& comm() { return *comm_; }
  int n() const { return world_size(); }
  int me() const { return world_rank(); }
  std::vector<size_t> counts() const {
    // 65537: inside auto's native window (512 KiB - 1 MiB) for the 8-byte types.
    return {0, 1, 7, 1023, static_cast<size_t>(37 * n() + 1), 65537, kLarge};
  }

  std::unique_ptr<Communicator> comm_;
};

}  // namespace mpitest
}  // namespace dtrain::comm
