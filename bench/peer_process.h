// What the benches share for running their PyTorch peers side by side: finding a
// python3 with torch (Debian's /usr/bin/python3 with python3-torch first; the default
// python3 may be a pyenv without Debian's packages). run_capture is dtrain's
// (dtrain/common/process.h).
#pragma once

#include <fmt/format.h>

#include <string>

#include "dtrain/common/process.h"

namespace dtrain::bench {

using dtrain::run_capture;

// The first of /usr/bin/python3 and python3 that imports torch; empty when neither does.
inline std::string find_torch_python() {
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    int st = 0;
    run_capture(fmt::format("{} -c 'import torch' >/dev/null 2>&1", py), &st);
    if (st == 0) return py;
  }
  return "";
}

}  // namespace dtrain::bench
