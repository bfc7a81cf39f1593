// A final checkpoint on a signal: what a batch system sends before it stops a job
// (Slurm: `#SBATCH --signal=B:USR1@120` forwarded to the tasks, SIGTERM at the time
// limit or on preemption; Kubernetes: SIGTERM before SIGKILL).
//
// StopSignals blocks the signals in every thread of the process and reads them from a
// signalfd: no handler, no global state. It must be built before any thread that
// could take the signal starts (before the communicator, gRPC and the kernels' pools);
// the one pool that exists earlier, OpenBLAS's (started by its library constructor,
// before main), is restarted from the blocking thread (engine threading.h), and the
// constructor checks /proc/self/task that every thread now blocks them.
//
// SignalStop, a Trainer callback, polls the signalfd at every step end and agrees
// with the other ranks through one all-reduce (MAX) of the signal number: a signal
// seen by any rank at step s stops every rank after step s. The Trainer then writes
// the checkpoint of step s (ShardedCheckpoints commits it) and ends without
// evaluation; train.cc prints "dtrain train: stopped by SIGUSR1 after step s ..."
// and `dtrain train` exits kExitStoppedBySignal, so a batch script can requeue and
// resume with --resume auto.
//
// Test seam: DTRAIN_TEST_SIGNAL_AT=rank:step -- that rank sends itself SIGUSR1 after
// the step (before the poll), so one rank sees the signal at a chosen step.
//
// Not here: which flags turn it on (train.cc: --checkpoint-signals with --ckpt-dir),
// forwarding signals to workers (dtrain launch, the Slurm scripts in deploy/slurm).
// Thread-safety: StopSignals is built on the main thread before others start;
// SignalStop runs on the training thread.
#pragma once

#include <signal.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/comm/communicator.h"
#include "dtrain/engine/device.h"
#include "trainer.h"

namespace dtrain::cli {

// Exit status of `dtrain train` after a stop on a signal with the final checkpoint
// committed (EX_TEMPFAIL of sysexits.h: try again later, here: requeue and resume).
inline constexpr int kExitStoppedBySignal = 75;

// "USR1,TERM" -> {SIGUSR1, SIGTERM}; "none" -> {}. Names with or without "SIG";
// throws InvalidArgument naming an unknown one (SIGKILL/SIGSTOP cannot be caught).
std::vector<int> parse_signal_list(const std::string& list);

// "SIGUSR1".
std::string signal_name(int sig);

// REQUIRES: built on the main thread; see the file comment.
class StopSignals {
 public:
  // Blocks `signals` (non-empty) and opens the signalfd; throws IoError when a call
  // fails and InternalError naming a thread that still takes the signals.
  explicit StopSignals(const std::vector<int>& signals);
  // Discards what is pending and restores the previous mask.
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The first pending signal, consumed; nullopt when none is pending. Never blocks.
  std::optional<int> poll();

 private:
  sigset_t set_;
  sigset_t old_mask_;
  int fd_ = -1;
};

class SignalStop final : public Callback {
 public:
  // test_signal_rank/step: DTRAIN_TEST_SIGNAL_AT (-1: off).
  SignalStop(StopSignals& signals, comm::Communicator& comm, Device device,
             int test_signal_rank = -1, int64_t test_signal_step = -1)
      : signals_(signals),
        comm_(comm),
        device_(device),
        test_rank_(test_signal_rank),
        test_step_(test_signal_step) {}
  // Collective at every step: the poll, then the all-reduce.
  bool stop_requested(const StepEnd& end) override;
  // The agreed signal once stop_requested said true (the highest number seen).
  std::optional<int> signal() const { return signal_; }

 private:
  StopSignals& signals_;
  comm::Communicator& comm_;
  Device device_;
  int test_rank_;
  int64_t test_step_;
  std::optional<int> signal_;
};

// DTRAIN_TEST_SIGNAL_AT="rank:step" -> {rank, step}; unset -> {-1, -1}.
std::pair<int, int64_t> read_test_signal_seam();

}  // namespace dtrain::cli
