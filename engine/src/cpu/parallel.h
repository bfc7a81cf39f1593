// A static-partition parallel loop for the CPU kernels (internal to the engine).
//
// parallel_for(n, threads, body) runs body(begin, end, thread) over [0, n) split into
// `threads` contiguous ranges on an OpenMP team (one range per thread, so per-thread
// scratch and partial sums are indexed by `thread` and a reduction over them in thread
// order is deterministic for a given thread count). An exception thrown by a body is
// caught inside the parallel region and rethrown on the calling thread (an exception
// escaping an OpenMP region would terminate the process). It is not a work-stealing
// scheduler: the ranges are equal, so give it uniform work.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <exception>

#include "dtrain/engine/threading.h"

namespace dtrain::cpu {

// Threads worth using for `work` scalar operations over `n` independent items: one
// below ~64K operations (a team costs microseconds), at most num_threads() and n.
inline int threads_for(int64_t n, int64_t work) {
  if (n <= 1 || work < (int64_t{1} << 16)) return 1;
  return static_cast<int>(std::min<int64_t>(num_threads(), n));
}

template <typename F>
void parallel_for(int64_t n, int threads, F&& body) {
  if (n <= 0) return;
  if (threads <= 1) {
    body(int64_t{0}, n, 0);
    return;
  }
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t begin = std::min<int64_t>(n, t * chunk),
                  end = std::min<int64_t>(n, begin + chunk);
    try {
      if (begin < end) body(begin, end, t);
    } catch (...) {
#pragma omp critical(dtrain_parallel_for_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace dtrain::cpu
