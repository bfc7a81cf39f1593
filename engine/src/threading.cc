#include "dtrain/engine/threading.h"

#include <cblas.h>
#include <omp.h>

#include "dtrain/common/error.h"

namespace dtrain {

void set_num_threads(int n) {
  DTRAIN_CHECK(n >= 1, InvalidArgument, "thread count must be >= 1, got {}", n);
  openblas_set_num_threads(n);
  omp_set_num_threads(n);  // oneDNN (Debian's build) runs on OpenMP
}

int num_threads() { return openblas_get_num_threads(); }

}  // namespace dtrain
