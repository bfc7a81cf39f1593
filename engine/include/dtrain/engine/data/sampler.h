// DistributedSampler: which sample indices one rank sees in one epoch.
//
// Follows torch.utils.data.DistributedSampler. For epoch e the whole index range
// [0, dataset_size) is shuffled (Fisher-Yates, Generator(seed, stream = e)), or kept
// in order when shuffle is off. Without drop_last the list is padded by repeating
// its head until it divides evenly by world_size; with drop_last the tail that does
// not divide evenly is cut. Rank r then takes positions r, r+world, r+2*world, ...
// Every rank therefore gets the same number of samples, num_samples().
//
// The sampler also remembers how far the current epoch has been consumed
// (position), so a checkpoint can store state() and a resumed run can load_state()
// and continue with exactly the next sample. The DataLoader advances the position
// as it hands out batches. It does not own or read a dataset.
//
// Thread-safety: REQUIRES external synchronisation (the DataLoader keeps it on the
// consumer thread).
#pragma once

#include <cstdint>
#include <vector>

namespace dtrain::data {

struct SamplerState {
  int64_t epoch = 0;
  int64_t position = 0;  // samples of this rank's epoch already consumed
  bool operator==(const SamplerState&) const = default;
};

class DistributedSampler {
 public:
  // Throws InvalidArgument unless dataset_size >= 0, world_size >= 1,
  // 0 <= rank < world_size, and (with drop_last) dataset_size >= world_size.
  DistributedSampler(int64_t dataset_size, int64_t rank, int64_t world_size, uint64_t seed,
                     bool shuffle = true, bool drop_last = false);

  // Selects the epoch and rewinds the position to 0 -- except for the first call
  // after load_state() with the restored epoch, which keeps the restored position.
  void set_epoch(int64_t epoch);
  int64_t epoch() const { return epoch_; }

  // This rank's indices for the current epoch, all num_samples() of them.
  std::vector<int64_t> indices() const;
  // The indices not yet consumed: indices() from position() on.
  std::vector<int64_t> remaining_indices() const;
  int64_t num_samples() const { return num_samples_; }
  int64_t total_size() const { return num_samples_ * world_size_; }

  int64_t position() const { return position_; }
  // Marks n more samples as consumed. Throws InvalidArgument past num_samples().
  void advance(int64_t n);

  SamplerState state() const { return {epoch_, position_}; }
  // Throws InvalidArgument when the position is outside [0, num_samples()].
  void load_state(const SamplerState& state);

  int64_t dataset_size() const { return dataset_size_; }
  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_size_; }
  uint64_t seed() const { return seed_; }
  bool shuffle() const { return shuffle_; }
  bool drop_last() const { return drop_last_; }

 private:
  int64_t dataset_size_;
  int64_t rank_;
  int64_t world_size_;
  uint64_t seed_;
  bool shuffle_;
  bool drop_last_;
  int64_t num_samples_ = 0;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  bool restored_ = false;  // load_state() happened and set_epoch() has not yet run
};

// The permutation of [0, n) the sampler uses for (seed, epoch): Fisher-Yates with a
// Generator whose seed is `seed` and whose stream is `epoch`.
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace dtrain::data
