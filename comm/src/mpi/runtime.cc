// MpiRuntime: the RAII guard of MPI_Init_thread/MPI_Finalize, plus the small helpers the
// mpi backend shares (error checking, dtype mapping).
//
// MPI may be initialised once per process and finalised once, so init() hands out one
// runtime object per process: a weak_ptr remembers the live one (it owns nothing; the
// callers' shared_ptrs do). This mirrors MPI's own process-wide state and is the only
// process-wide variable of the backend. The runtime finalises MPI only if it initialised
// it: an application that called MPI_Init itself keeps ownership of MPI_Finalize.
#include <mpi.h>

#include <cstdlib>
#include <string>

#include "dtrain/comm/mpi.h"
#include "mpi/mpi_internal.h"

namespace dtrain::comm {
namespace mpi_detail {

void check(int rc, const char* what, const char* file, int line) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  throw CommError(fmt::format("mpi: {} failed: {} (error code {})", what,
                              std::string(text, static_cast<size_t>(len)), rc),
                  file, line);
}

MPI_Datatype datatype(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    case DType::u8:
      return MPI_UINT8_T;
    case DType::f16:
    case DType::bf16:
      return MPI_UINT16_T;
  }
  DTRAIN_THROW(DTypeError, "mpi: unknown dtype {}", static_cast<int>(dtype));
}

}  // namespace mpi_detail

namespace {

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE:
      return "MPI_THREAD_MULTIPLE";
  }
  return "unknown";
}

}  // namespace

const char* mpi_algorithm_name(MpiAlgorithm algo) {
  switch (algo) {
    case MpiAlgorithm::kRing:
      return "ring";
    case MpiAlgorithm::kNative:
      return "native";
    case MpiAlgorithm::kAuto:
      return "auto";
  }
  return "?";
}

std::shared_ptr<MpiRuntime> MpiRuntime::init() {
  static std::mutex mu;
  static std::weak_ptr<MpiRuntime> live;
  std::lock_guard<std::mutex> lock(mu);
  if (auto existing = live.lock()) return existing;
  std::shared_ptr<MpiRuntime> runtime(new MpiRuntime());
  live = runtime;
  return runtime;
}

MpiRuntime::MpiRuntime() {
  int finalized = 0;
  MPI_CHECK(MPI_Finalized(&finalized), "MPI_Finalized");
  DTRAIN_CHECK(!finalized, CommError,
               "mpi: MPI was already finalised in this process and cannot be initialised "
               "again; keep one MpiRuntime alive for as long as MPI communicators are needed");
  int initialized = 0;
  MPI_CHECK(MPI_Initialized(&initialized), "MPI_Initialized");
  if (initialized) {
    MPI_CHECK(MPI_Query_thread(&thread_level_), "MPI_Query_thread");
  } else {
    MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &thread_level_),
              "MPI_Init_thread");
    owns_mpi_ = true;
  }
  if (thread_level_ < MPI_THREAD_SERIALIZED) {
    if (owns_mpi_) MPI_Finalize();
    DTRAIN_THROW(UnsupportedError,
                 "mpi: the MPI library provides {}, but the mpi backend calls MPI from its "
                 "worker thread and needs MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE; "
                 "initialise MPI with MPI_Init_thread(..., MPI_THREAD_MULTIPLE, ...) or let "
                 "dtrain initialise it",
                 thread_level_name(thread_level_));
  }
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_), "MPI_Comm_rank");
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_size_), "MPI_Comm_size");
}

MpiRuntime::~MpiRuntime() {
  if (!owns_mpi_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiRuntime::abort_job(int exit_code) const {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::abort();  // MPI_Abort does not return; this satisfies [[noreturn]].
}

std::unique_lock<std::mutex> MpiRuntime::lock_mpi() const {
  if (thread_level_ >= MPI_THREAD_MULTIPLE) return {};
  return std::unique_lock<std::mutex>(serialize_mu_);
}

}  // namespace dtrain::comm
