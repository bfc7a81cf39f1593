// Shared helpers of the tcp backend tests (test_comm_tcp.cc, test_comm_tcp_split.cc):
// typed buffers compared through double, the sequential oracle's inputs, ranks as
// threads over one MemoryStore, /dev/shm leftovers, the data paths, whether
// process_vm_readv works here.
#pragma once

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"

namespace dtrain::comm::tcptest {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

const DType kDTypes[] = {DType::f32, DType::f64,  DType::i32, DType::i64,
                         DType::f16, DType::bf16, DType::u8};
const ReduceOp kOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};

inline double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

// A typed buffer whose elements are set and compared through double.
struct Buffer {
  Buffer(DType t, size_t n) : dtype(t), count(n), bytes(n * dtype_size(t)) {}
  void* data() { return bytes.data(); }
  std::byte* at(size_t i) { return bytes.data() + i * dtype_size(dtype); }
  const std::byte* at(size_t i) const { return bytes.data() + i * dtype_size(dtype); }

  template <typename T>
  void put(size_t i, T v) {
    std::memcpy(at(i), &v, sizeof(T));
  }
  void set(size_t i, double v) {
    switch (dtype) {
      case DType::f32:
        return put(i, static_cast<float>(v));
      case DType::f64:
        return put(i, v);
      case DType::i32:
        return put(i, static_cast<int32_t>(v));
      case DType::i64:
        return put(i, static_cast<int64_t>(v));
      case DType::u8:
        return put(i, static_cast<uint8_t>(v));
      case DType::f16:
        return put(i, Half(static_cast<float>(v)).bits);
      case DType::bf16:
        return put(i, BFloat16(static_cast<float>(v)).bits);
    }
  }
  double get(size_t i) const {
    auto load = [&](auto x) {
      std::memcpy(&x, at(i), sizeof(x));
      return x;
    };
    switch (dtype) {
      case DType::f32:
        return load(0.0f);
      case DType::f64:
        return load(0.0);
      case DType::i32:
        return load(int32_t{});
      case DType::i64:
        return static_cast<double>(load(int64_t{}));
      case DType::u8:
        return load(uint8_t{});
      case DType::f16: {
        Half h;
        h.bits = load(uint16_t{});
        return static_cast<float>(h);
      }
      case DType::bf16: {
        BFloat16 b;
        b.bits = load(uint16_t{});
        return static_cast<float>(b);
      }
    }
    return 0;
  }
  // The average as the backend computes it: the sum times 1/n, rounded the way the
  // element type rounds (float arithmetic for f32/f16/bf16, nearest for integers).
  void set_avg(size_t i, double sum, int n) {
    float f = static_cast<float>(sum) * static_cast<float>(1.0 / n);
    switch (dtype) {
      case DType::f32:
        return put(i, f);
      case DType::f64:
        return put(i, sum * (1.0 / n));
      case DType::f16:
        return put(i, Half(f).bits);
      case DType::bf16:
        return put(i, BFloat16(f).bits);
      case DType::i32:
        return put(i, static_cast<int32_t>(std::llround(sum * (1.0 / n))));
      case DType::i64:
        return put(i, static_cast<int64_t>(std::llround(sum * (1.0 / n))));
      case DType::u8:
        return put(i, static_cast<uint8_t>(std::llround(sum * (1.0 / n))));
    }
  }

  DType dtype;
  size_t count;
  std::vector<std::byte> bytes;
};

// Element by element; returns "" when equal, else the count and the first mismatch.
inline std::string compare(const Buffer& got, const Buffer& want) {
  size_t bad = 0, first = 0;
  const size_t es = dtype_size(got.dtype);
  for (size_t i = 0; i < want.count; ++i) {
    if (std::memcmp(got.at(i), want.at(i), es) != 0 && bad++ == 0) first = i;
  }
  if (bad == 0) return "";
  return fmt::format("{} of {} {} elements differ; first at {}: got {}, want {}", bad, want.count,
                     dtype_name(want.dtype), first, got.get(first), want.get(first));
}

// Small integers: exact in every dtype, and sums of four stay exact even in bf16.
inline double input(int rank, size_t i, DType t, int salt = 0) {
  int v = static_cast<int>((i * 7 + static_cast<size_t>(rank) * 13 + salt * 5) % 17) - 8;
  return t == DType::u8 ? v + 8 : v;
}

inline std::vector<size_t> counts_for(int n) {
  return {0, 1, 7, 1023, static_cast<size_t>(n) * 37 + 1, 100003};
}

inline std::string what(const char* op, DType t, size_t count, const char* extra = "") {
  return fmt::format("{} {} count {} {}", op, dtype_name(t), count, extra);
}

// Small chunks and a small window so that even modest counts run many pipelined
// chunks and wrap the scratch slots; shared-memory rings of two chunks, so that
// they wrap and fill all the time.
inline TcpOptions small_chunks() {
  TcpOptions o;
  o.ring.chunk_bytes = 4096;
  o.ring.window = 3;
  o.shm_ring_bytes = 8192;
  o.direct_chunk_bytes = 1001;   // many chunks, not a whole number of 8-byte elements
  o.ring.cold_min_bytes = 2048;  // the ring's copy steps stream from 2 KiB (post_recv_cold)
  return o;
}

// Whether this process may read memory with process_vm_readv (what the tcp
// backend's direct probe needs; a seccomp filter may forbid it), tried on itself.
inline bool cma_available() {
  uint64_t word = 0x1234567887654321ull, got = 0;
  iovec local{&got, sizeof(got)}, remote{&word, sizeof(word)};
  return ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) == sizeof(got) && got == word;
}

// The names this process (or `pid`) left in /dev/shm.
inline std::vector<std::string> shm_leftovers(pid_t pid = ::getpid()) {
  std::vector<std::string> out;
  const std::string prefix = fmt::format("dtrain-{}-", pid);
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
    std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0) out.push_back(name);
  }
  return out;
}

// Shared-memory segments mapped into this process right now (unlinked ones included),
// read from /proc/self/maps: an oracle independent of the transport's own state.
inline int shm_mappings() {
  std::ifstream maps("/proc/self/maps");
  int n = 0;
  for (std::string line; std::getline(maps, line);) {
    n += line.find("/dev/shm/dtrain-") != std::string::npos;
  }
  return n;
}

// Runs body(comm) on n threads, one communicator each (rank r with options(r)),
// meeting in one MemoryStore. Afterwards nothing may be left in /dev/shm.
inline void run_ranks(int n, const std::function<TcpOptions(int)>& options, milliseconds timeout,
                      const std::function<void(Communicator&)>& body) {
  {
    MemoryStore store;
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        try {
          auto comm = make_tcp_communicator(store, r, n, CommOptions{timeout}, options(r));
          body(*comm);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "rank " << r << ": " << e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
  }
  EXPECT_EQ(shm_leftovers(), std::vector<std::string>{}) << "left in /dev/shm";
}

inline void run_ranks(int n, const TcpOptions& topts, milliseconds timeout,
                      const std::function<void(Communicator&)>& body) {
  run_ranks(
      n, [&](int) { return topts; }, timeout, body);
}

// The data path between ranks of one host: shared memory (the default), plain TCP
// (the fast path off), or a mix (odd ranks turn it off: their pairs use TCP).
enum class Path { kShm, kTcp, kMixed };
inline const char* path_name(Path p) {
  return p == Path::kShm ? "shm" : p == Path::kTcp ? "tcp" : "mixed";
}
inline void PrintTo(Path p, std::ostream* os) { *os << path_name(p); }

}  // namespace dtrain::comm::tcptest
