// Intra-op thread count for the CPU kernels (OpenBLAS and oneDNN).
//
// This sets the libraries' own pools; dtrain itself runs each op on the calling
// thread. Data-parallel workers usually run one thread each (one worker per core).
#pragma once

namespace dtrain {

void set_num_threads(int n);
int num_threads();

}  // namespace dtrain
