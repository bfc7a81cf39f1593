// A user-defined model and data set trained data-parallel with dtrain's C++ API:
// RingNet (an nn::Module) classifies 2-D points by the ring they fall in (a Dataset
// that computes its samples from their index), over 2 ranks run as threads, each
// with a tcp communicator and DistributedDataParallel averaging the gradients.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/nn/layers.h"
#include "dtrain/engine/ops.h"
#include "dtrain/engine/optim/sgd.h"
#include "dtrain/parallel/ddp.h"

using namespace dtrain;

class RingNet : public nn::Module {
 public:
  explicit RingNet(Generator& gen)
      : Module("RingNet"),
        fc1(register_module("fc1", std::make_shared<nn::Linear>(2, 32, gen))),
        fc2(register_module("fc2", std::make_shared<nn::Linear>(32, 3, gen))) {}
  Tensor forward(const Tensor& x) override { return fc2->forward(relu(fc1->forward(x))); }
  std::shared_ptr<nn::Linear> fc1, fc2;
};

// Point i: a fixed pseudo-random point in [-3,3]^2; its class: the ring r < 1, < 2, else.
class RingDataset : public data::Dataset {
 public:
  explicit RingDataset(int64_t n) : n_(n) {}
  int64_t size() const override { return n_; }
  data::Batch get_batch(std::span<const int64_t> indices) const override {
    const auto b = static_cast<int64_t>(indices.size());
    Tensor x = empty({b, 2}), y = empty({b}, TensorOptions{}.with_dtype(DType::i64));
    for (int64_t k = 0; k < b; ++k) {
      Generator g(static_cast<uint64_t>(indices[k]));
      float px = g.uniform_float() * 6 - 3, py = g.uniform_float() * 6 - 3;
      x.data<float>()[2 * k] = px;
      x.data<float>()[2 * k + 1] = py;
      y.data<int64_t>()[k] = std::min<int64_t>(2, static_cast<int64_t>(std::hypot(px, py)));
    }
    return {x, y};
  }

 private:
  int64_t n_;
};

void train_rank(comm::Store& store, int rank, int world) {
  auto comm = comm::make_tcp_communicator(store, rank, world, comm::CommOptions{});
  Generator gen(42);  // the same initial weights on every rank (DDP broadcasts them anyway)
  auto model = std::make_shared<RingNet>(gen);
  parallel::DistributedDataParallel ddp(model, *comm);
  optim::SGD opt(model->parameters(), optim::SGDOptions(0.1).momentum(0.9));
  auto dataset = std::make_shared<RingDataset>(4096);
  data::DataLoader loader(dataset, data::DistributedSampler(4096, rank, world, 7), 64);
  for (int64_t epoch = 0; epoch < 8; ++epoch) {
    loader.begin_epoch(epoch);
    double sums[2] = {0, 0};  // loss sum, batches (summed over the ranks below)
    for (data::Batch batch; loader.next(batch);) {
      opt.zero_grad();
      Tensor loss = cross_entropy(ddp.forward(batch.input), batch.target);
      loss.backward();
      ddp.finish_gradient_sync();
      opt.step();
      sums[0] += loss.item();
      sums[1] += 1;
    }
    comm->allreduce(sums, 2, DType::f64, comm::ReduceOp::kSum);
    if (rank == 0)
      std::printf("epoch %ld loss %.4f\n", static_cast<long>(epoch), sums[0] / sums[1]);
  }
  RingDataset test(1000);
  std::vector<int64_t> idx(1000);
  for (int64_t i = 0; i < 1000; ++i) idx[i] = 100000 + i;  // points not seen in training
  data::Batch t = test.get_batch(idx);
  Tensor logits = model->forward(t.input);
  int64_t correct = 0;
  for (int64_t i = 0; i < 1000; ++i) {
    const float* row = logits.data<float>() + 3 * i;
    correct += (std::max_element(row, row + 3) - row) == t.target.data<int64_t>()[i];
  }
  if (rank == 0) std::printf("accuracy %.3f\n", static_cast<double>(correct) / 1000);
}

int main() {
  comm::MemoryStore store;  // the ranks meet here (a FileStore or TCP store across hosts)
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) ranks.emplace_back(train_rank, std::ref(store), r, 2);
  for (std::thread& t : ranks) t.join();
}
