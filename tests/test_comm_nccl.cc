// The nccl backend. Without a GPU (or without the CUDA backend) the collective tests
// skip with the driver's reason, and creating a communicator is tested to fail with
// one clear "nccl: no CUDA device: ..." error. With one GPU: a one-rank communicator
// (collectives are identities, ordered with the compute stream). With two or more:
// one thread per GPU as ranks over a MemoryStore, results against the host's sums.
// split(): a one-rank child on one GPU; a reversed-key group across two or more.
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

// split on one GPU: a one-rank child (its allreduce is the identity), kNoColor gives
// nullptr, a negative color other than kNoColor is refused.
TEST(NcclComm, SplitOneRank) {
  if (gpus() < 1) GTEST_SKIP() << "no CUDA device: " << no_gpu_reason();
  MemoryStore store;
  auto comm = make_nccl_communicator(store, 0, 1, NcclOptions{});
  EXPECT_THROW(comm->split(-3, 0), InvalidArgument);
  EXPECT_EQ(comm->split(Communicator::kNoColor, 0), nullptr);
  auto child = comm->split(7, 1);
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(child->size(), 1);
  EXPECT_EQ(child->rank(), 0);
  std::vector<float> host = {1, 2, 3};
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, sizeof(float) * 3), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dev, host.data(), sizeof(float) * 3, cudaMemcpyHostToDevice), cudaSuccess);
  child->allreduce(dev, 3, DType::f32, ReduceOp::kSum);
  std::vector<float> got(3);
  ASSERT_EQ(cudaMemcpy(got.data(), dev, sizeof(float) * 3, cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(dev);
  EXPECT_EQ(got, host);
}

// Every GPU a rank; one group with key = -rank (reversed order): ranks come out reversed
// and the allreduce is the host sum over all ranks.
TEST(NcclComm, SplitAcrossGpusReversesByKey) {
  const int n = gpus();
  if (n < 2) GTEST_SKIP() << "needs two CUDA devices, found " << n;
  MemoryStore store;
  std::vector<int> child_rank(static_cast<size_t>(n), -1);
  std::vector<float> sum(static_cast<size_t>(n), -1);
  std::vector<std::thread> ranks;
  for (int r = 0; r < n; ++r) {
    ranks.emplace_back([&, r] {
      NcclOptions o;
      o.device = r;
      auto comm = make_nccl_communicator(store, r, n, o);
      auto child = comm->split(0, -r);
      child_rank[static_cast<size_t>(r)] = child->rank();
      float v = static_cast<float>(r + 1);
      void* dev = nullptr;
      EXPECT_EQ(cudaMalloc(&dev, sizeof(float)), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(dev, &v, sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
      child->allreduce(dev, 1, DType::f32, ReduceOp::kSum);
      EXPECT_EQ(cudaMemcpy(&v, dev, sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      cudaFree(dev);
      sum[static_cast<size_t>(r)] = v;
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(child_rank[static_cast<size_t>(r)], n - 1 - r);
    EXPECT_EQ(sum[static_cast<size_t>(r)], static_cast<float>(n * (n + 1) / 2));
  }
}

}  // namespace
}  // namespace dtrain::comm
