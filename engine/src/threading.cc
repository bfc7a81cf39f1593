#include "dtrain/engine/threading.h"

#include <cblas.h>
#include <omp.h>

#include "dtrain/common/error.h"

// OpenBLAS's own (exported, not in cblas.h): joins the pool's threads; the library
// starts them again when it next needs them.
extern "C" int blas_thread_shutdown_(void);

namespace dtrain {

void set_num_threads(int n) {
  DTRAIN_CHECK(n >= 1, InvalidArgument, "thread count must be >= 1, got {}", n);
  openblas_set_num_threads(n);
  omp_set_num_threads(n);  // oneDNN (Debian's build) runs on OpenMP
}

int num_threads() { return openblas_get_num_threads(); }

void restart_blas_threads() {
  const int n = openblas_get_num_threads();
  blas_thread_shutdown_();
  openblas_set_num_threads(n);
}

}  // namespace dtrain
