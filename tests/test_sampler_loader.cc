// DistributedSampler (against torch.utils.data.DistributedSampler written out),
// TensorDataset and the prefetching DataLoader (against direct indexing).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/engine/data/loader.h"
#include "dtrain/engine/data/sampler.h"
#include "dtrain/engine/random.h"

namespace dtrain::data {
namespace {

// Runs f, expects it to throw E, and returns the message.
template <typename E, typename F>
std::string thrown_message(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no exception";
  return "";
}

// ============================================================== sampler

// torch.utils.data.DistributedSampler, written out: pad the permutation by
// repeating its head (or cut it with drop_last), then take every world-th entry.
std::vector<int64_t> torch_like(const std::vector<int64_t>& perm, int64_t rank, int64_t world,
                                bool drop_last) {
  const auto n = static_cast<int64_t>(perm.size());
  // torch: drop_last -> ceil((n - world) / world) == n / world, else ceil(n / world)
  const int64_t num = drop_last ? n / world : (n + world - 1) / world;
  std::vector<int64_t> all = perm;
  while (static_cast<int64_t>(all.size()) < num * world) {
    all.insert(all.end(), perm.begin(), perm.end());
  }
  all.resize(static_cast<size_t>(num * world));
  std::vector<int64_t> out;
  for (int64_t i = rank; i < num * world; i += world) out.push_back(all[static_cast<size_t>(i)]);
  return out;
}

TEST(Sampler, EveryIndexCoveredAcrossRanks) {
  for (int64_t n : {10, 11, 7, 1, 3, 0}) {
    for (int64_t world = 1; world <= 4; ++world) {
      std::vector<int64_t> perm = seeded_permutation(n, 42, 3);
      std::map<int64_t, int> hits;
      const int64_t per_rank = (n + world - 1) / world;
      for (int64_t r = 0; r < world; ++r) {
        DistributedSampler s(n, r, world, 42);
        s.set_epoch(3);
        std::vector<int64_t> idx = s.indices();
        EXPECT_EQ(static_cast<int64_t>(idx.size()), per_rank) << n << " " << world;
        EXPECT_EQ(s.num_samples(), per_rank);
        EXPECT_EQ(idx, torch_like(perm, r, world, false)) << "n=" << n << " world=" << world;
        for (int64_t i : idx) ++hits[i];
      }
      // Each index once, plus the padding: the permutation repeated from its head
      // for `pad` more entries (several times over when pad > n).
      const int64_t pad = per_rank * world - n;
      for (int64_t i = 0; i < n; ++i) {
        auto pos = std::find(perm.begin(), perm.end(), i) - perm.begin();
        const int64_t extra = pad / n + (pos < pad % n ? 1 : 0);
        EXPECT_EQ(hits[i], 1 + extra) << "n=" << n << " world=" << world << " i=" << i;
      }
      EXPECT_EQ(static_cast<int64_t>(hits.size()), n);
    }
  }
}

TEST(Sampler, DropLastCutsTheTail) {
  for (int64_t n : {10, 11, 7}) {
    for (int64_t world = 1; world <= 4; ++world) {
      std::set<int64_t> seen;
      for (int64_t r = 0; r < world; ++r) {
        DistributedSampler s(n, r, world, 5, /*shuffle=*/true, /*drop_last=*/true);
        std::vector<int64_t> idx = s.indices();
        EXPECT_EQ(static_cast<int64_t>(idx.size()), n / world);
        EXPECT_EQ(idx, torch_like(seeded_permutation(n, 5, 0), r, world, true));
        for (int64_t i : idx) EXPECT_TRUE(seen.insert(i).second) << "duplicate " << i;
      }
      EXPECT_EQ(static_cast<int64_t>(seen.size()), n / world * world);
    }
  }
}

TEST(Sampler, UnshuffledMatchesTorch) {
  // torch: DistributedSampler(range(10), num_replicas=4, rank=r, shuffle=False)
  const std::vector<std::vector<int64_t>> want = {{0, 4, 8}, {1, 5, 9}, {2, 6, 0}, {3, 7, 1}};
  for (int64_t r = 0; r < 4; ++r) {
    DistributedSampler s(10, r, 4, 0, /*shuffle=*/false);
    EXPECT_EQ(s.indices(), want[static_cast<size_t>(r)]);
  }
}

TEST(Sampler, SeedsAndEpochs) {
  DistributedSampler a(100, 1, 2, 17), b(100, 1, 2, 17), c(100, 1, 2, 18);
  EXPECT_EQ(a.indices(), b.indices());
  EXPECT_NE(a.indices(), c.indices());
  std::vector<int64_t> e0 = a.indices();
  a.set_epoch(1);
  std::vector<int64_t> e1 = a.indices();
  EXPECT_NE(e0, e1);
  b.set_epoch(1);
  EXPECT_EQ(e1, b.indices());
  a.set_epoch(0);
  EXPECT_EQ(a.indices(), e0);
  // A permutation really is one.
  std::vector<int64_t> p = seeded_permutation(1000, 9, 4);
  std::sort(p.begin(), p.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(p[static_cast<size_t>(i)], i);
}

TEST(Sampler, StateSaveAndRestoreContinuesIdentically) {
  DistributedSampler s(23, 2, 3, 99);
  s.set_epoch(4);
  const std::vector<int64_t> full = s.indices();
  s.advance(3);
  EXPECT_EQ(s.state(), (SamplerState{4, 3}));
  SamplerState saved = s.state();

  DistributedSampler t(23, 2, 3, 99);
  t.load_state(saved);
  t.set_epoch(4);  // the first set_epoch after a restore keeps the position
  EXPECT_EQ(t.position(), 3);
  EXPECT_EQ(t.remaining_indices(), std::vector<int64_t>(full.begin() + 3, full.end()));
  t.set_epoch(4);  // later calls rewind
  EXPECT_EQ(t.position(), 0);

  DistributedSampler u(23, 2, 3, 99);
  u.load_state(saved);
  u.set_epoch(5);  // another epoch starts at 0
  EXPECT_EQ(u.position(), 0);
  EXPECT_EQ(u.epoch(), 5);

  EXPECT_THROW(s.advance(100), InvalidArgument);
  EXPECT_THROW(t.load_state({0, 100}), InvalidArgument);
  EXPECT_THROW(t.load_state({-1, 0}), InvalidArgument);
}

TEST(Sampler, ValidatesArguments) {
  EXPECT_THROW(DistributedSampler(10, 4, 4, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, -1, 4, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(10, 0, 0, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(-1, 0, 1, 0), InvalidArgument);
  EXPECT_THROW(DistributedSampler(3, 0, 4, 0, true, /*drop_last=*/true), InvalidArgument);
  DistributedSampler s(10, 0, 1, 0);
  EXPECT_THROW(s.set_epoch(-1), InvalidArgument);
}

// ============================================================== loader

// inputs[i] = {100 i, 100 i + 1, 100 i + 2} (f32), targets[i] = i (i64)
std::shared_ptr<TensorDataset> counting_dataset(int64_t n) {
  std::vector<float> x;
  std::vector<int64_t> y;
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < 3; ++j) x.push_back(static_cast<float>(100 * i + j));
    y.push_back(i);
  }
  return std::make_shared<TensorDataset>(from_vector(x, {n, 3}), from_vector(y, {n}));
}

// The batches a loader must produce, built by hand from the sampler's indices.
std::vector<Batch> expected_batches(const std::vector<int64_t>& idx, int64_t bs, bool drop_last) {
  std::vector<Batch> out;
  for (size_t b = 0; b < idx.size(); b += static_cast<size_t>(bs)) {
    size_t n = std::min(static_cast<size_t>(bs), idx.size() - b);
    if (drop_last && n < static_cast<size_t>(bs)) break;
    std::vector<float> x;
    std::vector<int64_t> y;
    for (size_t k = b; k < b + n; ++k) {
      for (int j = 0; j < 3; ++j) x.push_back(static_cast<float>(100 * idx[k] + j));
      y.push_back(idx[k]);
    }
    const auto rows = static_cast<int64_t>(n);
    out.push_back({from_vector(x, {rows, 3}), from_vector(y, {rows})});
  }
  return out;
}

void expect_same_batches(DataLoader& loader, const std::vector<Batch>& want) {
  Batch b;
  size_t i = 0;
  while (loader.next(b)) {
    ASSERT_LT(i, want.size());
    EXPECT_EQ(b.input.shape(), want[i].input.shape());
    EXPECT_EQ(b.input.to_vector<float>(), want[i].input.to_vector<float>()) << "batch " << i;
    EXPECT_EQ(b.target.to_vector<int64_t>(), want[i].target.to_vector<int64_t>()) << "batch " << i;
    ++i;
  }
  EXPECT_EQ(i, want.size());
  EXPECT_FALSE(loader.next(b));  // stays over
}

TEST(DataLoader, YieldsTheBatchesOfDirectIndexing) {
  auto ds = counting_dataset(37);
  for (int64_t prefetch : {0, 1, 3}) {
    for (bool drop_last : {false, true}) {
      for (int64_t rank = 0; rank < 2; ++rank) {
        DistributedSampler sampler(37, rank, 2, 11);
        DataLoader loader(ds, sampler, 5, {.prefetch = prefetch, .drop_last = drop_last});
        EXPECT_EQ(loader.num_batches(), drop_last ? 3 : 4);  // 19 samples per rank
        for (int64_t epoch : {0, 1}) {
          sampler.set_epoch(epoch);
          loader.begin_epoch(epoch);
          SCOPED_TRACE(::testing::Message() << "prefetch " << prefetch << " drop_last " << drop_last
                                            << " rank " << rank << " epoch " << epoch);
          expect_same_batches(loader, expected_batches(sampler.indices(), 5, drop_last));
          EXPECT_EQ(loader.state().position, drop_last ? 15 : 19);
        }
      }
    }
  }
}

TEST(DataLoader, ResumesMidEpochFromASavedState) {
  auto ds = counting_dataset(50);
  DistributedSampler sampler(50, 0, 1, 3);
  DataLoader a(ds, sampler, 4, {.prefetch = 2});
  a.begin_epoch(2);
  Batch b;
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(a.next(b));
  SamplerState saved = a.state();
  EXPECT_EQ(saved, (SamplerState{2, 20}));  // consumed, not prefetched
  std::vector<std::vector<int64_t>> rest;
  while (a.next(b)) rest.push_back(b.target.to_vector<int64_t>());

  DataLoader c(ds, sampler, 4, {.prefetch = 2});
  c.load_state(saved);
  c.begin_epoch(2);
  std::vector<std::vector<int64_t>> resumed;
  while (c.next(b)) resumed.push_back(b.target.to_vector<int64_t>());
  EXPECT_EQ(resumed, rest);
  ASSERT_FALSE(rest.empty());
  c.begin_epoch(3);  // the next epoch starts from the beginning
  int batches = 0;
  while (c.next(b)) ++batches;
  EXPECT_EQ(batches, 13);
}

// A dataset that is slow and counts calls, optionally failing at one index.
class SlowDataset : public Dataset {
 public:
  SlowDataset(int64_t n, int64_t fail_at) : inner_(counting_dataset(n)), fail_at_(fail_at) {}
  int64_t size() const override { return inner_->size(); }
  Batch get_batch(std::span<const int64_t> indices) const override {
    calls_.fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    for (int64_t i : indices) {
      if (i == fail_at_) DTRAIN_THROW(DataFormatError, "sample {} is corrupt", i);
    }
    return inner_->get_batch(indices);
  }
  mutable std::atomic<int> calls_{0};

 private:
  std::shared_ptr<TensorDataset> inner_;
  int64_t fail_at_;
};

TEST(DataLoader, StoppingMidEpochDoesNotHangAndPrefetchIsBounded) {
  auto ds = std::make_shared<SlowDataset>(1000, -1);
  {
    DataLoader loader(ds, DistributedSampler(1000, 0, 1, 1), 1, {.prefetch = 3});
    loader.begin_epoch(0);
    Batch b;
    ASSERT_TRUE(loader.next(b));
    ASSERT_TRUE(loader.next(b));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    // 2 consumed + at most 3 queued + 1 being built.
    EXPECT_LE(ds->calls_.load(), 6);
    loader.begin_epoch(1);  // abandons epoch 0 mid-way
    ASSERT_TRUE(loader.next(b));
  }  // destroyed mid-epoch: must join promptly
  auto t0 = std::chrono::steady_clock::now();
  {
    DataLoader loader(ds, DistributedSampler(1000, 0, 1, 1), 1, {.prefetch = 2});
    loader.begin_epoch(0);
  }  // destroyed before any next()
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

TEST(DataLoader, WorkerExceptionsAreRethrownOnTheConsumer) {
  for (int64_t prefetch : {0, 2}) {
    auto ds = std::make_shared<SlowDataset>(20, 7);
    DataLoader loader(ds, DistributedSampler(20, 0, 1, 0, /*shuffle=*/false), 3,
                      {.prefetch = prefetch});
    loader.begin_epoch(0);
    Batch b;
    ASSERT_TRUE(loader.next(b));                                                 // samples 0..2
    ASSERT_TRUE(loader.next(b));                                                 // 3..5
    std::string msg = thrown_message<DataFormatError>([&] { loader.next(b); });  // 6..8
    EXPECT_NE(msg.find("sample 7 is corrupt"), std::string::npos) << msg;
    EXPECT_FALSE(loader.next(b));
    EXPECT_EQ(loader.state().position, 6);
  }
}

TEST(DataLoader, ValidatesArguments) {
  auto ds = counting_dataset(10);
  EXPECT_THROW(DataLoader(ds, DistributedSampler(11, 0, 1, 0), 2), InvalidArgument);
  EXPECT_THROW(DataLoader(ds, DistributedSampler(10, 0, 1, 0), 0), InvalidArgument);
  EXPECT_THROW(DataLoader(nullptr, DistributedSampler(10, 0, 1, 0), 2), InvalidArgument);
  DataLoader loader(ds, DistributedSampler(10, 0, 1, 0), 2, {.prefetch = 0});
  Batch b;
  EXPECT_THROW(loader.next(b), InvalidArgument);  // before begin_epoch
  EXPECT_THROW(DataLoader(ds, DistributedSampler(10, 0, 1, 0), 2, {.prefetch = -1}),
               InvalidArgument);
  EXPECT_THROW(ds->get_batch(std::vector<int64_t>{10}), InvalidArgument);
  EXPECT_THROW(TensorDataset(zeros({3, 2}), zeros({4})), ShapeError);
}

TEST(DataLoader, TensorDatasetGathersNonContiguousInputs) {
  Tensor x = arange(12, TensorOptions{}.with_dtype(DType::f32)).reshape({3, 4}).t();  // [4,3]
  TensorDataset ds(x, arange(4, TensorOptions{}.with_dtype(DType::i64)));
  Batch b = ds.get_batch(std::vector<int64_t>{2, 0});
  EXPECT_EQ(b.input.to_vector<float>(), (std::vector<float>{2, 6, 10, 0, 4, 8}));
  EXPECT_EQ(b.target.to_vector<int64_t>(), (std::vector<int64_t>{2, 0}));
}

}  // namespace
}  // namespace dtrain::data
