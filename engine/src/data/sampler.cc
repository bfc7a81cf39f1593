// DistributedSampler; see sampler.h.
#include "dtrain/engine/data/sampler.h"

#include <numeric>
#include <utility>

#include "dtrain/common/error.h"
#include "dtrain/engine/random.h"

namespace dtrain::data {

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  Generator gen(seed, static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) {
    auto j = static_cast<int64_t>(gen.below(static_cast<uint64_t>(i + 1)));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
  }
  return p;
}

DistributedSampler::DistributedSampler(int64_t dataset_size, int64_t rank, int64_t world_size,
                                       uint64_t seed, bool shuffle, bool drop_last)
    : dataset_size_(dataset_size),
      rank_(rank),
      world_size_(world_size),
      seed_(seed),
      shuffle_(shuffle),
      drop_last_(drop_last) {
  DTRAIN_CHECK(dataset_size >= 0, InvalidArgument,
               "DistributedSampler: dataset_size must be >= 0, got {}", dataset_size);
  DTRAIN_CHECK(world_size >= 1, InvalidArgument,
               "DistributedSampler: world_size must be >= 1, got {}", world_size);
  DTRAIN_CHECK(rank >= 0 && rank < world_size, InvalidArgument,
               "DistributedSampler: rank must be in [0, {}), got {}", world_size, rank);
  DTRAIN_CHECK(!drop_last || dataset_size >= world_size, InvalidArgument,
               "DistributedSampler: drop_last with {} samples over {} ranks leaves ranks empty",
               dataset_size, world_size);
  // torch: drop_last rounds down to a multiple of world_size, otherwise up.
  num_samples_ =
      drop_last ? dataset_size / world_size : (dataset_size + world_size - 1) / world_size;
}

void DistributedSampler::set_epoch(int64_t epoch) {
  DTRAIN_CHECK(epoch >= 0, InvalidArgument, "DistributedSampler: epoch must be >= 0, got {}",
               epoch);
  if (!(restored_ && epoch == epoch_)) position_ = 0;
  epoch_ = epoch;
  restored_ = false;
}

std::vector<int64_t> DistributedSampler::indices() const {
  std::vector<int64_t> all;
  if (shuffle_) {
    all = seeded_permutation(dataset_size_, seed_, epoch_);
  } else {
    all.resize(static_cast<size_t>(dataset_size_));
    std::iota(all.begin(), all.end(), int64_t{0});
  }
  const auto total = static_cast<size_t>(total_size());
  if (all.size() < total) {  // pad by repeating the head (possibly several times)
    const size_t n = all.size();
    all.reserve(total);
    for (size_t i = 0; all.size() < total; ++i) all.push_back(all[i % n]);
  } else {
    all.resize(total);
  }
  std::vector<int64_t> mine;
  mine.reserve(static_cast<size_t>(num_samples_));
  for (size_t i = static_cast<size_t>(rank_); i < total; i += static_cast<size_t>(world_size_)) {
    mine.push_back(all[i]);
  }
  return mine;
}

std::vector<int64_t> DistributedSampler::remaining_indices() const {
  std::vector<int64_t> all = indices();
  all.erase(all.begin(), all.begin() + position_);
  return all;
}

void DistributedSampler::advance(int64_t n) {
  DTRAIN_CHECK(n >= 0 && position_ + n <= num_samples_, InvalidArgument,
               "DistributedSampler: cannot advance by {} from position {} of {}", n, position_,
               num_samples_);
  position_ += n;
}

void DistributedSampler::load_state(const SamplerState& state) {
  DTRAIN_CHECK(state.epoch >= 0, InvalidArgument,
               "DistributedSampler::load_state: epoch must be >= 0, got {}", state.epoch);
  DTRAIN_CHECK(state.position >= 0 && state.position <= num_samples_, InvalidArgument,
               "DistributedSampler::load_state: position {} is outside [0, {}] (this rank's "
               "samples per epoch; was the data set or world size changed?)",
               state.position, num_samples_);
  epoch_ = state.epoch;
  position_ = state.position;
  restored_ = true;
}

}  // namespace dtrain::data
