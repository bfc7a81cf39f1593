// `dtrain bench all_gather | reduce_scatter | sendrecv` (cmd_bench_collectives.cc), and
// the pieces of cmd_bench.cc both files use: spawning the workers of a backend, reading
// their JSON lines, opening a worker's session.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "dtrain/common/process.h"
#include "worker_session.h"

namespace dtrain::cli {
namespace bench_detail {

std::string self_exe();
using dtrain::run_capture;  // dtrain/common/process.h
// The lines of `text` that parse as JSON objects.
std::vector<nlohmann::json> json_lines(const std::string& text);
// `worker` (a command line) on `nproc` ranks of `backend`: tcp and tcp-noshm through
// `dtrain launch`, mpi and mpi-native through mpirun.
std::string launch_command(const std::string& backend, int nproc, const std::string& worker);
// This worker's session on `backend` (tcp, tcp-noshm, mpi, mpi-native).
std::unique_ptr<WorkerSession> open_bench_session(const std::string& backend);

}  // namespace bench_detail

// Registers the three collectives' subcommands on `bench`. The returned function runs the
// one that was parsed and returns its exit code, or nullopt when none of them was.
std::function<std::optional<int>()> add_collective_benches(CLI::App& bench);
// `dtrain bench gpt` (cmd_bench_gpt.cc), registered the same way.
std::function<std::optional<int>()> add_gpt_bench(CLI::App& bench);
// `dtrain bench hosts` (cmd_bench_hosts.cc), registered the same way.
std::function<std::optional<int>()> add_hosts_bench(CLI::App& bench);

}  // namespace dtrain::cli
