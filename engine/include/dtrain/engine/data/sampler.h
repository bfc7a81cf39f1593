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
// Changing the world size mid-epoch (a checkpoint made by N ranks resumed by M):
// the epoch's consumed prefix of the order is carried as `offset` (global positions
// 0 .. offset-1 of the unpadded order are done). A sampler restored with offset > 0
// splits only the rest of that epoch's order, padded or cut over its own world size,
// so no sample is lost or repeated beyond padding; reshard() computes that state from
// the N ranks' states. offset is 0 in normal operation, and then the behaviour is
// exactly the one described above. The next set_epoch() clears it.
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
  int64_t offset = 0;    // leading positions of the epoch's order consumed before a re-split
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

  SamplerState state() const { return {epoch_, position_, offset_}; }
  // Throws InvalidArgument when the offset is outside [0, dataset_size()] or the position
  // outside [0, num_samples()] (num_samples() as it is with that offset).
  void load_state(const SamplerState& state);
  // Global positions of the epoch's order consumed so far, assuming every rank is at
  // this rank's position: offset + position * world_size, at most dataset_size().
  int64_t global_position() const;

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
  int64_t offset_ = 0;
  bool restored_ = false;  // load_state() happened and set_epoch() has not yet run
  int64_t samples_for(int64_t offset) const;
};

// The state a rank of a new world size loads to continue the epoch that `states`
// (one per rank of the old world, all at the same epoch and offset) were in: the
// prefix every old rank had consumed (offset + old_world * min position, capped at
// dataset_size) becomes the new offset, position 0. InvalidArgument when the states
// disagree on epoch or offset or the list is empty.
SamplerState reshard(const std::vector<SamplerState>& states, int64_t dataset_size);

// The permutation of [0, n) the sampler uses for (seed, epoch): Fisher-Yates with a
// Generator whose seed is `seed` and whose stream is `epoch`.
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace dtrain::data
