// DistributedSampler; see sampler.h.
#include "dtrain/engine/data/sampler.h"

#include <algorithm>
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
  num_samples_ = samples_for(0);
}

int64_t DistributedSampler::samples_for(int64_t offset) const {
  // torch: drop_last rounds down to a multiple of world_size, otherwise up.
  const int64_t n = dataset_size_ - offset;
  return drop_last_ ? n / world_size_ : (n + world_size_ - 1) / world_size_;
}

int64_t DistributedSampler::global_position() const {
  return std::min(dataset_size_, offset_ + position_ * world_size_);
}

SamplerState reshard(const std::vector<SamplerState>& states, int64_t dataset_size) {
  DTRAIN_CHECK(!states.empty(), InvalidArgument, "sampler reshard: no sampler states given");
  int64_t min_pos = states[0].position;
  for (const auto& s : states) {
    DTRAIN_CHECK(s.epoch == states[0].epoch && s.offset == states[0].offset, InvalidArgument,
                 "sampler reshard: ranks disagree (epoch {} offset {} vs epoch {} offset {})",
                 s.epoch, s.offset, states[0].epoch, states[0].offset);
    min_pos = std::min(min_pos, s.position);
  }
  const auto world = static_cast<int64_t>(states.size());
  return {states[0].epoch, 0, std::min(dataset_size, states[0].offset + min_pos * world)};
}

void DistributedSampler::set_epoch(int64_t epoch) {
  DTRAIN_CHECK(epoch >= 0, InvalidArgument, "DistributedSampler: epoch must be >= 0, got {}",
               epoch);
  if (!(restored_ && epoch == epoch_)) {
    position_ = 0;
    offset_ = 0;
    num_samples_ = samples_for(0);
  }
  epoch_ = epoch;
  restored_ = false;
}

std::vector<int64_t> DistributedSampler::indices() const {
  std::vector<int64_t> all;  // the epoch's order, then its part after offset_
  if (shuffle_) {
    all = seeded_permutation(dataset_size_, seed_, epoch_);
  } else {
    all.resize(static_cast<size_t>(dataset_size_));
    std::iota(all.begin(), all.end(), int64_t{0});
  }
  all.erase(all.begin(), all.begin() + offset_);
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
  DTRAIN_CHECK(state.offset >= 0 && state.offset <= dataset_size_, InvalidArgument,
               "DistributedSampler::load_state: offset {} is outside [0, {}] (the data set size)",
               state.offset, dataset_size_);
  const int64_t n = samples_for(state.offset);
  DTRAIN_CHECK(state.position >= 0 && state.position <= n, InvalidArgument,
               "DistributedSampler::load_state: position {} is outside [0, {}] (this rank's "
               "samples per epoch; was the data set or world size changed?)",
               state.position, n);
  epoch_ = state.epoch;
  position_ = state.position;
  offset_ = state.offset;
  num_samples_ = n;
  restored_ = true;
}

}  // namespace dtrain::data
