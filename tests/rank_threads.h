// Test helper: a world of ranks as threads of this process, each with its own tcp
// communicator, meeting through one MemoryStore (the real backend, no fakes).
//
// run_tcp_ranks(world, tag, fn) calls fn(rank, comm) on every rank; a failure on any
// rank fails the test with that rank's message. Communicators are closed only once
// every rank is done (as a job's final barrier would). Every collective has the
// given timeout, so a broken test fails instead of hanging.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <exception>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dtrain/comm/store.h"
#include "dtrain/comm/tcp.h"
#include "dtrain/engine/threading.h"

namespace dtrain::testing {

template <typename Fn>
void run_tcp_ranks(int world, const std::string& tag, Fn fn,
                   std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  comm::MemoryStore store;
  std::vector<std::string> errors(static_cast<size_t>(world));
  std::latch done(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      std::unique_ptr<comm::Communicator> c;
      try {
        set_num_threads(1);
        comm::TcpOptions tcp;
        tcp.tag = tag;
        c = comm::make_tcp_communicator(store, r, world, comm::CommOptions{timeout}, tcp);
        fn(r, *c);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
      done.arrive_and_wait();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < world; ++r) EXPECT_EQ(errors[static_cast<size_t>(r)], "") << "rank " << r;
}

}  // namespace dtrain::testing
