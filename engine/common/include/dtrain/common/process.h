// Running a helper command and reading what it prints: the benches' peers (PyTorch,
// Gloo, Open MPI programs) and the CLI's bench drivers.
#pragma once

#include <string>

namespace dtrain {

// Runs `cmd` through /bin/sh and returns its standard output. *status: the exit
// code, 128 + the signal number when a signal ended it, -1 when it could not start.
std::string run_capture(const std::string& cmd, int* status);

}  // namespace dtrain
