// shm::LocalCollectives (see local_collective.h for the protocol).
#include "shm/local_collective.h"

#include <atomic>
#include <cstring>

namespace dtrain::comm::shm {
namespace {

// memcpy that allows the null buffers of empty collectives.
void copy(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, bytes);
}

}  // namespace

LocalCollectives::LocalCollectives(int rank, std::vector<Slots> slots, std::vector<Doorbell> bells,
                                   WaitUntil wait)
    : rank_(rank), slots_(std::move(slots)), bells_(std::move(bells)), wait_(std::move(wait)) {
  DTRAIN_CHECK(rank_ >= 0 && rank_ < size() && bells_.size() == slots_.size(), InternalError,
               "shm: local collectives for rank {} of {} slots and {} doorbells", rank_, size(),
               bells_.size());
  for (const Slots& s : slots_) {
    DTRAIN_CHECK(s.valid() && s.bytes == capacity(), InternalError,
                 "shm: every rank of a local group needs slots of {} bytes", capacity());
  }
}

void LocalCollectives::wait_posted(uint64_t seq, Deadline deadline) {
  auto ready = [&] {
    for (int r = 0; r < size(); ++r) {
      if (r == rank_) continue;
      if (std::atomic_ref<uint64_t>(*slots_[static_cast<size_t>(r)].posted)
              .load(std::memory_order_acquire) < seq) {
        return false;
      }
    }
    return true;
  };
  if (!ready()) wait_(ready, deadline);
}

std::byte* LocalCollectives::begin(size_t bytes, Deadline deadline) {
  DTRAIN_CHECK(bytes <= capacity(), InternalError,
               "shm: a local collective of {} bytes does not fit the {}-byte slot", bytes,
               capacity());
  ++seq_;
  if (seq_ >= 2) wait_posted(seq_ - 1, deadline);  // collective seq_ - 2 is read everywhere
  inline_ = bytes <= kInlineBytes;
  return place(rank_);
}

void LocalCollectives::post(Deadline deadline) {
  std::atomic_ref<uint64_t>(*slots_[static_cast<size_t>(rank_)].posted)
      .store(seq_, std::memory_order_release);
  for (int r = 0; r < size(); ++r) {
    Doorbell& bell = bells_[static_cast<size_t>(r)];
    if (r != rank_ && bell.valid()) bell.ring();
  }
  wait_posted(seq_, deadline);
}

void LocalCollectives::reduce_inputs(std::byte* dst, size_t offset, size_t count, DType dtype,
                                     ReduceOp op, bool dst_holds_own) const {
  const size_t at = offset * dtype_size(dtype), bytes = count * dtype_size(dtype);
  int next = 1;
  if (!dst_holds_own || rank_ >= 2) {
    copy(dst, input(0) + at, bytes);
  } else if (rank_ == 1) {
    reduce_into(dst, input(0) + at, count, dtype, op);  // x1 op x0 == x0 op x1
    next = 2;
  }
  for (int r = next; r < size(); ++r) reduce_into(dst, input(r) + at, count, dtype, op);
}

void LocalCollectives::allreduce(void* data, size_t count, DType dtype, ReduceOp op,
                                 Deadline deadline) {
  const size_t bytes = count * dtype_size(dtype);
  copy(begin(bytes, deadline), data, bytes);
  post(deadline);
  reduce_inputs(static_cast<std::byte*>(data), 0, count, dtype, op, true);
  if (op == ReduceOp::kAvg) scale_in_place(data, count, dtype, 1.0 / size());
}

void LocalCollectives::reduce_scatter(const void* send, void* recv, size_t count, DType dtype,
                                      ReduceOp op, Deadline deadline) {
  const size_t bytes = count * dtype_size(dtype) * static_cast<size_t>(size());
  copy(begin(bytes, deadline), send, bytes);
  post(deadline);
  const size_t block = count * static_cast<size_t>(rank_);
  reduce_inputs(static_cast<std::byte*>(recv), block, count, dtype, op, false);
  if (op == ReduceOp::kAvg) scale_in_place(recv, count, dtype, 1.0 / size());
}

void LocalCollectives::allgather(const void* send, void* recv, size_t count, DType dtype,
                                 Deadline deadline) {
  const size_t bytes = count * dtype_size(dtype);
  copy(begin(bytes, deadline), send, bytes);
  post(deadline);
  auto* out = static_cast<std::byte*>(recv);
  for (int r = 0; r < size(); ++r) {
    std::byte* dst = out + bytes * static_cast<size_t>(r);
    if (r != rank_ || dst != send) copy(dst, input(r), bytes);
  }
}

void LocalCollectives::broadcast(void* data, size_t count, DType dtype, int root,
                                 Deadline deadline) {
  const size_t bytes = count * dtype_size(dtype);
  std::byte* own = begin(bytes, deadline);
  if (rank_ == root) copy(own, data, bytes);
  post(deadline);
  if (rank_ != root) copy(data, input(root), bytes);
}

void LocalCollectives::barrier(Deadline deadline) {
  begin(0, deadline);
  post(deadline);
}

}  // namespace dtrain::comm::shm
