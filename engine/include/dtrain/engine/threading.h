// Intra-op thread count for the CPU kernels (OpenBLAS and oneDNN).
//
// This sets the libraries' own pools; dtrain itself runs each op on the calling
// thread. Data-parallel workers usually run one thread each (one worker per core).
#pragma once

namespace dtrain {

void set_num_threads(int n);
int num_threads();

// Stops OpenBLAS's thread pool, which its library constructor started before main
// (with every signal unblocked); the next set_num_threads or BLAS call starts it
// again from the calling thread, so the new threads inherit that thread's signal
// mask (signal_checkpoint.h blocks signals process-wide this way). REQUIRES: no BLAS
// call running.
void restart_blas_threads();

}  // namespace dtrain
