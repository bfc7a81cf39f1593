// Generator: a small, explicit, serialisable random number generator.
//
// There is no global RNG: whatever needs randomness (initialisation, dropout,
// shuffling, augmentation) takes a Generator&. Its whole state is two 64-bit words,
// so a checkpoint can save and restore it exactly. The core is PCG-XSH-RR 64/32.
//
// Thread-safety: a Generator is used by one thread at a time.
#pragma once

#include <cmath>
#include <cstdint>

namespace dtrain {

class Generator {
 public:
  explicit Generator(uint64_t seed = 0x853c49e6748fea9bULL,
                     uint64_t stream = 0xda3e39cb94b95bdbULL) {
    reseed(seed, stream);
  }
  void reseed(uint64_t seed, uint64_t stream = 0xda3e39cb94b95bdbULL) {
    state_ = 0;
    inc_ = (stream << 1u) | 1u;
    next_u32();
    state_ += seed;
    next_u32();
  }
  uint32_t next_u32() {
    uint64_t old = state_;
    state_ = old * 6364136223846793005ULL + inc_;
    uint32_t xorshifted = static_cast<uint32_t>(((old >> 18u) ^ old) >> 27u);
    uint32_t rot = static_cast<uint32_t>(old >> 59u);
    return (xorshifted >> rot) | (xorshifted << ((32 - rot) & 31));
  }
  uint64_t next_u64() { return (static_cast<uint64_t>(next_u32()) << 32) | next_u32(); }
  // Uniform in [0, 1) with 24 random bits (exactly representable as float).
  float uniform_float() { return static_cast<float>(next_u32() >> 8) * (1.0f / 16777216.0f); }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Uniform integer in [0, n), unbiased (Lemire's rejection).
  uint64_t below(uint64_t n) {
    if (n <= 1) return 0;
    uint64_t threshold = (0 - n) % n;
    for (;;) {
      uint64_t r = next_u64();
      if (r >= threshold) return r % n;
    }
  }
  // Standard normal (Box-Muller; no cached second value, so state stays 2 words).
  double normal() {
    double u1 = uniform();
    double u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

  struct State {
    uint64_t state;
    uint64_t inc;
  };
  State get_state() const { return {state_, inc_}; }
  void set_state(State s) {
    state_ = s.state;
    inc_ = s.inc | 1u;
  }

 private:
  uint64_t state_ = 0;
  uint64_t inc_ = 1;
};

}  // namespace dtrain
