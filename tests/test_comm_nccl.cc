// The nccl backend. Without a GPU (or without the CUDA backend) the collective tests
// skip with the driver's reason, and creating a communicator is tested to fail with
// one clear "nccl: no CUDA device: ..." error. With one GPU: a one-rank communicator
// (collectives are identities, ordered with the compute stream). With two or more:
// one thread per GPU as ranks over a MemoryStore, results against the host's sums.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <numeric>
#include <thread>
#include <vector>

#include "dtrain/comm/nccl.h"
#include "dtrain/comm/store.h"

namespace dtrain::comm {
namespace {

int gpus() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string no_gpu_reason() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  (void)cudaGetLastError();
  return e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA-capable device is detected";
}

TEST(NcclComm, NoDeviceIsOneClearError) {
  if (gpus() > 0) GTEST_SKIP() << "a CUDA device is present";
  MemoryStore store;
  try {
    make_nccl_communicator(store, 0, 1, NcclOptions{});
    FAIL() << "created an nccl communicator without a GPU";
  } catch (const UnsupportedError& e) {
    EXPECT_EQ(e.message(), "nccl: no CUDA device: " + no_gpu_reason());
  }
}

TEST(NcclComm, RejectsBadRank) {
  MemoryStore store;
  EXPECT_THROW(make_nccl_communicator(store, 2, 2, NcclOptions{}), InvalidArgument);
}

std::vector<float> run_allreduce(int rank, int size, Store& store, ReduceOp op) {
  NcclOptions o;
  o.device = rank;
  auto comm = make_nccl_communicator(store, rank, size, o);
  const size_t n = 1000 + 3;  // odd count
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>((rank + 1) * (i % 17));
  void* dev = nullptr;
  EXPECT_EQ(cudaMalloc(&dev, n * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  comm->allreduce(dev, n, DType::f32, op);
  EXPECT_EQ(cudaMemcpy(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(dev);
  comm->barrier();
  return host;
}

TEST(NcclComm, OneRankCollectivesAreIdentities) {
  if (gpus() < 1) GTEST_SKIP() << "no CUDA device: " << no_gpu_reason();
  MemoryStore store;
  std::vector<float> got = run_allreduce(0, 1, store, ReduceOp::kSum);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], static_cast<float>(i % 17));
}

TEST(NcclComm, AllreduceAcrossGpusMatchesHostSum) {
  const int n = gpus();
  if (n < 2) GTEST_SKIP() << "needs two CUDA devices, found " << n;
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
    MemoryStore store;
    std::vector<std::vector<float>> results(static_cast<size_t>(n));
    std::vector<std::thread> ranks;
    for (int r = 0; r < n; ++r) {
      ranks.emplace_back(
          [&, r] { results[static_cast<size_t>(r)] = run_allreduce(r, n, store, op); });
    }
    for (auto& t : ranks) t.join();
    const float factor = static_cast<float>(n * (n + 1) / 2) / (op == ReduceOp::kAvg ? n : 1);
    for (const auto& res : results) {
      for (size_t i = 0; i < res.size(); ++i) {
        ASSERT_FLOAT_EQ(res[i], factor * static_cast<float>(i % 17)) << reduce_op_name(op);
      }
    }
  }
}

}  // namespace
}  // namespace dtrain::comm
